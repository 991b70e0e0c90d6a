"""The loss functions by name, and the model outputs each needs."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from trainflow.tasks.errors import InputError

LossFn = Callable[[Tensor, Tensor], Tensor]

_ELEMENTWISE: dict[str, Callable[[], LossFn]] = {
    "mse": nn.MSELoss,
    "l1": nn.L1Loss,
    "huber": nn.HuberLoss,
    "bce_with_logits": nn.BCEWithLogitsLoss,
}
LOSSES = (*_ELEMENTWISE, "cross_entropy")


def make_loss(name: str) -> LossFn:
    if name == "cross_entropy":
        cross_entropy = nn.CrossEntropyLoss()
        # y holds class ids as float32 in one column (load-tensors' contract); CE wants int64.
        return lambda pred, y: cross_entropy(pred, y[:, 0].long())
    return _ELEMENTWISE[name]()


def output_width(loss: str, y: Tensor) -> int:
    """Model outputs the loss needs: one logit per class for cross-entropy, else one per target."""
    if loss == "cross_entropy":
        if y.shape[1] != 1 or not torch.equal(y, y.round()) or bool((y < 0).any()):
            raise InputError("--loss cross_entropy needs one target column of class ids 0, 1, 2, …")
        return int(y.max()) + 1
    if loss == "bce_with_logits" and bool(((y < 0) | (y > 1)).any()):
        raise InputError("--loss bce_with_logits needs targets between 0 and 1")
    return y.shape[1]
