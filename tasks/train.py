"""train-epochs: model and optimizer for each attempt, the epoch loop (tasks/loop.py), losses
in TensorBoard and the log."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from prefect import get_run_logger
from torch import Tensor, nn
from torch.nn import _reduction as _Reduction
from torch.nn import functional as F

from tasks import fence
from tasks.checkpoint import Checkpoints, CheckpointSettings, TrainState
from tasks.curves import Curves
from tasks.device import resolve_device
from tasks.distributed import Job, Ranks, check_launch, default_threads, launch_ranks
from tasks.errors import InputError, NonFiniteLoss, StorageError, writing
from tasks.loaders import Loaders
from tasks.loop import (
    EpochHook,
    EpochLoop,
    History,
    LossFn,
    StopSignals,
    restore_rng_states,
    seed_rngs,
)
from tasks.loop import Interrupted as Interrupted  # raised through train-epochs to its callers
from tasks.metrics import ValMetrics
from tasks.model import InitialModel, ModelSpec, instantiate, spec_from_json
from tasks.options import Launch, TrainingOptions
from tasks.stage import cache_entry, stage

TRAINING_SEED = 0  # of the global RNGs at a fresh start (only a plugin model draws from them)


def mean_squared_error(pred: Tensor, y: Tensor) -> Tensor:
    """`nn.MSELoss(reduction="mean")(pred, y)`, bit for bit: for plain tensors of one shape,
    the kernel that `F.mse_loss` ends in, called directly. That skips a module call, the
    shape check and `broadcast_tensors` (7–11% of a seed-scale epoch here, 7 calls of it:
    `benchmarks/loops.py`, `bare, nn.MSELoss`)."""
    if type(pred) is Tensor and type(y) is Tensor and pred.shape == y.shape:
        return torch._C._nn.mse_loss(pred, y, _MEAN)
    return F.mse_loss(pred, y, reduction="mean")  # it broadcasts, warns, or dispatches


_MEAN = _Reduction.get_enum("mean")
_ELEMENTWISE: dict[str, Callable[[], LossFn]] = {
    "mse": lambda: mean_squared_error,
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
    ranks: Ranks | None = None,
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
            seed_rngs(TRAINING_SEED + (ranks.rank if ranks else 0), device)
        else:
            model.load_state_dict(resume.model)
            # Hyperparameters come from this config (equal by the lineage key); state from disk.
            opt.load_state_dict({**opt.state_dict(), "state": resume.optimizer["state"]})
            rng = resume.rng if ranks is None else ranks.own_rng_states(resume.rng)
            restore_rng_states(rng, device)
        loop = EpochLoop(
            model,
            loaders.train,
            loaders.val,
            make_loss(loss),
            opt,
            epochs,
            on_epoch,
            checkpoints,
            resume,
            stop,
            options=options,
            metrics=lambda y_val: ValMetrics(loss, y_val, initial.spec.n_outputs),
            ranks=ranks,
        )
        history = loop.run()
    return finished(initial.spec, model, history, options, resume)


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


def write_curves(run_dir: Path, trained: Trained) -> None:
    """The run folder's curves from a whole history: a cache hit's, or the ranks'."""
    with writing(f"the run folder {str(run_dir)!r}"):
        Curves(run_dir, trained.train_loss, trained.val_loss, trained.metrics).close()


def _worth_retrying(task: Any, task_run: Any, state: Any) -> bool:
    # Bad input, a diverging loss and a full disk fail the same way again: don't retry those.
    failure = state.result(raise_on_failure=False)
    return not isinstance(failure, InputError | NonFiniteLoss | StorageError)


@stage(
    name="train-epochs",
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=_worth_retrying,
)
def train_epochs(
    initial: InitialModel,
    loaders: Loaders,
    optimizer: str,
    lr: float,
    momentum: float,
    weight_decay: float,
    loss: str,
    epochs: int,
    device: str,
    run_dir: Path,
    checkpointing: CheckpointSettings | None = None,
    options: TrainingOptions = TrainingOptions(),  # noqa: B008 (frozen)
    launch: Launch = Launch(),  # noqa: B008 (frozen)
) -> Trained:
    # What the weights depend on: the device's type (CPU and CUDA kernels round differently),
    # not its name or index; momentum only where SGD uses it; never the run folder.
    recipe = {
        "initial": initial,
        "loaders": loaders,
        "optimizer": optimizer,
        "lr": lr,
        "momentum": momentum if optimizer == "sgd" else None,
        "weight_decay": weight_decay,
        "loss": loss,
        "device": resolve_device(device).type,
        "options": options.normalized(),
    }
    if launch.distributed:
        check_launch(launch, device)
        # More ranks reduce in another order: another result, and another lineage (never a
        # wrong resume). One process keeps the key it always had.
        recipe["world_size"] = launch.world_size
    entry = cache_entry("train-epochs", train_model, epochs=epochs, **recipe)
    if (hit := entry.load(Trained)) is not None:
        # a hit still gets its curves
        write_curves(run_dir, hit)
        return entry.cached(dataclasses.replace(hit, epochs_trained=0, resumed_from=None))
    # The first N epochs are the same whatever a run's length, so checkpoints are filed under
    # the key without `epochs` (the lineage): a longer run of the config continues a shorter.
    # Not so for a schedule shaped by the run's length (cosine, onecycle): its lineage keeps
    # `epochs`, and a longer run is a new schedule from epoch 0 (README: "Schedules").
    length = {"epochs": epochs} if options.schedule_needs_length else {}
    lineage_entry = cache_entry("train-epochs", train_model, **recipe, **length)
    lineage = lineage_entry.key
    # The run folder says whose checkpoints these are: a retry or a re-run into the same folder
    # takes over the files it wrote, and never touches another run's.
    checkpoints = checkpointing.open(lineage, str(run_dir)) if checkpointing and lineage else None
    resume = checkpoints.latest(epochs) if checkpoints and checkpointing.resume else None
    logger = get_run_logger()
    if launch.distributed:
        inputs = {
            "initial": initial,
            "loaders": loaders,
            "optimizer": optimizer,
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "loss": loss,
            "options": options,
        }
        job = Job(
            inputs,
            epochs,
            device,
            checkpointing,
            lineage,
            str(run_dir),
            progress="",  # set by the launcher
            threads=default_threads(launch.nproc),
            hang_timeout=launch.hang_timeout,
            owner=fence.owner(),  # rank 0 asks on this process's behalf before a checkpoint
            code=lineage_entry.code,
        )
        trained = launch_ranks(launch, job, logger.info)
        # The curves, from the history, here: every node's run folder gets them.
        write_curves(run_dir, trained)
        return entry.keep(trained)
    if resume is not None:
        logger.info(f"resumed from epoch {resume.epoch}, batch {resume.batch}")
    progress = Progress(logger.info, epochs, len(loaders.train))
    history = (resume.train_loss, resume.val_loss, resume.metrics) if resume else ([], [], {})
    # A full or read-only run folder is reported as such, whichever write meets it.
    with (
        writing(f"the run folder {str(run_dir)!r}"),
        Curves(run_dir, *history) as curves,
        StopSignals() as stop,
    ):

        def on_epoch(epoch: int, train_loss: float, val_loss: float, values: dict) -> None:
            curves(epoch, train_loss, val_loss, values)
            progress(epoch, train_loss, val_loss, values)

        trained = train_model(
            initial,
            loaders,
            optimizer,
            lr,
            momentum,
            weight_decay,
            loss,
            epochs,
            resolve_device(device),
            on_epoch,
            checkpoints,
            resume,
            stop,
            options=options,
        )
    return entry.keep(trained)
