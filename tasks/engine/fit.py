"""Training a model: the model and optimizer built afresh for each attempt, the global RNGs
seeded or restored, the epoch loop run, and what it produced. Imports no Prefect."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from trainflow.tasks.data.batches import Loaders
from trainflow.tasks.engine.augment import BatchAugment, built_in, compose
from trainflow.tasks.engine.checkpoint import Checkpoints, TrainState
from trainflow.tasks.engine.loop import EpochHook, EpochLoop, History, restore_rng_states, seed_rngs
from trainflow.tasks.engine.losses import make_loss
from trainflow.tasks.engine.metrics import ValMetrics
from trainflow.tasks.engine.models import InitialModel, ModelSpec, instantiate, spec_from_json
from trainflow.tasks.engine.options import TrainingOptions
from trainflow.tasks.engine.ranks import SINGLE_PROCESS, Ranks
from trainflow.tasks.engine.registered import load_registered, registered
from trainflow.tasks.engine.stops import StopSignals
from trainflow.tasks.errors import InputError
from trainflow.tasks.names import AUGMENTATIONS
from trainflow.tasks.project import Registered

TRAINING_SEED = 0  # of the global RNGs at a fresh start (only a plugin model draws from them)


def make_optimizer(
    name: str, params: Iterable[Tensor], lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}")


@dataclass(frozen=True)
class Trained:
    spec: ModelSpec
    state: dict[str, Tensor]  # final weights, on the CPU
    train_loss: list[float]
    val_loss: list[float]
    epochs_trained: int  # epochs computed in this run (0 when served from the cache)
    resumed_from: dict[str, int] | None = None  # {"epoch": E, "batch": B} of the checkpoint
    metrics: dict[str, list[float]] = field(default_factory=dict)  # per epoch, by name; "lr"
    best_epoch: int | None = None  # export best: the epoch whose weights `state` holds
    stopped_early_at: int | None = None  # the last epoch trained, if early stopping ended it
    cache_key: str = field(default="", compare=False)

    def to_cache(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        meta = {
            "spec": dataclasses.asdict(self.spec),
            "train_loss": self.train_loss,
            "val_loss": self.val_loss,
            "epochs_trained": self.epochs_trained,
            "resumed_from": self.resumed_from,
            "metrics": self.metrics,
            "best_epoch": self.best_epoch,
            "stopped_early_at": self.stopped_early_at,
        }
        return self.state, meta

    @classmethod
    def from_cache(cls, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Trained:
        return cls(
            spec_from_json(meta["spec"]),
            tensors,
            meta["train_loss"],
            meta["val_loss"],
            meta["epochs_trained"],
            meta["resumed_from"],
            meta.get("metrics", {}),
            meta.get("best_epoch"),
            meta.get("stopped_early_at"),
        )


class Progress:
    """A progress line per epoch, at most one a second (plus the last), so it costs nothing."""

    def __init__(self, log: Callable[[str], None], epochs: int, steps_per_epoch: int):
        self.log, self.epochs, self.steps = log, epochs, steps_per_epoch
        self.last_time, self.last_epoch = time.perf_counter(), None

    def __call__(
        self, epoch: int, train_loss: float, val_loss: float, values: dict[str, float]
    ) -> None:
        now = time.perf_counter()
        if self.last_epoch is not None and now - self.last_time < 1.0 and epoch + 1 < self.epochs:
            return
        # The rate since the previous line: a resumed run, or a slow first epoch, doesn't skew it.
        epochs_done = epoch + 1 - (self.last_epoch + 1 if self.last_epoch is not None else epoch)
        rate = epochs_done * self.steps / max(now - self.last_time, 1e-9)
        self.last_time, self.last_epoch = now, epoch
        shown = "".join(
            f"  {name.removeprefix('val_')} {value:.4g}" for name, value in values.items()
        )
        self.log(
            f"epoch {epoch + 1}/{self.epochs}  train {train_loss:.6f}  val {val_loss:.6f}"
            f"{shown}  ({rate:,.0f} steps/s)"
        )


def train_model(
    initial: InitialModel,
    loaders: Loaders,
    optimizer: str,
    lr: float,
    momentum: float,
    weight_decay: float,
    loss: str,
    epochs: int,
    device: torch.device,
    on_epoch: EpochHook | None = None,
    checkpoints: Checkpoints | None = None,
    resume: TrainState | None = None,
    stop: StopSignals | None = None,
    *,
    options: TrainingOptions = TrainingOptions(),  # noqa: B008 (frozen)
    ranks: Ranks = SINGLE_PROCESS,
) -> Trained:
    check_precision(options.precision, device)
    # Built afresh from the inputs and the checkpoint in every attempt: a retry inherits
    # nothing from the one that failed.
    model = instantiate(initial.spec, initial.state).to(device)
    opt = make_optimizer(optimizer, model.parameters(), lr, momentum, weight_decay)
    # Training's own draws (dropout, in a plugin model) come from torch's global RNGs: seeded
    # here or restored from the checkpoint, and the caller's put back afterwards. (They are
    # the process's: trials of a sweep on threads share them, and such a model with them.)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if resume is None:
            # Each rank its own stream (a plugin model's dropout masks differ between shards).
            seed_rngs(TRAINING_SEED + ranks.rank, device)
        else:
            model.load_state_dict(resume.model)
            # Hyperparameters come from this config (equal by the lineage key); state from disk.
            opt.load_state_dict({**opt.state_dict(), "state": resume.optimizer["state"]})
            rng = ranks.own_rng_states(resume.rng)
            restore_rng_states(rng, device)
        loop = EpochLoop(
            model,
            loaders.train,
            loaders.val,
            # y holds int64 class ids exactly where the spec counts classes (build-model).
            make_loss(loss, torch.int64 if initial.spec.n_classes else torch.float32),
            opt,
            epochs,
            on_epoch,
            checkpoints,
            resume,
            stop,
            options=options,
            metrics=validation_metrics(loss, initial.spec.n_outputs, options),
            augment=batch_augment(options, ranks.rank),
            ranks=ranks,
        )
        history = loop.run()
    return finished(initial.spec, model, history, options, resume)


def validation_metrics(
    loss: str, n_outputs: int, options: TrainingOptions
) -> Callable[[Tensor], ValMetrics] | None:
    """How the loop builds the metrics from the validation targets: the loss's own if
    `options.metrics`, and the project's that `options.extra_metrics` names."""
    extra = {name: load_registered(_registered("metrics", name)) for name in options.extra_metrics}
    if not options.metrics and not extra:
        return None
    return lambda y_val: ValMetrics(loss, y_val, n_outputs, extra, builtin=options.metrics)


def batch_augment(options: TrainingOptions, rank: int) -> BatchAugment | None:
    """The training batches' transform: the built-in and the project's, in the order named."""
    if not options.augment:
        return None
    transforms = [
        built_in([name], options.crop_padding)[0]
        if name in AUGMENTATIONS
        else load_registered(_registered("augmentations", name))
        for name in options.augment
    ]
    return BatchAugment(compose(transforms), options.augment_seed, rank)


def _registered(kind: str, name: str) -> Registered:
    item = registered(kind, name)
    if item is None:
        raise InputError(f"{kind[:-1]} {name!r} is not registered by this project")
    return item


def finished(
    spec: ModelSpec,
    model: nn.Module,
    history: History,
    options: TrainingOptions,
    resume: TrainState | None,
) -> Trained:
    """What training produced: the last or the best epoch's weights, on the CPU."""
    best_epoch = history.val.index(min(history.val))
    weights = history.best if options.export == "best" else model.state_dict()
    state = {k: v.detach().to("cpu", copy=True) for k, v in weights.items()}
    resumed_from = {"epoch": resume.epoch, "batch": resume.batch} if resume else None
    epochs_trained = len(history.train) - (resume.epoch if resume else 0)
    return Trained(
        spec,
        state,
        history.train,
        history.val,
        epochs_trained,
        resumed_from,
        history.metrics,
        best_epoch if options.export == "best" else None,
        history.stopped_early_at,
    )


def check_precision(precision: str, device: torch.device) -> None:
    if precision != "bf16":
        return
    if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):
        return
    if device.type != "cpu":
        raise InputError(f"--precision bf16: the device {device} has no bfloat16 support")
