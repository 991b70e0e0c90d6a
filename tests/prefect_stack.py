"""A real Prefect server and workers for flows/test_deployments.py: started, watched, stopped."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
POOL = "trainflow-local"
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], env: dict[str, str], log: Path, cwd: Path = REPO) -> subprocess.Popen:
    """A child in its own session, so nothing we start outlives the test by accident."""
    with log.open("ab") as out:
        return subprocess.Popen(
            args,
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def kill_tree(process: subprocess.Popen | psutil.Process | int) -> None:
    """SIGKILL a process and every descendant (flow runs may sit in sessions of their own)."""
    pid = process if isinstance(process, int) else process.pid
    try:
        root = psutil.Process(pid)
        victims = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        victims = []
    for victim in victims:
        with contextlib.suppress(psutil.NoSuchProcess):
            victim.send_signal(signal.SIGKILL)
    psutil.wait_procs(victims, timeout=10)
    if isinstance(process, subprocess.Popen):
        process.wait(timeout=10)


def wait_for(what: str, check: Callable[[], Any], timeout: float, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


@dataclass
class Stack:
    """One server for the module; workers come and go (the worker-loss test kills one)."""

    home: Path
    port: int = field(default_factory=free_port)
    processes: list[subprocess.Popen] = field(default_factory=list)
    worker: subprocess.Popen | None = None  # the module's worker, on queue "default"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        bin_dir = str(Path(sys.executable).parent)  # `prefect` and `python` for up.sh
        return {
            **os.environ,
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "PREFECT_HOME": str(self.home / "prefect"),
            "PREFECT_API_URL": f"{self.url}/api",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            # Silence and settle windows are checked every second (default 5), and workers
            # poll every second (default 15): recovery shows up seconds after it is due.
            "PREFECT_SERVER_EVENTS_PROACTIVE_GRANULARITY": "PT1S",
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            # The smallest windows recovery.py accepts: CI waits seconds, not minutes.
            "TRAINFLOW_HEARTBEAT_WINDOW": "40",
            # 45 s: on a loaded machine a worker's second report of one crash came 25 s after
            # its first (recovery.py, _stays_crashed).
            "TRAINFLOW_CRASH_SETTLE": "45",
        }

    def log(self, name: str) -> Path:
        return self.home / f"{name}.log"

    def start_server(self) -> None:
        args = [
            sys.executable,
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        server = start(args, self.env, self.log("server"))
        self.processes.append(server)
        wait_for("the Prefect server", lambda: self._healthy(server), timeout=120)

    def _healthy(self, server: subprocess.Popen) -> bool:
        if server.poll() is not None:
            raise AssertionError(f"the server exited; see {self.log('server')}")
        try:
            return httpx.get(f"{self.url}/api/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def start_worker(self, queue: str = "default") -> subprocess.Popen:
        args = [
            sys.executable,
            "-m",
            "prefect",
            "worker",
            "start",
            "--pool",
            POOL,
            "--work-queue",
            queue,
            "--name",
            f"test-{queue}-{len(self.processes)}",
        ]
        worker = start(args, self.env, self.log(f"worker-{queue}"))
        self.processes.append(worker)
        return worker

    def up(self) -> str:
        """deployments/up.sh, as a user runs it; returns its output."""
        done = subprocess.run(
            ["bash", "deployments/up.sh"],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    def stop(self) -> None:
        for process in reversed(self.processes):
            kill_tree(process)

    # --- the REST API ---------------------------------------------------------------------

    def api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        # A busy SQLite server answers 503 while its database is locked; Prefect's own client
        # retries those, and so do we, rather than fail a test on the machine's load.
        response = httpx.request(method, f"{self.url}/api{path}", timeout=30, **kwargs)
        for delay in (0.5, 1, 2, 4, 8):
            if response.status_code != 503:
                break
            time.sleep(delay)
            response = httpx.request(method, f"{self.url}/api{path}", timeout=30, **kwargs)
        return response

    def deployment(self, name: str) -> dict[str, Any]:
        response = self.api("GET", f"/deployments/name/{name}")
        response.raise_for_status()
        return response.json()

    def create_run(self, deployment: str, parameters: dict[str, Any], **extra: Any) -> str:
        """A run of `deployment` with these parameters; raises on a 4xx (e.g. a bad value)."""
        deployment_id = self.deployment(deployment)["id"]
        response = self.api(
            "POST",
            f"/deployments/{deployment_id}/create_flow_run",
            json={"parameters": parameters, **extra},
        )
        response.raise_for_status()
        return response.json()["id"]

    def run(self, run_id: str) -> dict[str, Any]:
        return self.api("GET", f"/flow_runs/{run_id}").json()

    def states(self, run_id: str) -> list[dict[str, Any]]:
        states = self.api("GET", "/flow_run_states/", params={"flow_run_id": run_id}).json()
        return sorted(states, key=lambda s: s["timestamp"])

    def wait_for_state(self, run_id: str, names: set[str], timeout: float) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            run = self.run(run_id)
            return run if run["state"]["name"] in names else None

        try:
            return wait_for(f"run {run_id} to be {names}", reached, timeout)
        except AssertionError as exc:
            history = [(s["name"], s["message"]) for s in self.states(run_id)]
            raise AssertionError(f"{exc}; states so far: {history}") from None

    def flow_run_process(self, worker: subprocess.Popen, run_id: str) -> psutil.Process:
        """The worker's child that runs this flow run (`python -m prefect.engine`)."""
        matches = []
        for child in psutil.Process(worker.pid).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):  # a child that just finished
                if child.environ().get("PREFECT__FLOW_RUN_ID") == run_id:
                    matches.append(child)
        [process] = matches
        assert "prefect.engine" in process.cmdline()
        return process
