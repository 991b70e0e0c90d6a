"""How training stops early: SIGINT/SIGTERM turned into a request the loop honours at its
next pause point, and the exception that says what was saved."""

from __future__ import annotations

import signal
import threading
from typing import Any


class Interrupted(BaseException):
    """SIGINT/SIGTERM arrived during training; the message says what was saved.

    A BaseException, like KeyboardInterrupt, so Prefect reports a crash and does not retry.
    """

    def __init__(self, signum: int, epoch: int, batch: int, outcome: str):
        where = f"epoch {epoch}, batch {batch}"
        super().__init__(f"interrupted by {signal.Signals(signum).name} at {where}; {outcome}")
        self.signum = signum


class StopSignals:
    """Turn SIGINT/SIGTERM into a request the loop honours at the next step."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # signals reach only it
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._request)
        return self

    def _request(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
