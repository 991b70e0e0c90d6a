"""Faults raised from a wrapped torch call in this process, from outside trainflow's code.

A backward pass is counted at autograd's engine call: `loss.backward()` and trainflow's own
backward (`tasks/loop.py`) both end in `Variable._execution_engine.run_backward`, so a
wrapped engine counts training steps whichever of them runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.autograd.variable import Variable


class FailOnce:
    """Called as `fault(real, *args, **kwargs)`: raises RuntimeError(message) at its nth
    call, once, and makes the real call otherwise; `raised` lists the call that failed."""

    def __init__(self, n: int, message: str):
        self.n, self.message, self.calls, self.raised = n, message, 0, []

    def __call__(self, real: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls == self.n and not self.raised:
            self.raised.append(self.n)
            raise RuntimeError(self.message)
        return real(*args, **kwargs)


class WrappedEngine:
    """Autograd's engine with `run_backward` going through `around(real_run_backward, …)`;
    the rest, untouched."""

    def __init__(self, real: Any, around: Callable[..., Any]):
        self.real, self.around = real, around

    def run_backward(self, *args: Any, **kwargs: Any) -> Any:
        return self.around(self.real.run_backward, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def fail_backward_once(monkeypatch: Any, n: int, message: str) -> list[int]:
    """Make the nth backward pass raise, once (undone by monkeypatch); returns `raised`."""
    fault = FailOnce(n, message)
    engine = WrappedEngine(Variable._execution_engine, fault)
    monkeypatch.setattr(Variable, "_execution_engine", engine)
    return fault.raised


def fail_method_once(monkeypatch: Any, owner: type, name: str, n: int, message: str) -> list[int]:
    """Make the nth call of `owner.name` (an optimizer's `step`, …) raise, once."""
    fault, real = FailOnce(n, message), getattr(owner, name)

    def failing(*args: Any, **kwargs: Any) -> Any:
        return fault(real, *args, **kwargs)

    monkeypatch.setattr(owner, name, failing)
    return fault.raised
