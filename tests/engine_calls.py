"""Faults in the call into autograd's engine that every backward pass makes, from outside
trainflow's code: `loss.backward()` and trainflow's own backward (`tasks/loop.py`) both end
in `Variable._execution_engine.run_backward`, so a wrapped engine counts training steps
whichever of them runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.autograd.variable import Variable

# around(run_backward, *args, **kwargs): the wrapper, given the real call to make or not.
Around = Callable[..., Any]


class WrappedEngine:
    """Autograd's engine with `run_backward` going through `around`; the rest, untouched."""

    def __init__(self, real: Any, around: Around):
        self.real, self.around = real, around

    def run_backward(self, *args: Any, **kwargs: Any) -> Any:
        return self.around(self.real.run_backward, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def fail_backward_once(monkeypatch: Any, n: int, message: str) -> list[int]:
    """Make the nth backward pass raise RuntimeError(message), once (undone by monkeypatch).
    Returns the list the failing call number is appended to."""
    calls, raised = [0], []

    def failing(run_backward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == n and not raised:
            raised.append(n)
            raise RuntimeError(message)
        return run_backward(*args, **kwargs)

    engine = WrappedEngine(Variable._execution_engine, failing)
    monkeypatch.setattr(Variable, "_execution_engine", engine)
    return raised
