"""One Prefect API server for the whole session, with PREFECT_HOME and storage isolated."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

# Before Prefect is imported anywhere: keep the suite off the user's ~/.prefect.
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="trainflow-tests-"))
os.environ["PREFECT_HOME"] = str(_SESSION_HOME / "prefect")
os.environ["PREFECT_LOCAL_STORAGE_PATH"] = str(_SESSION_HOME / "prefect" / "storage")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_TO_API_BATCH_INTERVAL", "0.3")
# Before trainflow.tasks.cache.keys is imported: the parsed-source memos of this session's (and
# its child processes') keys stay in its folder, not the user's ~/.cache.
os.environ["TRAINFLOW_CODE_MEMO_DIR"] = str(_SESSION_HOME / "code-memos")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def one_thread() -> Iterator[None]:
    """torch on one thread: tiny batches on a shared 2-core machine, where a second thread only
    adds contention."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def prefect_api() -> str:
    """URL of a Prefect server shared by every test that runs a flow (started once: ~20 s)."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session", autouse=True)
def _no_server_left_in_the_session_home() -> Iterator[None]:
    """A command-line run without PREFECT_API_URL starts the shared local server in its
    PREFECT_HOME and leaves it up (flows/session/server.py). In the session's home that is a test
    that forgot `subprocess_env`: stop the server, and fail the session."""
    yield
    from trainflow.flows.session.server import read_record, stop

    home = _SESSION_HOME / "prefect"
    if read_record(home) is not None:
        pytest.fail(f"a test started a Prefect server in the session's home: {stop(home)}")


@pytest.fixture
def subprocess_env(prefect_api: str, tmp_path: Path) -> dict[str, str]:
    """Environment for `python flows/train_flow.py` subprocesses: the shared server, no start-up."""
    return {**os.environ, "PREFECT_API_URL": prefect_api}


@pytest.fixture(autouse=True)
def _in_a_scratch_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Relative defaults (runs/, .trainflow/cache) land in the test's own folder."""
    monkeypatch.chdir(tmp_path)


# The inner loop, `pytest -m "not system"`, runs the pure-logic tests. A system test needs the
# Prefect server (these fixtures), runs the flows end to end (tests/flows/), or says so
# (`pytest.mark.system`: it starts processes or servers of its own).
SYSTEM_FIXTURES = {"prefect_api", "subprocess_env"}
SYSTEM_FOLDERS = {REPO / "tests" / "flows"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        in_folder = any(folder in item.path.parents for folder in SYSTEM_FOLDERS)
        if in_folder or SYSTEM_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.system)
