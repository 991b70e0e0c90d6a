"""Learning-rate schedules (torch's own classes) and early stopping, as train-epochs runs them."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import (
    CosineAnnealingLR,
    LinearLR,
    LRScheduler,
    OneCycleLR,
    SequentialLR,
    StepLR,
)

from trainflow.tasks.engine.options import TrainingOptions


def make_scheduler(
    optimizer: torch.optim.Optimizer, options: TrainingOptions, epochs: int, steps_per_epoch: int
) -> tuple[LRScheduler | None, bool]:
    """The schedule, and whether it steps after every optimizer step (else after each epoch).

    Warm-up: epoch e < W trains at lr·(e+1)/(W+1), then the schedule starts from lr. OneCycle
    has its own rise (over the W warm-up epochs) and steps per step, as it is meant to; the
    others change the lr once an epoch, which costs nothing per step.
    """
    warmup = options.warmup_epochs
    if options.lr_schedule == "onecycle":
        return OneCycleLR(
            optimizer,
            max_lr=optimizer.param_groups[0]["lr"],
            total_steps=epochs * steps_per_epoch,
            pct_start=warmup / epochs,
            cycle_momentum=False,  # the lr alone: plain SGD has no momentum to cycle
        ), True
    main: LRScheduler | None = None
    if options.lr_schedule == "step":
        main = StepLR(optimizer, step_size=options.step_size, gamma=options.gamma)
    elif options.lr_schedule == "cosine":
        # TrainConfig keeps an epoch after the warm-up; a direct caller may not (a benchmark's
        # short warm-up run): then the run ends with the warm-up, and T_max 1 is never reached.
        main = CosineAnnealingLR(optimizer, T_max=max(1, epochs - warmup), eta_min=options.min_lr)
    if warmup == 0:
        return main, False
    warm = LinearLR(optimizer, start_factor=1 / (warmup + 1), end_factor=1.0, total_iters=warmup)
    if main is None:
        return warm, False
    return SequentialLR(optimizer, [warm, main], milestones=[warmup]), False


class EarlyStopping:
    """Stop once `patience` epochs in a row fail to beat the best validation loss by more than
    `min_delta`. Its whole state follows from the loss history, so a resumed run replays the
    checkpoint's history instead of storing a counter beside it (one source of truth)."""

    def __init__(self, patience: int, min_delta: float, history: list[float] = ()):
        self.patience, self.min_delta = patience, min_delta
        self.best, self.wait, self.stopped_at = math.inf, 0, None
        for epoch, val_loss in enumerate(history):
            self.update(epoch, val_loss)

    def update(self, epoch: int, val_loss: float) -> bool:
        """Record epoch `epoch`'s validation loss; True once training should stop."""
        if not self.patience or self.stopped_at is not None:
            return self.stopped_at is not None
        if val_loss < self.best - self.min_delta:
            self.best, self.wait = val_loss, 0
        else:
            self.wait += 1
            if self.wait >= self.patience:
                self.stopped_at = epoch
        return self.stopped_at is not None
