"""The loss functions by name (ours and the project's), and the model outputs each needs."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from trainflow.tasks.engine.registered import load_registered, registered
from trainflow.tasks.errors import InputError

LossFn = Callable[[Tensor, Tensor], Tensor]

_ELEMENTWISE: dict[str, Callable[[], LossFn]] = {
    "mse": nn.MSELoss,
    "l1": nn.L1Loss,
    "huber": nn.HuberLoss,
    "bce_with_logits": nn.BCEWithLogitsLoss,
}
LOSSES = (*_ELEMENTWISE, "cross_entropy")
ELEMENTWISE = tuple(_ELEMENTWISE)  # losses that compare each output with its target


def make_loss(name: str, targets: torch.dtype = torch.float32) -> LossFn:
    """Loss `name` for targets of dtype `targets`: float32 N×T values, or int64 N class ids.
    A project's loss takes the outputs and the targets as stored."""
    if name == "cross_entropy":
        cross_entropy = nn.CrossEntropyLoss()
        if targets == torch.int64:
            return cross_entropy  # class ids as stored: what CrossEntropyLoss takes
        # A table's class ids: float32, in one column.
        return lambda pred, y: cross_entropy(pred, y[:, 0].long())
    if name in _ELEMENTWISE:
        loss = _ELEMENTWISE[name]()
        if targets.is_floating_point:
            return loss
        # Integer targets (class ids) as the values an elementwise loss compares with.
        return lambda pred, y: loss(pred, y.unsqueeze(1).to(pred.dtype))
    item = registered("losses", name)
    if item is None:
        raise InputError(f"--loss {name!r} is not a known loss")
    return load_registered(item)


def output_width(loss: str, y: Tensor, source: str = "") -> int:
    """Model outputs the loss needs: one logit per class for cross-entropy, else one per target
    (a project's loss: one per class for class ids, else one per target)."""
    where = f"data file {source!r}: " if source and source != "synthetic" else ""
    if loss == "cross_entropy":
        ids = y if y.ndim == 1 else y[:, 0]
        if y.ndim == 2 and y.shape[1] != 1:
            raise InputError(
                f"{where}--loss cross_entropy needs one target column of class ids, "
                f"y has {y.shape[1]} columns"
            )
        if ids.is_floating_point() and not torch.equal(ids, ids.round()):
            row = int((ids != ids.round()).nonzero()[0])
            raise InputError(
                f"{where}--loss cross_entropy needs class ids 0, 1, 2, …; "
                f"y, row {row} is {float(ids[row]):g}"
            )
        if bool((ids < 0).any()):
            row = int((ids < 0).nonzero()[0])
            raise InputError(f"{where}class ids must be 0 or more; y, row {row} is {ids[row]}")
        return int(ids.max()) + 1
    if loss == "bce_with_logits" and bool(((y < 0) | (y > 1)).any()):
        raise InputError(f"{where}--loss bce_with_logits needs targets between 0 and 1")
    if y.ndim == 1:
        if bool((y < 0).any()):
            raise InputError(f"{where}class ids must be 0 or more")
        return int(y.max()) + 1 if loss not in _ELEMENTWISE else 1
    return y.shape[1]


def n_classes(y: Tensor) -> int:
    """How many classes int64 class ids name (0 for float targets)."""
    return int(y.max()) + 1 if y.dtype == torch.int64 and y.ndim == 1 else 0
