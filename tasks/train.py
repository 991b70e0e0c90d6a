"""train-epochs: the seed's train/validation loop, without a host sync per step."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from prefect import get_run_logger, task
from torch import Tensor, nn
from torch.utils.tensorboard import SummaryWriter

from tasks.cache import StageCache, cacheable
from tasks.device import resolve_device
from tasks.errors import InputError
from tasks.loaders import Batches, Loaders
from tasks.model import InitialModel, ModelSpec, instantiate, spec_from_json
from tasks.rundir import on_cache_hit

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


class NonFiniteLoss(RuntimeError):
    def __init__(self, phase: str, epoch: int, batch: int):
        super().__init__(f"non-finite {phase} loss at epoch {epoch}, batch {batch}; stopping")
        self.epoch, self.batch = epoch, batch


@dataclass
class History:
    train: list[float] = field(default_factory=list)
    val: list[float] = field(default_factory=list)


def _epoch_losses(model: nn.Module, batches: Batches, step: Callable[..., Tensor]) -> Tensor:
    """One epoch's per-batch losses, kept on the device.

    Each batch's loss is copied into a device buffer instead of `.item()`-ed, so the host
    waits once per epoch, not once per step; the buffer also says which batch went bad.
    """
    device = next(model.parameters()).device
    losses = torch.empty(len(batches), device=device)
    for i, (x, y) in enumerate(batches.epoch()):
        losses[i] = step(x, y)
    return losses


def fit(
    model: nn.Module,
    train: Batches,
    val: Batches,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    on_epoch: EpochHook | None = None,
) -> History:
    def train_step(x: Tensor, y: Tensor) -> Tensor:
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def val_step(x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(model(x), y)

    history = History()
    for epoch in range(epochs):
        model.train()
        train_losses = _epoch_losses(model, train, train_step)
        model.eval()
        with torch.no_grad():
            val_losses = _epoch_losses(model, val, val_step)
        # float64 mean, like np.mean over the seed's Python floats; one host sync per epoch.
        train_loss, val_loss = torch.stack(
            [train_losses.double().mean(), val_losses.double().mean()]
        ).tolist()
        for phase, value, per_batch in (
            ("training", train_loss, train_losses),
            ("validation", val_loss, val_losses),
        ):
            if not math.isfinite(value):
                bad = int((~torch.isfinite(per_batch)).nonzero()[0])
                raise NonFiniteLoss(phase, epoch, bad)
        history.train.append(train_loss)
        history.val.append(val_loss)
        if on_epoch is not None:
            on_epoch(epoch, train_loss, val_loss)
    return history


@cacheable
@dataclass(frozen=True)
class Trained:
    spec: ModelSpec
    state: dict[str, Tensor]  # final weights, on the CPU
    train_loss: list[float]
    val_loss: list[float]
    epochs_trained: int  # epochs computed in this run (0 when served from the cache)
    cache_key: str = field(default="", compare=False)

    def to_cache(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        meta = {"spec": dataclasses.asdict(self.spec), "train_loss": self.train_loss,
                "val_loss": self.val_loss, "epochs_trained": self.epochs_trained}  # fmt: skip
        return self.state, meta

    @classmethod
    def from_cache(cls, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Trained:
        return cls(spec_from_json(meta["spec"]), tensors, meta["train_loss"], meta["val_loss"],
                   meta["epochs_trained"])  # fmt: skip


class Progress:
    """A progress line per epoch, at most one a second (plus the last), so it costs nothing."""

    def __init__(self, log: Callable[[str], None], epochs: int, steps_per_epoch: int):
        self.log, self.epochs, self.steps = log, epochs, steps_per_epoch
        self.start = self.last = time.perf_counter()

    def __call__(self, epoch: int, train_loss: float, val_loss: float) -> None:
        now = time.perf_counter()
        if now - self.last < 1.0 and epoch + 1 < self.epochs and epoch > 0:
            return
        self.last = now
        rate = (epoch + 1) * self.steps / max(now - self.start, 1e-9)
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
) -> Trained:
    model = instantiate(initial.spec, initial.state).to(device)
    opt = make_optimizer(optimizer, model.parameters(), lr, momentum, weight_decay)
    history = fit(model, loaders.train, loaders.val, make_loss(loss), opt, epochs, on_epoch)
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    return Trained(initial.spec, state, history.train, history.val, epochs_trained=epochs)


def train_identity(inputs: dict[str, Any]) -> dict[str, Any]:
    """The result depends on the device type (CPU and CUDA kernels round differently),
    not on the run folder; momentum only matters to SGD."""
    key = {k: v for k, v in inputs.items() if k != "run_dir"}
    key["device"] = resolve_device(inputs["device"]).type
    if inputs["optimizer"] != "sgd":
        key.pop("momentum")
    return key


def log_losses(writer: SummaryWriter, epoch: int, train_loss: float, val_loss: float) -> None:
    # The seed's call: one 'loss' chart with a training and a validation curve.
    writer.add_scalars("loss", {"training": train_loss, "validation": val_loss}, epoch)


@task(name="train-epochs", cache_policy=StageCache(identity=train_identity))
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
) -> Trained:
    progress = Progress(get_run_logger().info, epochs, len(loaders.train))
    with SummaryWriter(str(run_dir)) as writer:

        def on_epoch(epoch: int, train_loss: float, val_loss: float) -> None:
            log_losses(writer, epoch, train_loss, val_loss)
            progress(epoch, train_loss, val_loss)

        return train_model(
            initial, loaders, optimizer, lr, momentum, weight_decay, loss, epochs,
            resolve_device(device), on_epoch,
        )  # fmt: skip


@on_cache_hit(train_epochs)
def _replay_losses(trained: Trained, run_dir: Path, **_: Any) -> Trained:
    """A cached training run still gets its loss curves in this run's TensorBoard."""
    with SummaryWriter(str(run_dir)) as writer:
        for epoch, (train_loss, val_loss) in enumerate(
            zip(trained.train_loss, trained.val_loss, strict=True)
        ):
            log_losses(writer, epoch, train_loss, val_loss)
    return dataclasses.replace(trained, epochs_trained=0)
