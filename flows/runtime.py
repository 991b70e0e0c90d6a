"""How a command-line run talks to Prefect: a server of the user's, or a temporary one.

Without PREFECT_API_URL, Prefect starts a temporary API server for the run, which takes
seconds (mostly its imports). `start_early` kicks that off in a thread before the CLI
imports torch and the stages, so the server boots on the other core meanwhile.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_early_start: threading.Thread | None = None


def _uses_temporary_server() -> bool:
    from prefect.settings import PREFECT_API_URL

    return not PREFECT_API_URL.value()


def start_early() -> None:
    global _early_start
    if _uses_temporary_server() and _early_start is None:
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # read by the server
        # The same singleton Prefect's client starts on first use: started now, found then.
        # Imported here, not in the thread: imports hold the GIL, and the sooner the server
        # process exists, the more of its boot overlaps with ours.
        from prefect.server.api.server import SubprocessASGIServer

        _early_start = threading.Thread(target=SubprocessASGIServer().start, daemon=True)
        _early_start.start()


@contextmanager
def command_line_run() -> Iterator[None]:
    """Settings for one `python flows/train_flow.py` run.

    With PREFECT_API_URL set, the run goes to that server, heartbeats and all (a deployment's
    crash detection relies on them). Without it, the temporary server dies with this process:
    nobody can act on its heartbeats, so they are turned off, which also saves the second the
    flow waits at exit for the heartbeat thread to wake up; and that server sends no
    telemetry from a machine that may well be offline.
    """
    if not _uses_temporary_server():
        yield
        return
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if _early_start is not None:
        _early_start.join()  # one server: let the early start finish before the client looks
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


def share_with_worker_processes() -> None:
    """Dask or Ray workers are other processes: point them at this run's API server too, so
    their flow runs land in the same place instead of each starting a temporary server."""
    if not _uses_temporary_server():
        return
    if _early_start is not None:
        _early_start.join()
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
    os.environ["PREFECT_API_URL"] = server.api_url  # read by processes started from now on
