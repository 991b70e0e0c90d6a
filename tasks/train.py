"""train-epochs: the seed's train/validation loop, without a host sync per step."""

from __future__ import annotations

import dataclasses
import math
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from prefect import get_run_logger, task
from torch import Tensor, nn

from tasks.cache import StageCache, cacheable, stage_key
from tasks.checkpoint import Checkpointing, Checkpoints, TrainState
from tasks.device import resolve_device
from tasks.errors import InputError, NonFiniteLoss, StorageError, writing
from tasks.loaders import Batches, Loaders
from tasks.model import InitialModel, ModelSpec, instantiate, spec_from_json
from tasks.rundir import on_cache_hit

if TYPE_CHECKING:  # imported where a writer is made: a run that writes no events skips it
    from torch.utils.tensorboard import SummaryWriter

LossFn = Callable[[Tensor, Tensor], Tensor]
EpochHook = Callable[[int, float, float], None]

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


class Interrupted(BaseException):
    """SIGINT/SIGTERM arrived during training; a checkpoint was written first.

    A BaseException, like KeyboardInterrupt, so Prefect reports a crash and does not retry.
    """

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}; checkpoint saved")
        self.signum = signum


class StopSignals:
    """Turn SIGINT/SIGTERM into a request the loop honours at the next step."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # signals reach only it
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._request)
        return self

    def _request(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


@dataclass
class History:
    train: list[float] = field(default_factory=list)
    val: list[float] = field(default_factory=list)


def _raise_if_non_finite(losses: Tensor, phase: str, epoch: int) -> None:
    bad = ~torch.isfinite(losses)
    if bool(bad.any()):
        raise NonFiniteLoss(phase, epoch, int(bad.nonzero()[0]))


def rng_states(device: torch.device) -> dict[str, Tensor]:
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def restore_rng_states(states: dict[str, Tensor], device: torch.device) -> None:
    torch.set_rng_state(states["cpu"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


def _plain_sgd_lr(optimizer: torch.optim.Optimizer) -> float | None:
    """The learning rate if `optimizer` is SGD with nothing but a learning rate, else None."""
    if type(optimizer) is not torch.optim.SGD or len(optimizer.param_groups) != 1:
        return None
    group = optimizer.param_groups[0]
    plain = not (group["momentum"] or group["weight_decay"] or group["nesterov"]
                 or group["maximize"] or isinstance(group["lr"], Tensor))  # fmt: skip
    return float(group["lr"]) if plain else None


def fit(
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
) -> History:
    """The seed's loop, resumable at any (epoch, batch) and checkpointed on a cadence.

    Per-batch losses stay on the device instead of being `.item()`-ed, so the host waits
    once per epoch, not once per step; kept per batch, they also say which batch went bad.
    """
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    sgd_lr = _plain_sgd_lr(optimizer)

    def train_step(x: Tensor, y: Tensor) -> Tensor:
        loss = loss_fn(model(x), y)
        loss.backward()
        if sgd_lr is None:
            optimizer.step()
        else:  # what SGD.step does for plain SGD, without its ~10 µs of Python per call
            with torch.no_grad():
                for p in params:
                    if p.grad is not None:
                        p.add_(p.grad, alpha=-sgd_lr)
        for p in params:  # zero_grad(set_to_none=True), minus the call overhead
            p.grad = None
        return loss.detach()

    history = History(list(resume.train_loss), list(resume.val_loss)) if resume else History()
    start_epoch, start_batch = (resume.epoch, resume.batch) if resume else (0, 0)
    if resume:
        train.load_state_dict(resume.loader)

    def snapshot(epoch: int, batch: int, loader: dict[str, Tensor], done: Tensor) -> TrainState:
        return TrainState(epoch, batch, model.state_dict(), optimizer.state_dict(), loader,
                          done, list(history.train), list(history.val),
                          rng_states(device))  # fmt: skip

    for epoch in range(start_epoch, epochs):
        loader_state = train.state_dict()  # the shuffle generator before this epoch's draw
        first = start_batch if epoch == start_epoch else 0
        # Losses stay on the device, one 0-d tensor per batch: no host sync until epoch end.
        batch_losses = list(resume.batch_losses.to(device).unbind()) if first else []
        model.train()
        for x, y in train.epoch(first):
            batch_losses.append(train_step(x, y))
            stopping = stop is not None and stop.signum is not None
            if checkpoints is not None and (stopping or checkpoints.time_due()):
                done = torch.stack(batch_losses)
                _raise_if_non_finite(done, "training", epoch)  # keep a bad state out
                checkpoints.save(snapshot(epoch, len(batch_losses), loader_state, done))
            if stopping:
                raise Interrupted(stop.signum)
        train_losses = torch.stack(batch_losses)
        model.eval()
        with torch.no_grad():
            val_losses = torch.stack([loss_fn(model(x), y) for x, y in val.epoch()])
        # float64 mean, like np.mean over the seed's Python floats; one host sync per epoch.
        train_loss, val_loss = torch.stack(
            [train_losses.double().mean(), val_losses.double().mean()]
        ).tolist()
        if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
            _raise_if_non_finite(train_losses, "training", epoch)
            _raise_if_non_finite(val_losses, "validation", epoch)
        history.train.append(train_loss)
        history.val.append(val_loss)
        if on_epoch is not None:
            on_epoch(epoch, train_loss, val_loss)
        stopping = stop is not None and stop.signum is not None
        done = epoch + 1
        if checkpoints is not None and (stopping or done == epochs or checkpoints.epoch_due(done)):
            checkpoints.save(snapshot(done, 0, train.state_dict(), train_losses[:0]))
        if stopping:
            raise Interrupted(stop.signum)
    return history


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
    model = instantiate(initial.spec, initial.state).to(device)
    opt = make_optimizer(optimizer, model.parameters(), lr, momentum, weight_decay)
    if resume is not None:
        model.load_state_dict(resume.model)
        # Hyperparameters come from this config (equal by the lineage key); state from disk.
        opt.load_state_dict({**opt.state_dict(), "state": resume.optimizer["state"]})
        restore_rng_states(resume.rng, device)
    history = fit(model, loaders.train, loaders.val, make_loss(loss), opt, epochs, on_epoch,
                  checkpoints, resume, stop)  # fmt: skip
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
    from torch.utils.tensorboard import SummaryWriter

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
    checkpoints = checkpointing.open(lineage_key(locals())) if checkpointing else None
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
