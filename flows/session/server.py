"""The local Prefect server that command-line runs share: found, or started once and kept.

    python -m trainflow.flows.session.server status|start|stop

A temporary server per run costs every run its boot, and takes the UI away when the run
ends. Instead the first command-line run in a PREFECT_HOME starts `prefect server start` on
127.0.0.1, detached, says so, and leaves it running for later runs and the UI; it is
recorded where Prefect records a background server, so `prefect server stop` stops it.

A server is trainflow's by its pid, its command line (`prefect server start`) and the home
and launch token in its environment, never by its start time: a step of the wall clock
moves that. A launched server is announced only once it answers on its port, from its pid,
with its home: two homes' first runs may launch on one port at the same moment, and the
one that loses it launches again on another.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, NoReturn

import psutil

try:
    import fcntl
except ImportError:  # Windows: concurrent first runs may each start a server there
    fcntl = None  # type: ignore[assignment]

HOST = "127.0.0.1"  # the API has no authentication: never another interface
RECORD = "trainflow-server.json"  # the server trainflow started: pid, token, port, version
PID_FILE = "server.pid"  # Prefect's record of a background server: `prefect server stop` reads it
LOG = "trainflow-server.log"
LOCK = "trainflow-server.lock"
# A new PREFECT_HOME migrates its database first: 45 s seen on a busy 2-core machine.
START_TIMEOUT = 300.0
# A server that has been up longer than START_TIMEOUT and doesn't answer for this long is hung.
ANSWER_TIMEOUT = 15.0
STOP_COMMAND = "prefect server stop"
TOKEN = "TRAINFLOW_SERVER_TOKEN"  # in a launched server's environment: which launch it is
# Launches on another port after losing one to a server that bound it first.
LAUNCHES = 3

# Local checks never go through a proxy, whatever HTTP_PROXY says.
_local = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ServerError(Exception):
    """No server to run against; the message is one line for the user."""


@dataclass(frozen=True)
class Record:
    pid: int
    port: int
    version: str  # Prefect's, in the process that started it
    token: str = ""  # in the server's environment: a pid reused after a restart doesn't match

    @property
    def api_url(self) -> str:
        return f"http://{HOST}:{self.port}/api"


@dataclass(frozen=True)
class Server:
    api_url: str
    pid: int | None = None  # a local server's process, when known
    started: bool = False  # launched by this call (it may still be booting)
    news: tuple[str, ...] = ()  # what the user must be told: replaced; started, once it answers
    wanted_port: int | None = None  # the configured port, when a launch had to take another


def find_or_start(home: Path, port: int, version: str) -> Server:
    """The server of this PREFECT_HOME: the one trainflow started, one the user started
    (`prefect server start`, in the background or on `port`), or a new one. Doesn't wait."""
    try:
        return _find_or_start(home, port, version)
    except OSError as exc:  # an unwritable PREFECT_HOME, a full disk
        raise ServerError(f"PREFECT_HOME {str(home)!r}: {exc.strerror or exc}") from None


def _find_or_start(home: Path, port: int, version: str) -> Server:
    news: list[str] = []
    with _locked(home):
        record = read_record(home)
        if record is not None:
            process = _process(record, home)
            if process is not None and record.version == version:
                return Server(record.api_url, record.pid)
            if process is not None:  # e.g. after `pip install -U prefect`: run what's installed
                _terminate(process)
                news.append(
                    f"Stopped the Prefect {record.version} server that trainflow had "
                    f"started (pid {record.pid})."
                )
            _forget(home, record)
        found = _background_server(home)
        if found is not None:
            return found
        wanted = port
        if not _port_free(port):
            if _serves_home(f"http://{HOST}:{port}/api", home):
                return Server(f"http://{HOST}:{port}/api")
            port = _free_port()
        record = _launch(home, port, version)
    return Server(
        record.api_url,
        record.pid,
        started=True,
        news=tuple(news),
        wanted_port=wanted if port != wanted else None,
    )


def wait_until_ready(server: Server, home: Path) -> Server:
    """The server, once it answers; a dead or silent one is a one-line ServerError.

    A server with a pid must answer from that pid, with this home: on the port of one that
    lost it to another server, that other answers. One that lost its port so is launched
    again on another; the news announces a server this call launched, once it answers.
    """
    for _ in range(LAUNCHES):
        if not _lost_port(server, home):
            return _announced(server) if server.started else replace(server, news=())
        server = _launch_again(server, home)
    raise ServerError(f"the Prefect server exited while starting{_log_tail(home)}")


def _lost_port(server: Server, home: Path) -> bool:
    """Wait until the server answers; whether it exited instead while another holds its port."""
    process = _running(server.pid)
    if server.pid is not None and process is None:
        raise ServerError(f"the Prefect server (pid {server.pid}) has exited{_log_tail(home)}")
    port = _port_of(server.api_url)
    # A server still booting gets the rest of START_TIMEOUT; an old one only ANSWER_TIMEOUT.
    booted_by = process.create_time() + START_TIMEOUT if process else 0.0
    deadline = max(booted_by, time.time() + ANSWER_TIMEOUT)
    while not _answers_as(process, port, home):
        if process is not None and (not process.is_running() or _is_zombie(process)):
            if not _port_free(port):
                return True
            raise ServerError(f"the Prefect server exited while starting{_log_tail(home)}")
        if time.time() > deadline:
            raise ServerError(
                f"the Prefect server at {server.api_url} does not answer; "
                f"stop it with `{STOP_COMMAND}` and run again{_log_tail(home)}"
            )
        time.sleep(0.1)
    return False


def _answers_as(process: psutil.Process | None, port: int, home: Path) -> bool:
    """Whether the server answering on `port` is `process` (when known), in this home."""
    api_url = f"http://{HOST}:{port}/api"
    if process is None:
        return _healthy(api_url)
    return port in _listening_ports(process) and _serves_home(api_url, home)


def _launch_again(server: Server, home: Path) -> Server:
    """After `server` lost its port: the same launch on a free one, or the one another
    command of this home launched meanwhile."""
    with _locked(home):
        record = read_record(home)
        if record is not None and record.pid == server.pid:
            _forget(home, record)
            record = _launch(home, _free_port(), record.version)
            wanted = server.wanted_port or _port_of(server.api_url)
            return Server(record.api_url, record.pid, started=True, wanted_port=wanted)
        if record is not None and _process(record, home) is not None:
            return Server(record.api_url, record.pid)
    raise ServerError(f"the Prefect server (pid {server.pid}) has exited{_log_tail(home)}")


def still_starting(home: Path) -> str | None:
    """What to say of the server launched in this home when the command ends before it
    answers, if it runs."""
    record = read_record(home)
    if record is None or _process(record, home) is None:
        return None
    return (
        f"A Prefect server is starting at http://{HOST}:{record.port} (pid {record.pid}) for "
        f"later runs; it stays up for the UI. Stop it with: {STOP_COMMAND}"
    )


def _announced(server: Server) -> Server:
    port = _port_of(server.api_url)
    busy = f"; port {server.wanted_port} is in use" if server.wanted_port else ""
    started = (
        f"Started a Prefect server at http://{HOST}:{port} (pid {server.pid}{busy}) for this "
        f"and later runs; it stays up for the UI. Stop it with: {STOP_COMMAND}"
    )
    return replace(server, news=(started,))


def stop(home: Path) -> str:
    """Stop the server trainflow started in this PREFECT_HOME; says what happened."""
    with _locked(home):
        record = read_record(home)
        process = _process(record, home) if record else None
        if record is not None:
            _forget(home, record)
        if process is None:
            return "No Prefect server started by trainflow is running."
        _terminate(process)
        return f"Stopped the Prefect server at http://{HOST}:{record.port} (pid {record.pid})."


def read_record(home: Path) -> Record | None:
    try:
        stored = json.loads((home / RECORD).read_text())
        # An older trainflow's record (with a start time, without a token) still names its server.
        names = [field.name for field in fields(Record)]
        return Record(**{name: stored[name] for name in names if name in stored})
    except (OSError, ValueError, TypeError):
        return None


def answers(api_url: str, timeout: float = 5.0) -> bool:
    """Whether anything serves HTTP at `api_url` (any status: auth and paths are Prefect's)."""
    try:
        urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False
    return True


# --- helpers ------------------------------------------------------------------------------


@contextmanager
def _locked(home: Path) -> Iterator[None]:
    """One process at a time decides and starts: two first runs must not start two servers."""
    home.mkdir(parents=True, exist_ok=True)
    with open(home / LOCK, "a") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        yield


def _launch(home: Path, port: int, version: str) -> Record:
    """`prefect server start` on `port`, detached, recorded in this home (the lock is held)."""
    token = uuid.uuid4().hex
    unset = ("PREFECT_API_URL", "PREFECT_UI_API_URL")  # the latter would name another server
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # started for the user, quietly
    env |= {
        # What recognises it later, readable by psutil from outside.
        "PREFECT_HOME": str(home.absolute()),  # absolute: the server runs in the home
        TOKEN: token,
        # Its own settings name the port it has, not the configured one it may have missed:
        # the UI's pages ask the API that /ui-settings names.
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_SERVER_UI_API_URL": f"http://{HOST}:{port}/api",
    }
    detached: dict[str, Any] = (
        {"start_new_session": True}  # not in the terminal's process group: Ctrl-C spares it
        if os.name == "posix"
        else {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.DETACHED_PROCESS}
    )
    with open(home / LOG, "wb") as log:
        # stdin, stdout and stderr are never the caller's: a CI step or a `$(…)` that reads
        # the run's output must not wait for the server to close it.
        command = [sys.executable, "-m", "prefect", "server", "start", "--host", HOST]
        process = subprocess.Popen(
            [*command, "--port", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=home,
            env=env,
            **detached,
        )
    record = Record(process.pid, port, version, token)
    (home / RECORD).write_text(json.dumps(asdict(record)))
    (home / PID_FILE).write_text(str(process.pid))
    return record


def _background_server(home: Path) -> Server | None:
    """A server the user started with `prefect server start --background` in this home."""
    try:
        pid = int((home / PID_FILE).read_text())
        process = psutil.Process(pid)
        is_server = _is_prefect_server(process.cmdline())
    except (OSError, ValueError, psutil.Error):
        is_server = False
    if not is_server:  # stale: left by a restart; `prefect server stop` would hit another pid
        (home / PID_FILE).unlink(missing_ok=True)
        return None
    for port in _listening_ports(process):
        if _serves_home(f"http://{HOST}:{port}/api", home):
            return Server(f"http://{HOST}:{port}/api", pid)
    raise ServerError(
        f"a Prefect server (pid {pid}, {home / PID_FILE}) is starting or unreachable; "
        f"run again once it is up, or stop it with `{STOP_COMMAND}`"
    )


def _is_prefect_server(command: list[str]) -> bool:
    """`prefect server start …`, or the uvicorn command its --background runs."""
    if "prefect.server.api.server:create_app" in command:
        return True
    return any(
        Path(arg).name == "prefect" and command[i + 1 : i + 3] == ["server", "start"]
        for i, arg in enumerate(command)
    )


def _listening_ports(process: psutil.Process) -> list[int]:
    try:
        connections = process.net_connections(kind="tcp")
    except psutil.Error:
        return []
    return sorted({c.laddr.port for c in connections if c.status == psutil.CONN_LISTEN})


def _serves_home(api_url: str, home: Path) -> bool:
    """Whether a Prefect server answers at `api_url` with this PREFECT_HOME (so, this database)."""
    try:
        with _local.open(f"{api_url}/admin/settings", timeout=5) as response:
            settings = json.load(response)
        return Path(settings["home"]).resolve() == home.resolve()
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _healthy(api_url: str) -> bool:
    try:
        with _local.open(f"{api_url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _process(record: Record, home: Path) -> psutil.Process | None:
    """The live server `record` names: that pid, running `prefect server start` on the
    record's port, in this home, with the record's token (a record without one predates it)."""
    process = _running(record.pid)
    if process is None:
        return None
    try:
        command, environment = process.cmdline(), process.environ()
        # An older trainflow set no PREFECT_HOME, but started its server in the home.
        started_in = environment.get("PREFECT_HOME") or process.cwd()
    except psutil.Error:  # gone, or another user's: not ours
        return None
    ours = (
        _is_prefect_server(command)
        and command[-2:] == ["--port", str(record.port)]
        and Path(started_in).resolve() == home.resolve()
        and environment.get(TOKEN, "") == record.token
    )
    return process if ours else None


def _running(pid: int | None) -> psutil.Process | None:
    try:
        process = psutil.Process(pid) if pid is not None else None
    except psutil.Error:
        return None
    return None if process is None or _is_zombie(process) else process


def _is_zombie(process: psutil.Process | None) -> bool:
    try:
        return process is not None and process.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def _terminate(process: psutil.Process) -> None:
    try:
        process.terminate()
        process.wait(timeout=30)
    except psutil.TimeoutExpired:
        process.kill()
        process.wait(timeout=30)
    except psutil.NoSuchProcess:
        pass


def _forget(home: Path, record: Record) -> None:
    (home / RECORD).unlink(missing_ok=True)
    try:
        if int((home / PID_FILE).read_text()) == record.pid:
            (home / PID_FILE).unlink()
    except (OSError, ValueError):
        pass


def _port_of(api_url: str) -> int:
    return int(api_url.rsplit(":", 1)[1].split("/")[0])


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _log_tail(home: Path) -> str:
    try:
        lines = [line for line in (home / LOG).read_text().splitlines() if line.strip()]
    except OSError:
        return ""
    return f": {lines[-1].strip()} (log: {home / LOG})" if lines else f" (log: {home / LOG})"


# --- command line -------------------------------------------------------------------------


def _settings() -> tuple[Path, int, str]:
    import prefect
    from prefect.settings import PREFECT_HOME, PREFECT_SERVER_API_PORT

    return Path(PREFECT_HOME.value()), PREFECT_SERVER_API_PORT.value(), prefect.__version__


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line naming what was wrong, not argparse's usage block first.
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv: list[str] | None = None, prog: str = "trainflow server") -> int:
    parser = _OneLineParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("status", "start", "stop"))
    command = parser.parse_args(argv).command
    home, port, version = _settings()
    if command == "stop":
        print(stop(home))
        return 0
    if command == "status":
        record = read_record(home)
        if record is None or _process(record, home) is None:
            print(f"No Prefect server started by trainflow is running (PREFECT_HOME {home}).")
            return 1
        state = "answering" if _healthy(record.api_url) else "not answering"
        print(f"http://{HOST}:{record.port} (pid {record.pid}, Prefect {record.version}): {state}")
        return 0
    try:
        server = find_or_start(home, port, version)
        for line in server.news:
            print(line, file=sys.stderr)
        server = wait_until_ready(server, home)
    except ServerError as exc:
        print(f"trainflow.flows.session.server: error: {exc}", file=sys.stderr)
        return 1
    for line in server.news:
        print(line, file=sys.stderr)
    print(server.api_url.removesuffix("/api"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
