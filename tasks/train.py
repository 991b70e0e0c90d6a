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
from prefect import get_run_logger, task
from torch import Tensor, nn
from torch.utils.tensorboard import SummaryWriter

from tasks.cache import StageCache, cacheable, stage_key
from tasks.checkpoint import Checkpointing, Checkpoints, TrainState
from tasks.device import resolve_device
from tasks.errors import InputError, NonFiniteLoss, StorageError, writing
from tasks.loaders import Loaders
from tasks.loop import EpochHook, EpochLoop, LossFn, StopSignals, restore_rng_states, seed_rngs
from tasks.loop import Interrupted as Interrupted  # raised through train-epochs to its callers
from tasks.model import InitialModel, ModelSpec, instantiate, spec_from_json
from tasks.rundir import on_cache_hit

TRAINING_SEED = 0  # of the global RNGs at a fresh start (only a plugin model draws from them)

_ELEMENTWISE: dict[str, Callable[[], nn.Module]] = {
    "mse": lambda: nn.MSELoss(reduction="mean"),
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


@cacheable
@dataclass(frozen=True)
class Trained:
    spec: ModelSpec
    state: dict[str, Tensor]  # final weights, on the CPU
    train_loss: list[float]
    val_loss: list[float]
    epochs_trained: int  # epochs computed in this run (0 when served from the cache)
    resumed_from: dict[str, int] | None = None  # {"epoch": E, "batch": B} of the checkpoint
    cache_key: str = field(default="", compare=False)

    def to_cache(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        meta = {"spec": dataclasses.asdict(self.spec), "train_loss": self.train_loss,
                "val_loss": self.val_loss, "epochs_trained": self.epochs_trained,
                "resumed_from": self.resumed_from}  # fmt: skip
        return self.state, meta

    @classmethod
    def from_cache(cls, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Trained:
        return cls(spec_from_json(meta["spec"]), tensors, meta["train_loss"], meta["val_loss"],
                   meta["epochs_trained"], meta["resumed_from"])  # fmt: skip


class Progress:
    """A progress line per epoch, at most one a second (plus the last), so it costs nothing."""

    def __init__(self, log: Callable[[str], None], epochs: int, steps_per_epoch: int):
        self.log, self.epochs, self.steps = log, epochs, steps_per_epoch
        self.last_time, self.last_epoch = time.perf_counter(), None

    def __call__(self, epoch: int, train_loss: float, val_loss: float) -> None:
        now = time.perf_counter()
        if self.last_epoch is not None and now - self.last_time < 1.0 and epoch + 1 < self.epochs:
            return
        # The rate since the previous line: a resumed run, or a slow first epoch, doesn't skew it.
        epochs_done = epoch + 1 - (self.last_epoch + 1 if self.last_epoch is not None else epoch)
        rate = epochs_done * self.steps / max(now - self.last_time, 1e-9)
        self.last_time, self.last_epoch = now, epoch
        self.log(
            f"epoch {epoch + 1}/{self.epochs}  train {train_loss:.6f}  val {val_loss:.6f}  "
            f"({rate:,.0f} steps/s)"
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
) -> Trained:
    # Built afresh from the inputs and the checkpoint in every attempt: a retry inherits
    # nothing from the one that failed.
    model = instantiate(initial.spec, initial.state).to(device)
    opt = make_optimizer(optimizer, model.parameters(), lr, momentum, weight_decay)
    # Training's own draws (dropout, in a plugin model) come from torch's global RNGs: seeded
    # here or restored from the checkpoint, and the caller's put back afterwards. (They are
    # the process's: trials of a sweep on threads share them, and such a model with them.)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if resume is None:
            seed_rngs(TRAINING_SEED, device)
        else:
            model.load_state_dict(resume.model)
            # Hyperparameters come from this config (equal by the lineage key); state from disk.
            opt.load_state_dict({**opt.state_dict(), "state": resume.optimizer["state"]})
            restore_rng_states(resume.rng, device)
        loop = EpochLoop(model, loaders.train, loaders.val, make_loss(loss), opt, epochs,
                         on_epoch, checkpoints, resume, stop)  # fmt: skip
        history = loop.run()
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    resumed_from = {"epoch": resume.epoch, "batch": resume.batch} if resume else None
    epochs_trained = epochs - (resume.epoch if resume else 0)
    return Trained(initial.spec, state, history.train, history.val, epochs_trained, resumed_from)


def train_identity(inputs: dict[str, Any]) -> dict[str, Any]:
    """The result depends on the device type (CPU and CUDA kernels round differently),
    not on the run folder; momentum only matters to SGD."""
    key = {k: v for k, v in inputs.items() if k not in ("run_dir", "checkpointing")}
    key["device"] = resolve_device(inputs["device"]).type
    if inputs["optimizer"] != "sgd":
        key.pop("momentum")
    return key


def lineage_key(inputs: dict[str, Any]) -> str:
    """train-epochs' key without `epochs`: the first N epochs of a run are the same whatever
    its length, so a longer run of the same config continues from a shorter one's checkpoint."""
    key = train_identity(inputs)
    del key["epochs"]
    return stage_key("train-epochs", train_epochs.fn, key)


def log_losses(writer: SummaryWriter, epoch: int, train_loss: float, val_loss: float) -> None:
    # The seed's call: one 'loss' chart with a training and a validation curve.
    writer.add_scalars("loss", {"training": train_loss, "validation": val_loss}, epoch)


def loss_writer(run_dir: Path, train_loss: list[float], val_loss: list[float]) -> SummaryWriter:
    """A writer whose loss curves hold exactly the given history: each epoch once.

    A resumed or cached run may reuse a folder that already has curves (a retry, a repeated
    --run-name): they are rewritten from the history rather than appended to.
    """
    for curve in ("loss_training", "loss_validation"):
        for old in (run_dir / curve).glob("events.out.tfevents.*"):
            old.unlink()
    writer = SummaryWriter(str(run_dir))
    for epoch, losses in enumerate(zip(train_loss, val_loss, strict=True)):
        log_losses(writer, epoch, *losses)
    return writer


def _worth_retrying(task: Any, task_run: Any, state: Any) -> bool:
    # Bad input, a diverging loss and a full disk fail the same way again: don't retry those.
    failure = state.result(raise_on_failure=False)
    return not isinstance(failure, InputError | NonFiniteLoss | StorageError)


@task(
    name="train-epochs",
    cache_policy=StageCache(identity=train_identity),
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
    checkpointing: Checkpointing | None = None,
) -> Trained:
    # locals() here is exactly this call's inputs: the lineage key is computed from them.
    # The run folder says whose checkpoints these are: a retry or a re-run into the same folder
    # takes over the files it wrote, and never touches another run's.
    checkpoints = checkpointing.open(lineage_key(locals()), str(run_dir)) if checkpointing else None
    resume = checkpoints.latest(epochs) if checkpoints and checkpointing.resume else None
    logger = get_run_logger()
    if resume is not None:
        logger.info(f"resumed from epoch {resume.epoch}, batch {resume.batch}")
    progress = Progress(logger.info, epochs, len(loaders.train))
    history = (resume.train_loss, resume.val_loss) if resume else ([], [])
    # TensorBoard writes in a background thread and re-raises its errors at a later call;
    # whichever call that is, a full or read-only run folder is reported as such.
    with (
        writing(f"the run folder {str(run_dir)!r}"),
        loss_writer(run_dir, *history) as writer,
        StopSignals() as stop,
    ):

        def on_epoch(epoch: int, train_loss: float, val_loss: float) -> None:
            log_losses(writer, epoch, train_loss, val_loss)
            progress(epoch, train_loss, val_loss)

        return train_model(
            initial, loaders, optimizer, lr, momentum, weight_decay, loss, epochs,
            resolve_device(device), on_epoch, checkpoints, resume, stop,
        )  # fmt: skip


@on_cache_hit(train_epochs)
def _replay_losses(trained: Trained, run_dir: Path, **_: Any) -> Trained:
    """A cached training run still gets its loss curves in this run's TensorBoard."""
    loss_writer(run_dir, trained.train_loss, trained.val_loss).close()
    return dataclasses.replace(trained, epochs_trained=0, resumed_from=None)
