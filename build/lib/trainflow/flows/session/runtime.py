"""How a command-line run reaches Prefect: the server PREFECT_API_URL names, else the local
server command-line runs share (flows/server.py) — never a temporary server per run.

Every entry point (train, sweep, predict) runs its flow inside `command_line_run()`.
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path
from typing import Any, NoReturn

from trainflow.flows.session import server as local
from trainflow.flows.session.server import Server, ServerError

HEARTBEAT_SETTINGS = ("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "PREFECT_RUNNER_HEARTBEAT_FREQUENCY")

_found: Server | None = None
# The home where this command launched a server not yet announced (once it answers).
_unannounced: Path | None = None


def start_early() -> None:
    """Find the server now, before torch loads: a server that must start boots meanwhile."""
    global _found
    with suppress(ServerError):  # said in one line by command_line_run, which tries again
        _found = _found or _find()


def _find() -> Server:
    global _unannounced
    import prefect
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, PREFECT_SERVER_API_PORT

    configured = PREFECT_API_URL.value()
    if configured:
        return Server(configured)
    home = Path(PREFECT_HOME.value())
    _unannounced = home  # before: a Ctrl-C may come as soon as the server is launched
    found = local.find_or_start(home, PREFECT_SERVER_API_PORT.value(), prefect.__version__)
    if not found.started:
        _unannounced = None
    for line in found.news:
        print(line, file=sys.stderr, flush=True)
    return found


@atexit.register
def _say_still_starting() -> None:
    """A command that ends before its server answers (Ctrl-C while it boots) still says
    that it leaves one running."""
    note = local.still_starting(_unannounced) if _unannounced is not None else None
    if note is not None:
        print(note, file=sys.stderr, flush=True)


def _ready(server: Server, home: Path) -> Server:
    """The server once it answers, its news told; an error there leaves nothing to say at exit
    (it says what became of the server)."""
    global _unannounced
    try:
        server = local.wait_until_ready(server, home)
    except ServerError:
        _unannounced = None
        raise
    _unannounced = None
    for line in server.news:
        print(line, file=sys.stderr, flush=True)
    return server


@contextmanager
def command_line_run() -> Iterator[Server]:
    """Settings for one command-line run, against the server it found (ServerError if none).

    PREFECT_API_URL goes into the environment, so every process started from here on (Dask
    or Ray workers, whatever the runner) reports to the same server. Flow heartbeats are off
    unless configured: only deployments' crash automations act on them, and a run waits up
    to a second at exit for the heartbeat thread.
    """
    from prefect.context import refresh_global_settings_context
    from prefect.settings import PREFECT_HOME

    server = _found or _find()
    if server.pid is not None or server.started:
        # The server that answers may be another than the one found: see wait_until_ready.
        server = _ready(server, Path(PREFECT_HOME.value()))
    elif not local.answers(server.api_url):
        raise ServerError(f"PREFECT_API_URL {server.api_url}: no server answers there")
    before = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = server.api_url
    refresh_global_settings_context()  # Prefect read the environment at import
    try:
        with _heartbeats_off() if not _heartbeats_configured() else nullcontext():
            yield server
    finally:
        _drain()
        # The environment as it was, for processes started later by a caller that goes on
        # (tests); Prefect's settings keep the server, which its clients may still need
        # while they drain at exit (with no address, they would start a temporary server).
        if before is None:
            del os.environ["PREFECT_API_URL"]
        else:
            os.environ["PREFECT_API_URL"] = before


@contextmanager
def _heartbeats_off() -> Iterator[None]:
    """Prefect's settings with flow heartbeats off, inside. A copy of the current settings with
    that one value changed, not `temporary_settings`, which validates every setting afresh
    from the environment and the profile to the same values (≈ 0.1 s; tests/test_flow.py
    compares the two)."""
    from prefect.context import SettingsContext, get_settings_context

    context = get_settings_context()
    flows = context.settings.flows.model_copy(update={"heartbeat_frequency": None})
    settings = context.settings.model_copy(update={"flows": flows})
    with SettingsContext(profile=context.profile, settings=settings):
        yield


def run_url(state: Any) -> str:
    """The Prefect UI page of the flow run that ended in `state`."""
    from prefect.settings import PREFECT_UI_URL

    return f"{PREFECT_UI_URL.value()}/runs/flow-run/{state.state_details.flow_run_id}"


def _drain() -> None:
    """Send the run's last logs and events now, not at interpreter exit: a slow drain there
    logs "Still processing items" after the command's last line."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all()
    EventsWorker.drain_all()


def _heartbeats_configured() -> bool:
    from prefect.settings import load_current_profile

    if any(name in os.environ for name in HEARTBEAT_SETTINGS):
        return True
    return any(setting.name in HEARTBEAT_SETTINGS for setting in load_current_profile().settings)


def fail(message: str, code: int, url: str | None) -> int:
    """The run's page, if it got one, then the error as the very last line; the exit code."""
    if url is not None:
        print(f"Prefect UI: {url}", flush=True)
    print(message, file=sys.stderr, flush=True)
    return code


def exit_process(code: int) -> NoReturn:
    """Exit with `code`, skipping the garbage collector's walks of the interpreter teardown.

    After the command's last line, Python's teardown frees the torch, sympy and Prefect object
    graphs with full garbage-collector passes over ≈ 280,000 objects: ≈ 1.3 s of CPU in a
    cached run, after everything the run writes is written and closed. Frozen objects are
    outside the collector's sight, and the OS reclaims the memory. Everything else of a normal
    exit still happens: non-daemon threads are joined, atexit handlers (logging, Prefect's
    workers) run, standard streams are flushed, and objects are freed by reference count.
    The young garbage (what the run dropped last) is collected first, so its finalizers run
    (2 ms; a full collection is 0.3 s). Python itself never promises to finalize what is
    still alive at exit.
    """
    gc.collect(1)
    gc.freeze()
    sys.exit(code)
