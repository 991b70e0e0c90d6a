"""The Prefect server on PostgreSQL, for several workers: a real server, deploy, one run."""

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from ..prefect_stack import Stack, free_port, kill_tree, start, wait_for


def _postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    return Path(found[-1]).parent if found else None


@pytest.fixture(scope="module")
def postgres_url():
    """A throwaway PostgreSQL cluster on 127.0.0.1, run as the `postgres` user (it refuses
    root); .ci/run installs Debian's package."""
    bin_dir = _postgres_bin()
    if bin_dir is None or shutil.which("runuser") is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not installed: .ci/run should have installed it")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="trainflow-pg-"))  # /tmp: reachable by `postgres`
    shutil.chown(root, "postgres")
    as_postgres = ["runuser", "-u", "postgres", "--"]
    subprocess.run(
        [
            *as_postgres,
            str(bin_dir / "initdb"),
            "-D",
            str(root / "data"),
            "--auth=trust",
            "-U",
            "postgres",
        ],
        check=True,
        capture_output=True,
    )
    port = free_port()
    server = start(
        [
            *as_postgres,
            str(bin_dir / "postgres"),
            "-D",
            str(root / "data"),
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-k",
            str(root),
        ],
        os.environ.copy(),
        root / "postgres.log",
        cwd=root,
    )
    try:
        ready = [str(bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)]
        wait_for(
            "PostgreSQL",
            lambda: subprocess.run(ready, capture_output=True).returncode == 0,
            timeout=60,
        )
        subprocess.run(
            [
                "psql",
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-U",
                "postgres",
                "-c",
                "CREATE DATABASE prefect",
            ],
            check=True,
            capture_output=True,
        )
        yield f"postgresql+asyncpg://postgres@127.0.0.1:{port}/prefect", port
    finally:
        kill_tree(server)
        with contextlib.suppress(OSError):
            shutil.rmtree(root)


class PostgresStack(Stack):
    database_url: str = ""

    @property
    def env(self) -> dict[str, str]:
        return {**super().env, "PREFECT_API_DATABASE_CONNECTION_URL": self.database_url}


def test_a_server_on_postgresql_deploys_and_completes_a_run(postgres_url, tmp_path):
    url, port = postgres_url
    stack = PostgresStack(tmp_path / "stack")
    stack.home.mkdir()
    stack.database_url = url
    try:
        stack.start_server()
        stack.up()
        stack.start_worker("default")
        params = {
            "config": {
                "runs_dir": str(tmp_path / "runs"),
                "cache_dir": str(tmp_path / "c"),
                "epochs": 5,
                "run_name": "on-postgres",
            }
        }
        run_id = stack.create_run("train/manual", params)
        stack.wait_for_state(run_id, {"Completed"}, timeout=240)
    finally:
        stack.stop()
    assert (tmp_path / "runs" / "on-postgres" / "metrics.json").is_file()
    # The run was recorded in PostgreSQL, not in a SQLite file under PREFECT_HOME.
    query = f"SELECT count(*) FROM flow_run WHERE id = '{run_id}'"
    psql = ["psql", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-d", "prefect"]
    count = subprocess.run([*psql, "-tAc", query], check=True, capture_output=True, text=True)
    assert count.stdout.strip() == "1"
    assert not list((stack.home / "prefect").glob("*.db"))
