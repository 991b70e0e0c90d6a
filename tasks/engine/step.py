"""The train step: forward, loss, backward, optimizer step, zero_grad, as the seed writes it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

LossFn = Callable[[Tensor, Tensor], Tensor]


def autocast_forward(model: nn.Module, precision: str) -> Callable[[Tensor], Tensor]:
    """The model's forward pass; under "bf16", autocast to bfloat16 with float32 outputs, so
    the loss (and through it the gradients the optimizer sees) stays float32."""
    if precision == "32":
        return model
    device_type = next(model.parameters()).device.type

    def forward(x: Tensor) -> Tensor:
        with torch.autocast(device_type, dtype=torch.bfloat16):
            out = model(x)
        return out.float()

    return forward


def make_train_step(
    model: nn.Module,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    grad_clip: float = 0.0,
    precision: str = "32",
    scheduler: Any = None,
) -> Callable[[Tensor, Tensor], Tensor]:
    """The seed's train step (forward, backward, step, zero_grad), returning the loss on the
    device instead of `.item()` (reading it would wait for the device at every step); with
    clipping, bf16 autocast and a per-step schedule if asked."""
    params = [p for p in model.parameters() if p.requires_grad]
    forward = autocast_forward(model, precision)

    def step(x: Tensor, y: Tensor) -> Tensor:
        loss = loss_fn(forward(x), y)
        loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
        return loss.detach()

    return step
