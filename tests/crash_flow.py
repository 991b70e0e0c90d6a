"""A flow that dies as if the kernel's OOM killer took it: the attempt-cap tests' victim."""

import os
import signal
from pathlib import Path

from prefect import flow

# Given to one test run through its job variables: once that run has crashed, its re-runs die
# while loading this file, before they start Running, like code that no longer imports.
MARKER = os.environ.get("TRAINFLOW_TEST_CRASH_MARKER")
if MARKER and Path(MARKER).exists():
    raise ImportError("this flow's code no longer loads")


@flow(name="always-crashes")
def always_crashes() -> None:
    if MARKER:
        Path(MARKER).touch()
    os.kill(os.getpid(), signal.SIGKILL)
