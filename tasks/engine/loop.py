"""The epoch loop of train-epochs: steps, a pause point after each where it checkpoints or
stops, and the state it starts from."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from trainflow.tasks.data.batches import Batches
from trainflow.tasks.engine.checkpoint import Checkpoints, TrainState
from trainflow.tasks.engine.metrics import ValMetrics
from trainflow.tasks.engine.options import TrainingOptions
from trainflow.tasks.engine.ranks import SINGLE_PROCESS, Ranks
from trainflow.tasks.engine.schedules import EarlyStopping, make_scheduler
from trainflow.tasks.engine.step import LossFn, autocast_forward, make_train_step
from trainflow.tasks.engine.stops import Interrupted, StopSignals
from trainflow.tasks.errors import NonFiniteLoss

# (epoch, training loss, validation loss, the epoch's metrics and lr by name)
EpochHook = Callable[[int, float, float, dict[str, float]], None]


@dataclass
class History:
    train: list[float] = field(default_factory=list)
    val: list[float] = field(default_factory=list)
    metrics: dict[str, list[float]] = field(default_factory=dict)  # per name, "lr" too
    best: dict[str, Tensor] = field(default_factory=dict)  # export best: the best epoch's weights
    stopped_early_at: int | None = None  # the epoch early stopping ended training after


def rng_states(device: torch.device) -> dict[str, Tensor]:
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def restore_rng_states(states: dict[str, Tensor], device: torch.device) -> None:
    torch.set_rng_state(states["cpu"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


def seed_rngs(seed: int, device: torch.device) -> None:
    """Seed the global RNGs training may draw from (CPU, and this CUDA device only)."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)


def seed_mean(values: list[float]) -> float:
    """The seed's `np.mean` over its Python floats, bit for bit, without numpy's calls where it
    adds up left to right: below 8 values its pairwise sum is that plain loop (Python's `sum`
    is not, from 3.12: it compensates). tests/engine/test_train.py holds this to np.mean."""
    if len(values) >= 8:
        return float(np.add.reduce(np.array(values))) / len(values)
    total = 0.0
    for value in values:
        total += value
    return total / len(values)


def _first_bad(losses: Tensor | np.ndarray | list[float]) -> int:
    bad = ~np.isfinite(np.asarray(losses))
    return int(np.flatnonzero(bad)[0]) if bad.any() else -1


class EpochLoop:
    """One attempt at training: epochs of steps, and a pause point after every step and every
    epoch where it checkpoints or stops.

    An attempt starts from its arguments and `resume` alone: the shuffle generator is made
    here, the model and optimizer by the caller for this attempt, so a retried task trains
    exactly what an uninterrupted one does. Per-batch losses stay on the device instead of
    being `.item()`-ed, so the host waits once per epoch, not once per step; kept per batch,
    they also say which batch went bad.
    """

    def __init__(
        self,
        model: nn.Module,
        train: Batches,
        val: Batches,
        loss_fn: LossFn,
        optimizer: torch.optim.Optimizer,
        epochs: int,
        on_epoch: EpochHook | None = None,
        checkpoints: Checkpoints | None = None,
        resume: TrainState | None = None,
        stop: StopSignals | None = None,
        *,
        options: TrainingOptions = TrainingOptions(),  # noqa: B008 (frozen)
        metrics: Callable[[Tensor], ValMetrics] | None = None,
        ranks: Ranks = SINGLE_PROCESS,
        augment: Callable[[Tensor, int, int], Tensor] | None = None,
    ):
        self.model, self.train, self.val, self.loss_fn = model, train, val, loss_fn
        self.ranks = ranks
        # Under DDP the steps go through its wrapper (it all-reduces the gradients); the
        # validation and the state go to the model itself. One process: the model itself.
        self.trained = ranks.wrap(model)
        self.optimizer, self.epochs, self.on_epoch = optimizer, epochs, on_epoch
        self.checkpoints, self.stop, self.options = checkpoints, stop, options
        # (x, epoch, batch) -> x: its draws depend on those alone, so a resumed epoch's
        # remaining batches are transformed as an uninterrupted one's (tasks/engine/augment.py).
        self.augment = augment
        # Built from the validation targets at the first validation: they are read only there.
        self.make_metrics, self.metrics = metrics, None
        self.device = next(model.parameters()).device
        self.scheduler, per_step = make_scheduler(optimizer, options, epochs, len(train))
        self.step = make_train_step(
            self.trained,
            ranks.shard_loss(loss_fn),
            optimizer,
            options.grad_clip,
            options.precision,
            self.scheduler if per_step else None,
        )
        self.epoch_scheduler = None if per_step else self.scheduler
        self.forward = autocast_forward(model, options.precision)
        self.shuffle = train.shuffle()
        self.history, self.start_epoch, self.start_losses = History(), 0, []
        self.next_start: dict[str, Tensor] | None = None
        self.fenced_out = False  # the fence refused the last checkpoint
        if resume is not None:
            self.history = History(
                list(resume.train_loss),
                list(resume.val_loss),
                {name: list(values) for name, values in resume.metrics.items()},
                {k: v.to(self.device) for k, v in resume.best.items()},
            )
            self.start_epoch = resume.epoch
            done = ranks.own_losses(resume.batch_losses)
            self.start_losses = list(done.to(self.device).unbind())
            if self.shuffle is not None:
                self.shuffle.set_state(resume.loader["generator"])
            if self.scheduler is not None:
                self.scheduler.load_state_dict(resume.scheduler)
                for group, lr in zip(
                    optimizer.param_groups, self.scheduler.get_last_lr(), strict=True
                ):
                    group["lr"] = lr  # where the schedule had it, not the config's start
        stopping = options.early_stopping_patience, options.early_stopping_min_delta
        self.early = EarlyStopping(*stopping, self.history.val)
        self.history.stopped_early_at = self.early.stopped_at
        self.best_val = min(self.history.val, default=math.inf)

    def run(self) -> History:
        batch_losses = self.start_losses
        for epoch in range(self.start_epoch, self.epochs):
            if self.history.stopped_early_at is not None:  # resumed where it stopped early
                break
            self.train_epoch(epoch, batch_losses)
            self.end_epoch(epoch, batch_losses, *self.validate())
            batch_losses = []
        return self.history

    def train_epoch(self, epoch: int, batch_losses: list[Tensor]) -> None:
        """The epoch's remaining steps; `batch_losses` holds the done ones' and grows."""
        # A checkpoint in this epoch saves the generator as it was before the epoch's draw,
        # so a resumed attempt draws the same order and skips the batches already done.
        at_start = self.next_start if self.next_start is not None else self._shuffle_state()
        # Within an epoch only a stop request or a checkpoint by the clock can be due, and
        # every rank asks the clock at the same steps (the config is the same everywhere).
        timed = self.checkpoints is not None and self.checkpoints.every_seconds > 0
        stop, augment = self.stop, self.augment
        self.trained.train()
        for x, y in self.train.epoch(self.shuffle, start_batch=len(batch_losses)):
            if augment is not None:
                x = augment(x, epoch, len(batch_losses))
            batch_losses.append(self.step(x, y))
            if timed or (stop is not None and stop.signum is not None):
                self.pause(epoch, batch_losses, at_start)

    def validate(self) -> tuple[list[Tensor], list[Tensor]]:
        """The validation losses per batch, and the metrics' raw parts (all on the device)."""
        self.model.eval()
        losses, outputs, targets = [], [], []
        first = self.metrics is None and self.make_metrics is not None
        measured = first or self.metrics is not None
        with torch.no_grad():
            for x, y in self.val.epoch(None):
                out = self.forward(x)
                losses.append(self.loss_fn(out, y))
                if measured:
                    outputs.append(out)
                if first:
                    targets.append(y)
            if first:
                self.metrics = self.make_metrics(torch.cat(targets))
            if self.metrics is None:
                return losses, []
            # Concatenated once with the losses in end_epoch (cat promotes dtypes): every op
            # counts at the seed's scale, 5 steps an epoch.
            return losses, self.metrics.parts(outputs)

    def end_epoch(
        self, epoch: int, train_losses: list[Tensor], val_losses: list[Tensor], parts: list[Tensor]
    ) -> None:
        # The epoch's one host sync, to Python floats (exact copies of the float32 losses). The
        # means are the seed's `np.mean` over them (float64, numpy's summation order), bit for bit.
        # Under DDP every rank's, reduced the same way on every rank.
        pieces = [*self.ranks.epoch_losses(train_losses, val_losses), *parts]
        read = (pieces[0] if len(pieces) == 1 else torch.cat(pieces)).tolist()
        n_train, n_val = len(train_losses), len(val_losses)
        train, val = read[:n_train], read[n_train : n_train + n_val]
        train_loss, val_loss = seed_mean(train), seed_mean(val)
        if not math.isfinite(train_loss):
            raise NonFiniteLoss("training", epoch, _first_bad(train))
        if not math.isfinite(val_loss):
            raise NonFiniteLoss("validation", epoch, _first_bad(val))
        values = {}
        if self.metrics is not None:
            values = self.metrics.finish(read[n_train + n_val :])
        values["lr"] = float(self.optimizer.param_groups[0]["lr"])  # at the epoch's end
        self.history.train.append(train_loss)
        self.history.val.append(val_loss)
        for name, value in values.items():
            self.history.metrics.setdefault(name, []).append(value)
        self._keep_if_best(val_loss)
        if self.early.update(epoch, val_loss):
            self.history.stopped_early_at = epoch
        if self.epoch_scheduler is not None:
            self.epoch_scheduler.step()
        if self.on_epoch is not None:
            self.on_epoch(epoch, train_loss, val_loss, values)
        # The generator after this epoch's draw: where the next epoch starts, too.
        self.next_start = self._shuffle_state()
        self.pause(epoch + 1, [], self.next_start)

    def _keep_if_best(self, val_loss: float) -> None:
        # The first epoch of the lowest loss (argmin's choice); copies only on improvement.
        if self.options.export != "best" or not val_loss < self.best_val:
            return
        self.best_val = val_loss
        with torch.no_grad():
            state = self.model.state_dict()
            if not self.history.best:
                self.history.best = {k: v.detach().clone() for k, v in state.items()}
            else:
                for k, v in state.items():
                    self.history.best[k].copy_(v)

    def pause(self, epoch: int, batch_losses: list[Tensor], shuffle: dict[str, Tensor]) -> None:
        """After every step, and after every epoch as batch 0 of the next: the one place that
        decides whether to checkpoint (the cadence, the end, a stop request) and to stop.

        `batch_losses` are the epoch's so far; `shuffle`, the generator before its draw.
        """
        batch = len(batch_losses)
        stopping = self.stop is not None and self.stop.signum is not None
        finished = (epoch, batch) == (self.epochs, 0) or (
            batch == 0 and self.history.stopped_early_at == epoch - 1
        )
        saved = None
        if self.checkpoints is not None:
            due = stopping or finished or self.checkpoints.due(epoch, batch)
            if not finished and self.checkpoints.every_seconds > 0:
                due = self.ranks.agree(due)  # only rank 0's clock counts; by epochs, all agree
            if due:
                state = self._state(epoch, batch_losses, shuffle)  # every rank's, under DDP
                # The fence (split-brain): exits if a re-run took this flow run over.
                if self.ranks.writes:
                    self.fenced_out = not self.ranks.hold()
                    if not self.fenced_out:
                        saved = self.checkpoints.save(state)
        if stopping:
            # A cancellation from the UI is reported Cancelled, not Crashed (no re-run).
            cancelled = self.ranks.cancellation(self.stop.signum)
            raise cancelled or Interrupted(self.stop.signum, epoch, batch, self._outcome(saved))

    def _outcome(self, saved: bool | None) -> str:
        """What an interrupted run leaves for the next one, truthfully."""
        if self.checkpoints is None:
            return (
                "checkpoints are off for this run, so nothing was saved: the next run starts over"
            )
        if saved:
            return "checkpoint saved: the next run of this config resumes there"
        why = self.checkpoints.error
        if self.fenced_out:
            why = "another attempt owns this run, or the server could not say which"
        return (
            f"no checkpoint saved ({why}); the next run resumes from an older "
            f"one if there is one (this run's last: {self.checkpoints.describe_last()})"
        )

    def _shuffle_state(self) -> dict[str, Tensor]:
        # Read only where a checkpoint may be written: it copies the generator's state.
        if self.shuffle is None or self.checkpoints is None:
            return {}
        return {"generator": self.shuffle.get_state()}

    def _state(
        self, epoch: int, batch_losses: list[Tensor], shuffle: dict[str, Tensor]
    ) -> TrainState:
        done = torch.stack(batch_losses) if batch_losses else torch.empty(0, device=self.device)
        # Under DDP every rank's, so each resumes as itself.
        done, rng = self.ranks.gather(done), self.ranks.rng_states(rng_states(self.device))
        if (bad := _first_bad(done.cpu())) >= 0:  # a diverged state is no place to resume
            raise NonFiniteLoss("training", epoch, bad % len(batch_losses))
        return TrainState(
            epoch,
            len(batch_losses),
            self.model.state_dict(),
            self.optimizer.state_dict(),
            shuffle,
            done,
            list(self.history.train),
            list(self.history.val),
            rng,
            {name: list(values) for name, values in self.history.metrics.items()},
            None if self.scheduler is None else self.scheduler.state_dict(),
            dict(self.history.best),
        )
