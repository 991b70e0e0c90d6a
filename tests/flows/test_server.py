"""One server policy for every command line: found or started once, announced, never orphaned.

These tests start real servers in PREFECT_HOMEs and on ports of their own, never the
session's. A process is the test's if its environment carries the test's tag: that finds
the CLI's children and grandchildren even once they are detached and re-parented to init.
"""

import contextlib
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import psutil
import pytest

from trainflow.flows.session.server import PID_FILE, RECORD, read_record

from ..conftest import REPO

TAG = "TRAINFLOW_TEST_TAG"
UI_LINE = re.compile(r"Prefect UI: http://127\.0\.0\.1:(\d+)/runs/flow-run/([0-9a-f-]{36})")
STARTED = re.compile(r"Started a Prefect server at http://127\.0\.0\.1:(\d+) \(pid (\d+)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(home: Path, port: int, tag: str, **extra: str) -> dict[str, str]:
    """A user's shell: no PREFECT_API_URL, this home, this preferred port."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return {
        **env,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_API_PORT": str(port),
        TAG: tag,
        **extra,
    }


def _left_alive(*tags: str) -> set[int]:
    """Every live process whose environment carries one of `tags`."""
    alive = set()
    for process in psutil.process_iter():
        try:
            if process.environ().get(TAG) in tags and process.status() != psutil.STATUS_ZOMBIE:
                alive.add(process.pid)
        except psutil.Error:
            continue
    return alive


def _script(name: str) -> str:
    return str(REPO / "flows" / name)


def _run(cwd: Path, env: dict[str, str], *args: str) -> tuple[int, list[str]]:
    """A whole command, stdout and stderr as one terminal shows them."""
    result = subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=900,
    )
    return result.returncode, result.stdout.strip().splitlines()


class Running:
    """A command in the background whose output is read line by line, with deadlines."""

    def __init__(self, cwd: Path, env: dict[str, str], *args: str):
        self.process = subprocess.Popen(
            [sys.executable, *args],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            process_group=0,  # as a terminal's job
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_for(self, pattern: str, timeout: float = 600) -> str:
        deadline = time.monotonic() + timeout
        while True:
            line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            if line is None:
                raise AssertionError(f"ended without {pattern!r}:\n" + "\n".join(self.seen))
            self.seen.append(line)
            if re.search(pattern, line):
                return line

    def finish(self, timeout: float = 600) -> int:
        """Every line to the end; the exit code."""
        deadline = time.monotonic() + timeout
        while (line := self.lines.get(timeout=max(0.0, deadline - time.monotonic()))) is not None:
            self.seen.append(line)
        return self.process.wait(timeout=60)

    def kill(self, signum: int) -> int:
        self.process.send_signal(signum)
        return self.process.wait(timeout=120)


def _flow_run(port: int, flow_run_id: str) -> dict:
    url = f"http://127.0.0.1:{port}/api/flow_runs/{flow_run_id}"
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


def _gone(pid: int, timeout: float = 60) -> bool:
    with contextlib.suppress(psutil.NoSuchProcess):
        psutil.Process(pid).wait(timeout=timeout)
    return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_a_new_home_gets_one_announced_server_that_only_stop_removes(tmp_path):
    home, port = tmp_path / "prefect-home", _free_port()
    home.mkdir()
    # A stale Prefect pid file naming a live process that is no server (after a restart, pids
    # are reused): it must be replaced, or `prefect server stop` would signal that process.
    (home / PID_FILE).write_text(str(os.getpid()))
    tags = [f"{name}-{uuid.uuid4().hex}" for name in ("fresh", "used", "term", "kill", "new")]
    fresh, used, term, kill, new = tags
    epochs = ["--epochs", "3", "--runs-dir", str(tmp_path / "runs")]

    # The preferred port is taken by something that is not this home's Prefect server.
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", port))
        blocker.listen()
        code, out = _run(tmp_path, _env(home, port, fresh), _script("train_flow.py"), *epochs)
    assert code == 0, "\n".join(out)
    (started,) = [line for line in out if STARTED.match(line)]
    assert f"port {port} is in use" in started and "Stop it with: prefect server stop" in started
    server_port, pid = map(int, STARTED.match(started).groups())
    assert server_port != port
    # The output ends with the run's page, on the server that stays up.
    ui = UI_LINE.fullmatch(out[-1])
    assert ui and int(ui[1]) == server_port, out[-3:]
    assert _flow_run(server_port, ui[2])["state"]["type"] == "COMPLETED"
    assert _left_alive(*tags) == {pid}
    assert (home / PID_FILE).read_text() == str(pid)

    # A used home: the same server, nothing said about it, nothing more left running.
    code, out = _run(tmp_path, _env(home, port, used), _script("train_flow.py"), *epochs)
    assert code == 0, "\n".join(out)
    assert not any(STARTED.match(line) for line in out)
    assert int(UI_LINE.fullmatch(out[-1])[1]) == server_port
    assert _left_alive(*tags) == {pid}

    # Killed mid-training, politely or not: the server stays, nothing else does.
    long = ["--epochs", "1000000", "--runs-dir", str(tmp_path / "runs"), "--no-cache"]
    for tag, signum, code in (
        (term, signal.SIGTERM, 128 + signal.SIGTERM),
        (kill, signal.SIGKILL, -signal.SIGKILL),
    ):
        running = Running(tmp_path, _env(home, port, tag), _script("train_flow.py"), *long)
        running.wait_for(r"epoch \d+/1000000")
        assert running.kill(signum) == code
        assert _left_alive(*tags) == {pid}

    # The server of an older Prefect is replaced by one of the installed version, and said so.
    record = json.loads((home / RECORD).read_text())
    (home / RECORD).write_text(json.dumps({**record, "version": "3.0.0"}))
    code, out = _run(tmp_path, _env(home, port, new), _script("train_flow.py"), *epochs)
    assert code == 0, "\n".join(out)
    assert f"Stopped the Prefect 3.0.0 server that trainflow had started (pid {pid})." in out
    (started,) = [line for line in out if STARTED.match(line)]
    new_port, new_pid = map(int, STARTED.match(started).groups())
    assert _gone(pid) and _left_alive(*tags) == {new_pid}
    assert int(UI_LINE.fullmatch(out[-1])[1]) == new_port

    # The announced command stops it, and it alone (the pid file's old tenant lives on).
    code, out = _run(tmp_path, _env(home, port, "stop"), "-m", "prefect", "server", "stop")
    assert code == 0, "\n".join(out)
    assert _gone(new_pid) and _left_alive(*tags) == set()
    assert psutil.pid_exists(os.getpid()) and not (home / PID_FILE).exists()


def _stop_all(*tags: str) -> None:
    """What a failed test left: every tagged process, ended (a passing test left none)."""
    for pid in _left_alive(*tags):
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(pid)
            process.kill()
            process.wait(timeout=30)


def _serves(port: int) -> Path:
    """The PREFECT_HOME of the server answering on `port`, so the database it writes."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/admin/settings", timeout=30) as r:
        return Path(json.load(r)["home"])


def test_two_new_homes_started_at_once_each_get_their_own_server(tmp_path):
    # Both prefer one free port: both see it free, both launch there, one server loses it.
    port, homes = _free_port(), [tmp_path / "home-a", tmp_path / "home-b"]
    tags = [f"race-{name}-{uuid.uuid4().hex}" for name in ("a", "b")]
    try:
        commands = [
            Running(
                tmp_path,
                _env(home, port, tag),
                _script("train_flow.py"),
                *["--epochs", "2", "--runs-dir", str(home.parent / f"runs-{home.name}")],
            )
            for home, tag in zip(homes, tags, strict=True)
        ]
        ends = []
        for command in commands:
            assert command.finish() == 0, "\n".join(command.seen)
            (started,) = [line for line in command.seen if STARTED.match(line)]
            server_port, pid = map(int, STARTED.match(started).groups())
            assert (f"port {port} is in use" in started) == (server_port != port), started
            ends.append((server_port, pid, UI_LINE.fullmatch(command.seen[-1])[2]))
        # One won the preferred port; the other said it took another.
        assert sorted(end[0] == port for end in ends) == [False, True]
        assert ends[0][1] != ends[1][1]
        for home, tag, (server_port, pid, flow_run_id) in zip(homes, tags, ends, strict=True):
            assert _left_alive(tag) == {pid}  # the announced one answers, in its own home
            assert read_record(home).pid == pid and (home / PID_FILE).read_text() == str(pid)
            assert _serves(server_port).resolve() == home.resolve()
            assert _flow_run(server_port, flow_run_id)["state"]["type"] == "COMPLETED"
        for home in homes:
            code, out = _run(
                tmp_path, _env(home, port, "stop"), "-m", "trainflow.flows.session.server", "stop"
            )
            assert code == 0 and out[-1].startswith("Stopped the Prefect server"), out
        assert _left_alive(*tags) == set()
    finally:
        _stop_all(*tags)


def test_a_server_started_off_the_configured_port_shows_its_own_api_in_the_ui(tmp_path):
    home, port, tag = tmp_path / "prefect-home", _free_port(), f"ui-{uuid.uuid4().hex}"
    try:
        with socket.socket() as blocker:
            blocker.bind(("127.0.0.1", port))
            blocker.listen()
            code, out = _run(
                tmp_path, _env(home, port, tag), "-m", "trainflow.flows.session.server", "start"
            )
        assert code == 0, "\n".join(out)
        server_port = int(out[-1].rsplit(":", 1)[1])
        assert server_port != port
        # What the browser asks before it shows a run page: the API it then talks to.
        url = f"http://127.0.0.1:{server_port}/ui-settings"
        with urllib.request.urlopen(url, timeout=30) as response:
            api_url = json.load(response)["api_url"]
        assert api_url == f"http://127.0.0.1:{server_port}/api"
        code, out = _run(
            tmp_path, _env(home, port, "stop"), "-m", "trainflow.flows.session.server", "stop"
        )
        assert code == 0 and _left_alive(tag) == set(), out
    finally:
        _stop_all(tag)


def test_a_step_of_the_wall_clock_leaves_the_server_stoppable(tmp_path):
    home, port, tag = tmp_path / "prefect-home", _free_port(), f"clock-{uuid.uuid4().hex}"
    try:
        code, out = _run(
            tmp_path, _env(home, port, tag), "-m", "trainflow.flows.session.server", "start"
        )
        assert code == 0, "\n".join(out)
        (pid,) = _left_alive(tag)
        # A step of the wall clock moves every process's start time as psutil computes it
        # (boot time + ticks since boot): here, seen from the stopping command only.
        clock = tmp_path / "clock-step"
        clock.mkdir()
        (clock / "sitecustomize.py").write_text(
            "import psutil\n"
            "real = psutil.Process.create_time\n"
            "psutil.Process.create_time = lambda self: real(self) + 7.0\n"
        )
        stepped = _env(home, port, "stop", PYTHONPATH=os.pathsep.join([str(clock), str(REPO)]))
        code, out = _run(tmp_path, stepped, "-m", "trainflow.flows.session.server", "status")
        assert code == 0 and out[-1].endswith("answering"), out
        code, out = _run(tmp_path, stepped, "-m", "trainflow.flows.session.server", "stop")
        assert out[-1] == f"Stopped the Prefect server at http://127.0.0.1:{port} (pid {pid}).", out
        assert code == 0 and _gone(pid) and _left_alive(tag) == set()
        assert read_record(home) is None and not (home / PID_FILE).exists()
    finally:
        _stop_all(tag)


def test_ctrl_c_while_a_new_server_boots_leaves_just_that_server(tmp_path):
    home, port = tmp_path / "prefect-home", _free_port()
    tag = f"boot-{uuid.uuid4().hex}"
    running = Running(tmp_path, _env(home, port, tag), _script("train_flow.py"), "--epochs", "3")
    # The command records its server as it launches it, seconds before that server answers.
    deadline = time.monotonic() + 300
    while (record := read_record(home)) is None:
        assert time.monotonic() < deadline and running.process.poll() is None
        time.sleep(0.02)
    # A terminal's Ctrl-C signals its whole foreground process group: the CLI's, not the
    # server's, which runs in a session of its own.
    os.killpg(running.process.pid, signal.SIGINT)
    running.finish()
    # Not yet announced, so said on the way out.
    pid = record.pid
    starting = f"A Prefect server is starting at http://127.0.0.1:{port} (pid {pid})"
    assert any(line.startswith(starting) for line in running.seen), running.seen
    assert _left_alive(tag) == {pid}
    code, out = _run(
        tmp_path, _env(home, port, "stop"), "-m", "trainflow.flows.session.server", "stop"
    )
    assert code == 0
    assert out[-1] == f"Stopped the Prefect server at http://127.0.0.1:{port} (pid {pid})."
    assert _gone(pid) and _left_alive(tag) == set() and read_record(home) is None


@pytest.mark.parametrize("runner", ["threads", "dask"])
def test_a_first_command_sweep_reports_every_trial_to_the_server_it_started(tmp_path, runner):
    # Prefect #16397: a sweep as a new user's first command once died before its first trial.
    if runner == "dask":
        pytest.importorskip("prefect_dask")
    home, port = tmp_path / "prefect-home", _free_port()
    tag = f"sweep-{runner}-{uuid.uuid4().hex}"
    code, out = _run(
        tmp_path,
        _env(home, port, tag),
        _script("sweep_flow.py"),
        "--grid",
        "lr=0.05,0.1",
        "--epochs",
        "5",
        "--runner",
        runner,
        "--max-concurrency",
        "2",
        "--sweep-name",
        "s",
    )
    assert code == 0, "\n".join(out)
    pid = int(next(STARTED.match(line) for line in out if STARTED.match(line))[2])
    ui = UI_LINE.fullmatch(out[-1])
    assert ui and int(ui[1]) == port
    # The trials ran as flow runs (on Dask: in worker processes, which reached this server
    # only through the address the command handed them).
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/flow_runs/filter",
        method="POST",
        data=json.dumps({"flows": {"name": {"any_": ["train"]}}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        trials = json.load(response)
    assert len(trials) == 2 and {t["state"]["type"] for t in trials} == {"COMPLETED"}
    assert {t["parent_task_run_id"] is not None for t in trials} == {True}
    assert _left_alive(tag) == {pid}  # a Dask cluster went with the command
    code, out = _run(
        tmp_path, _env(home, port, "stop"), "-m", "trainflow.flows.session.server", "stop"
    )
    assert code == 0 and _gone(pid) and _left_alive(tag) == set()


def test_a_server_address_in_the_environment_is_used_and_nothing_is_started(tmp_path, prefect_api):
    home, tag = tmp_path / "prefect-home", f"api-url-{uuid.uuid4().hex}"
    env = _env(home, _free_port(), tag, PREFECT_API_URL=prefect_api)
    code, out = _run(tmp_path, env, _script("train_flow.py"), "--epochs", "2")
    assert code == 0, "\n".join(out)
    assert not any(STARTED.match(line) for line in out)
    assert f"http://127.0.0.1:{UI_LINE.fullmatch(out[-1])[1]}/api" == prefect_api
    assert read_record(home) is None and _left_alive(tag) == set()


def test_a_failed_run_ends_with_its_page_then_the_error(tmp_path, prefect_api):
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    missing = tmp_path / "missing.npz"
    code, out = _run(tmp_path, env, _script("train_flow.py"), "--data", str(missing))
    assert code == 2
    assert out[-1] == f"train_flow.py: error: data file {str(missing)!r}: not found"
    port, flow_run_id = UI_LINE.fullmatch(out[-2]).groups()
    assert _flow_run(int(port), flow_run_id)["state"]["type"] == "FAILED"


def test_an_address_where_nothing_answers_is_a_one_line_error(tmp_path):
    home, tag = tmp_path / "prefect-home", f"nothing-{uuid.uuid4().hex}"
    api = f"http://127.0.0.1:{_free_port()}/api"
    code, out = _run(
        tmp_path,
        _env(home, _free_port(), tag, PREFECT_API_URL=api),
        _script("train_flow.py"),
        "--epochs",
        "2",
    )
    assert code == 1
    assert out[-1] == f"train_flow.py: error: PREFECT_API_URL {api}: no server answers there"
    assert "Traceback" not in "\n".join(out)
    assert read_record(home) is None and _left_alive(tag) == set()


def test_a_server_the_user_runs_in_this_home_on_the_preferred_port_is_found(tmp_path, prefect_api):
    """The session's server stands in for a `prefect server start` in another terminal."""
    home = Path(os.environ["PREFECT_HOME"])
    port = int(prefect_api.split(":")[-1].split("/")[0])
    tag = f"found-{uuid.uuid4().hex}"
    code, out = _run(tmp_path, _env(home, port, tag), _script("train_flow.py"), "--epochs", "2")
    assert code == 0, "\n".join(out)
    assert not any(STARTED.match(line) for line in out)
    assert int(UI_LINE.fullmatch(out[-1])[1]) == port
    assert read_record(home) is None and _left_alive(tag) == set()


def test_the_cache_command_needs_no_server_and_starts_none(tmp_path):
    home, tag = tmp_path / "prefect-home", f"cache-{uuid.uuid4().hex}"
    code, out = _run(tmp_path, _env(home, _free_port(), tag), _script("cache_cli.py"), "list")
    assert code == 0 and out[-1].startswith("0 entries")
    assert read_record(home) is None and _left_alive(tag) == set()


def test_a_prefect_home_that_cannot_be_written_is_a_one_line_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    home, tag = blocker / "prefect-home", f"no-home-{uuid.uuid4().hex}"
    code, out = _run(tmp_path, _env(home, _free_port(), tag), _script("train_flow.py"))
    assert code == 1
    assert out[-1] == f"train_flow.py: error: PREFECT_HOME {str(home)!r}: Not a directory"
    assert "Traceback" not in "\n".join(out) and _left_alive(tag) == set()
