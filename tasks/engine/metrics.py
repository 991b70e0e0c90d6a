"""Validation metrics per epoch, chosen by the loss, computed on the device.

Hand-written rather than torchmetrics: five metrics of a few tensor ops each, shaped so the
epoch's one host sync (tasks/engine/loop.py) reads them out with the losses. torchmetrics would add
a dependency whose stateful objects sync or allocate in ways we'd have to audit per version,
and the loop's budget at the seed's scale is a few microseconds an epoch.

`raw(outputs)` is a 1-D tensor of sums and counts (device, no sync), `parts(outputs)` the same
in pieces for the loop's one concatenation; `finish(raw)` turns its host copy (Python floats)
into the named values, and `measure(outputs)` does both. What depends only on the validation
targets (the count of positives, the total sum of squares) is computed once, on the device, and
read out with the rest: on the device, not even the first epoch waits for it an extra time.

A regression split of at most `HOST_VALUES` outputs is measured on the host instead: its raw
part is the outputs themselves, and MAE and R² are summed in float64 Python arithmetic from the
readout the epoch makes anyway. Each device op costs a dispatch (a kernel launch on a GPU)
whatever its size; at that size five of them cost more than a few hundred float operations in
Python. Its targets are read to the host once, at the first validation: on a GPU, the run's one
extra wait for the device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from trainflow.tasks.engine.losses import ELEMENTWISE

CLASSIFICATION = ("cross_entropy", "bce_with_logits")
HOST_VALUES = 128  # a regression split's outputs, at most, for its metrics to be summed on the host


def auroc(score: Tensor, positive: Tensor) -> Tensor:
    """Area under the ROC curve (ties count one half), as a 0-d tensor on the device: for each
    positive, the negatives scored below it, by a sort and two searchsorted (no host sync)."""
    ordered, order = torch.sort(score)
    label = positive[order].float()
    negatives_before = torch.cat([label.new_zeros(1), (1 - label).cumsum(0)])
    first = torch.searchsorted(ordered, ordered, right=False)
    after = torch.searchsorted(ordered, ordered, right=True)
    below = negatives_before[first]
    tied = negatives_before[after] - below
    n_pos = label.sum()
    return ((below + 0.5 * tied) * label).sum() / (n_pos * (len(label) - n_pos))


class ValMetrics:
    """The metrics of one loss on one validation split (targets `y`, model width `n_outputs`),
    and the project's own (`extra`: name → fn(outputs, targets) giving a number, on the
    device, from the whole split's outputs and its targets as stored)."""

    def __init__(
        self,
        loss: str,
        y: Tensor,
        n_outputs: int,
        extra: dict[str, Callable[[Tensor, Tensor], Any]] | None = None,
        builtin: bool = True,
    ):
        self.extra, self.targets = dict(extra or {}), y
        # Class ids (int64) are measured as classes whatever the loss; a project's loss on
        # values is measured as a regression where the outputs match the targets' width.
        if y.dtype == torch.int64 and y.ndim == 1:
            y = y.unsqueeze(1)
            if loss in ELEMENTWISE:  # the ids as values, as the loss compares them
                y = y.float()
            else:
                loss = "cross_entropy"
        elif loss not in CLASSIFICATION and y.shape[1] != n_outputs:
            builtin = False
        self.loss, self.n, self.builtin = loss, y.shape[0], builtin
        self.on_host = builtin and loss not in CLASSIFICATION and y.numel() <= HOST_VALUES
        self.binary = (loss == "bce_with_logits" and y.shape[1] == 1) or (
            loss == "cross_entropy" and n_outputs == 2
        )
        if not builtin:
            self.names: tuple[str, ...] = ()
            return
        if loss == "cross_entropy":
            self.y = y[:, 0].long()
            positive = self.y == 1
        elif loss == "bce_with_logits":
            self.y = y >= 0.5  # soft labels count by their nearer class
            positive = self.y[:, 0]
        else:
            self.y = y
            self.names = ("val_mae", "val_r2")
            if self.on_host:  # each column's targets as Python floats, and their total
                self.width = y.shape[1]
                self.columns = [
                    (targets, _sum_of_squares(targets)) for targets in y.double().T.tolist()
                ]
            else:  # once, not per epoch
                centred = y - y.mean(0)
                # A constant column's float32 mean may be an ulp off its value: its total is
                # still 0 (sklearn's constant-target rule below), not the rounding's residue.
                constant = (y == y[:1]).all(0)
                self.ss_tot = torch.where(constant, 0.0, (centred * centred).sum(0))
            return
        self.positive, self.n_pos = positive, positive.sum().float().unsqueeze(0)
        self.names = ("val_accuracy", "val_f1", "val_auroc") if self.binary else ("val_accuracy",)

    def raw(self, outputs: Tensor) -> Tensor:
        return torch.cat(self.parts([outputs]))

    def parts(self, batches: list[Tensor]) -> list[Tensor]:
        """`raw` of the batches' outputs (in order) in pieces, for the loop to concatenate with
        the losses in its one readout; the project's metrics last, one value each."""
        if not self.extra:
            return self._builtin_parts(batches)
        outputs = batches[0] if len(batches) == 1 else torch.cat(batches)
        values = [
            torch.as_tensor(fn(outputs, self.targets), device=outputs.device)
            .detach()
            .float()
            .reshape(1)
            for fn in self.extra.values()
        ]
        return [*(self._builtin_parts([outputs]) if self.builtin else []), *values]

    def _builtin_parts(self, batches: list[Tensor]) -> list[Tensor]:
        if self.on_host:  # each batch's outputs flat: a view, where a concatenation is an op
            return [
                out.flatten() if out.dtype == torch.float32 else out.float().flatten()
                for out in batches
            ]
        outputs = batches[0] if len(batches) == 1 else torch.cat(batches)
        outputs = outputs.float()
        if self.loss == "cross_entropy":
            predicted = outputs.argmax(1)
            correct = (predicted == self.y).sum()
            if not self.binary:
                return [correct.unsqueeze(0)]
            said_pos, score = predicted == 1, outputs[:, 1] - outputs[:, 0]
        elif self.loss == "bce_with_logits":
            said = outputs > 0
            correct = (said == self.y).sum()
            if not self.binary:
                return [correct.unsqueeze(0)]
            said_pos, score = said[:, 0], outputs[:, 0]
        else:
            error = outputs - self.y
            return [error.abs().sum(0), error.square().sum(0), self.ss_tot]
        counts = torch.stack([correct, (said_pos & self.positive).sum(), said_pos.sum()])
        return [counts, auroc(score, self.positive).unsqueeze(0), self.n_pos]

    def measure(self, outputs: Tensor) -> dict[str, float]:
        """The named values of `outputs` at once (one host sync)."""
        return self.finish(self.raw(outputs).tolist())

    def finish(self, raw: list[float]) -> dict[str, float]:
        if not self.extra:
            return self._finish_builtin(raw)
        k = len(self.extra)
        named = self._finish_builtin(raw[:-k]) if self.builtin else {}
        return named | {
            f"val_{name}": value for name, value in zip(self.extra, raw[-k:], strict=True)
        }

    def _finish_builtin(self, raw: list[float]) -> dict[str, float]:
        if self.loss not in CLASSIFICATION:
            if self.on_host:
                return self._regression_on_host(raw)
            if len(raw) == 3:  # one target: the same float64 arithmetic, without numpy's calls
                abs_sum, res, tot = raw
                return {"val_mae": abs_sum / self.n, "val_r2": _r2(res, tot)}
            abs_sums, ss_res, ss_tot = np.split(np.asarray(raw), 3)
            r2 = [_r2(res, tot) for res, tot in zip(ss_res.tolist(), ss_tot.tolist(), strict=True)]
            mae = abs_sums.sum() / abs_sums.size / self.n
            return {"val_mae": float(mae), "val_r2": float(np.mean(r2))}
        width = 1 if self.loss == "cross_entropy" else self.y.shape[1]
        values = {"val_accuracy": float(raw[0] / (self.n * width))}
        if self.binary:
            true_pos, said_pos, area, n_pos = raw[1:]
            denominator = said_pos + n_pos
            values["val_f1"] = float(2 * true_pos / denominator) if denominator else 0.0
            if 0 < n_pos < self.n:  # else undefined: one class only in the validation split
                values["val_auroc"] = float(area)
        return values

    def _regression_on_host(self, outputs: list[float]) -> dict[str, float]:
        """MAE and R² of the outputs' host copy (row-major), in float64."""
        abs_sum, r2_sum, width = 0.0, 0.0, self.width
        for column, (targets, tot) in enumerate(self.columns):
            column_abs, res = 0.0, 0.0
            for out, target in zip(outputs[column::width], targets, strict=True):
                error = out - target
                column_abs += abs(error)
                res += error * error
            abs_sum += column_abs
            r2_sum += _r2(res, tot)
        return {"val_mae": abs_sum / (self.n * width), "val_r2": r2_sum / width}


def _r2(ss_res: float, ss_tot: float) -> float:
    # sklearn's r2_score: a constant target scores 1 if predicted exactly, else 0.
    return 1 - ss_res / ss_tot if ss_tot > 0 else float(ss_res == 0)


def _sum_of_squares(values: list[float]) -> float:
    """The sum of squared deviations from the mean, in float64."""
    mean = math.fsum(values) / len(values)
    return math.fsum((v - mean) ** 2 for v in values)
