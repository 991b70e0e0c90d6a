"""Faults raised from a wrapped torch call in this process, from outside trainflow's code.

Training steps are counted at the public calls a user's own code (or profiler) would wrap:
`torch.Tensor.backward`, which the loop's `loss.backward()` is, once a step; and the
optimizer class's `step` (`torch.optim.SGD.step`, `torch.optim.Adam.step`, …), which
`optimizer.step()` ends in, once a step. (Each optimizer class defines its own `step`, so
wrapping the base class's would catch nothing; torch wraps the class's `step` in its step
hooks when an optimizer of it is made, so a wrapped one runs inside them.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


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


def around_method(monkeypatch: Any, owner: type, name: str, around: Callable[..., Any]) -> None:
    """Make every call of `owner.name` go through `around(real, *args, **kwargs)` (undone by
    monkeypatch): `args` starts with the instance, as in any method call."""
    real = getattr(owner, name)

    # No functools.wraps: it would copy torch's "already hooked" mark from a wrapped
    # optimizer step, and torch would then not run the step hooks around this one.
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        return around(real, *args, **kwargs)

    monkeypatch.setattr(owner, name, wrapped)


def fail_method_once(monkeypatch: Any, owner: type, name: str, n: int, message: str) -> list[int]:
    """Make the nth call of `owner.name` (an optimizer class's `step`, …) raise, once;
    returns `raised`."""
    fault = FailOnce(n, message)
    around_method(monkeypatch, owner, name, fault)
    return fault.raised


def fail_backward_once(monkeypatch: Any, n: int, message: str) -> list[int]:
    """Make the nth backward pass (`torch.Tensor.backward`) raise, once."""
    return fail_method_once(monkeypatch, torch.Tensor, "backward", n, message)


def fail_optimizer_step_once(
    monkeypatch: Any, optimizer: type[torch.optim.Optimizer], n: int, message: str
) -> list[int]:
    """Make the nth `optimizer.step()` of an optimizer of class `optimizer` raise, once."""
    return fail_method_once(monkeypatch, optimizer, "step", n, message)
