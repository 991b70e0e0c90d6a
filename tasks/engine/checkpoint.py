"""Training checkpoints: pickle-free, checksummed, atomic, found again by any later run.

One checkpoint is one safetensors file holding every tensor the result depends on (weights,
optimizer state, the shuffle generator at the start of the epoch in progress, the batch losses
of that epoch so far, the loss history, torch's CPU/CUDA RNG states) and a JSON header for the
rest. Its name carries its position, the run that wrote it and the xxh3-128 of its bytes:

    <cache>/checkpoints/<lineage key>/ckpt-<epoch>-<batch>-<owner>-<xxh3>.safetensors

so a truncated or altered file is detected by name alone and skipped for the previous one,
and a run can tell its own files from those of other runs of the lineage, which it never
deletes (README: "Crash-proof training").
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import xxhash
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import Tensor

from trainflow.tasks.cache.store import CacheStore
from trainflow.tasks.errors import StorageError, writing
from trainflow.tasks.files import make_dirs

log = logging.getLogger("trainflow.checkpoints")

# The owner part is optional: files named before runs signed them are read, never deleted.
NAME = re.compile(r"ckpt-(\d{9})-(\d{9})-(?:([0-9a-f]{16})-)?([0-9a-f]{32})\.safetensors")
# atomic_write's temporary name for one of them, left behind if the writer was killed
PARTIAL = re.compile(r"\.ckpt-\d{9}-\d{9}-([0-9a-f]{16})-[0-9a-f]{32}\.safetensors\..*\.tmp")


@dataclass
class TrainState:
    """Where training stands: `batch` batches of `epoch` are done (0 = at the epoch's start)."""

    epoch: int
    batch: int
    model: dict[str, Tensor]
    optimizer: dict[str, Any]  # optimizer.state_dict()
    loader: dict[str, Tensor]  # the shuffle generator at the start of `epoch`
    batch_losses: Tensor  # this epoch's first `batch` training losses (DDP: [world, batch])
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    rng: dict[str, Tensor] = field(default_factory=dict)  # torch's CPU/CUDA RNGs; DDP: every rank's
    metrics: dict[str, list[float]] = field(default_factory=dict)  # per-epoch metrics and lr
    scheduler: dict[str, Any] | None = None  # lr_scheduler.state_dict(): plain JSON values
    best: dict[str, Tensor] = field(default_factory=dict)  # export best: that epoch's weights


def _flatten(state: TrainState) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors = {f"model.{k}": v for k, v in state.model.items()}
    tensors |= {f"loader.{k}": v for k, v in state.loader.items()}
    tensors |= {f"rng.{k}": v for k, v in state.rng.items()}
    tensors["batch_losses"] = state.batch_losses
    tensors["train_loss"] = torch.tensor(state.train_loss, dtype=torch.float64)
    tensors["val_loss"] = torch.tensor(state.val_loss, dtype=torch.float64)
    tensors |= {f"best.{k}": v for k, v in state.best.items()}
    # float64 holds every Python float exactly, as the loss lists do
    tensors |= {
        f"metric.{k}": torch.tensor(v, dtype=torch.float64) for k, v in state.metrics.items()
    }
    plain: dict[str, dict[str, Any]] = {}  # optimizer state that is not a tensor (or is None)
    for param_id, values in state.optimizer["state"].items():
        for name, value in values.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer.{param_id}.{name}"] = value
            else:
                plain.setdefault(str(param_id), {})[name] = value
    meta = {
        "epoch": state.epoch,
        "batch": state.batch,
        "optimizer_plain": plain,
        "optimizer_groups": state.optimizer["param_groups"],
        "scheduler": state.scheduler,  # json.dumps refuses anything that isn't plain data
    }
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, meta


def _unflatten(tensors: dict[str, Tensor], meta: dict[str, Any]) -> TrainState:
    def group(prefix: str) -> dict[str, Tensor]:
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    optimizer_state: dict[int, dict[str, Any]] = {}
    for key, value in group("optimizer.").items():
        param_id, name = key.split(".", 1)
        optimizer_state.setdefault(int(param_id), {})[name] = value
    for param_id, values in meta["optimizer_plain"].items():
        optimizer_state.setdefault(int(param_id), {}).update(values)
    return TrainState(
        epoch=meta["epoch"],
        batch=meta["batch"],
        model=group("model."),
        optimizer={"state": optimizer_state, "param_groups": meta["optimizer_groups"]},
        loader=group("loader."),
        batch_losses=tensors["batch_losses"],
        train_loss=tensors["train_loss"].tolist(),
        val_loss=tensors["val_loss"].tolist(),
        rng=group("rng."),
        metrics={k: v.tolist() for k, v in group("metric.").items()},
        scheduler=meta.get("scheduler"),
        best=group("best."),
    )


def encode(state: TrainState) -> bytes:
    tensors, meta = _flatten(state)
    return safetensors_save(tensors, metadata={"trainflow": json.dumps(meta)})


def decode(data: bytes) -> TrainState:
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    meta = json.loads(header["__metadata__"]["trainflow"])
    return _unflatten(safetensors_load(data), meta)


def owner_token(run: str) -> str:
    """The 16 hex digits that sign a run's checkpoint names: xxh3-64 of its run folder."""
    return xxhash.xxh3_64_hexdigest(run.encode())


@dataclass(frozen=True, order=True)
class Found:
    """A checkpoint file in the lineage's folder, ordered by position."""

    epoch: int
    batch: int
    owner: str  # "" for a file from before names carried one
    checksum: str
    path: str

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]


class Checkpoints:
    """One run's checkpoints of one lineage: saved on a cadence (every N epochs and/or S
    seconds), at the end and when asked to stop; this run's last `keep` kept; resumed from the
    newest intact checkpoint of any run of the lineage.

    Saving is best-effort: a write that fails (full disk, permissions) is a warning, and
    training goes on with the checkpoints it has.
    """

    def __init__(
        self,
        url: str,
        every_epochs: int = 0,
        every_seconds: float = 30.0,
        keep: int = 3,
        owner: str | None = None,
        warn: Callable[[str], None] = log.warning,
    ):
        self.store, self.warn = CacheStore(url), warn
        self.every_epochs, self.every_seconds, self.keep = every_epochs, every_seconds, keep
        # Whose files are ours to delete: the run folder's (a retry or a re-run into the same
        # folder is the same run, and takes over its files); with none given, this object's.
        self.owner = owner_token(owner if owner is not None else secrets.token_hex(16))
        self.last_try = time.monotonic()
        self.saved = 0  # checkpoints written by this object
        self.last_saved: tuple[int, int] | None = None  # (epoch, batch) of the newest of them
        self.error: str | None = None  # why the latest save failed; None once one succeeds
        self._written: list[str] = []  # names this object wrote, oldest first

    def _listing(self) -> list[str]:
        folder = self.store.path()
        return self.store.fs.ls(folder, detail=False) if self.store.fs.exists(folder) else []

    @staticmethod
    def _checkpoints(paths: list[str]) -> list[Found]:
        found = []
        for path in paths:
            if match := NAME.fullmatch(path.rsplit("/", 1)[-1]):
                epoch, batch, owner, checksum = match.groups()
                found.append(Found(int(epoch), int(batch), owner or "", checksum, path))
        return sorted(found)

    def due(self, epoch: int, batch: int) -> bool:
        """Whether the cadence asks for a checkpoint at (epoch, batch); batch 0 is the end of
        epoch - 1, the only place an every-N-epochs cadence applies."""
        if self.every_seconds > 0 and time.monotonic() - self.last_try >= self.every_seconds:
            return True
        return batch == 0 and self.every_epochs > 0 and epoch % self.every_epochs == 0

    def save(self, state: TrainState) -> bool:
        """Write `state`; True if it is on disk. A failure is a warning, never an exception."""
        # Counted from the try: a full disk is retried on the cadence, not after every step.
        self.last_try = time.monotonic()
        data = encode(state)
        checksum = xxhash.xxh3_128_hexdigest(data)
        name = f"ckpt-{state.epoch:09d}-{state.batch:09d}-{self.owner}-{checksum}.safetensors"
        try:
            with writing(f"a checkpoint to {self.store.url!r}"):
                if self.store.local:
                    make_dirs(self.store.path())  # durably: a new folder is synced into its parent
                self.store.write(self.store.path(name), data)
        except StorageError as exc:
            if str(exc) != self.error:  # once per cause, not at every try
                self.warn(
                    f"{exc}; training goes on (this run's last checkpoint: {self.describe_last()})"
                )
            self.error = str(exc)
            return False
        if self.error is not None:
            self.warn(f"checkpoints are written again (epoch {state.epoch}, batch {state.batch})")
        self.error = None
        self.saved += 1
        self.last_saved = (state.epoch, state.batch)
        self._written.append(name)
        self._prune()
        return True

    def _prune(self) -> None:
        """Delete this run's checkpoints but the `keep` it wrote last, and its partial writes.

        Never another run's: each file in the folder is some run's crash protection (a shorter
        run's, a longer one's, one running right now) and this run can't know when that run
        is done with it; `trainflow cache prune` clears what finished runs leave. A file that
        is gone already is as good as deleted.
        """
        try:
            listing = self._listing()
        except OSError:
            return  # nothing deleted is nothing lost; the next save tries again
        mine = {f.name: f for f in self._checkpoints(listing) if f.owner == self.owner}
        # Earlier attempts' files (by position), then this object's (in the order written).
        written = [name for name in self._written if name in mine]
        ordered = [name for name in mine if name not in written] + written
        doomed = [mine[name].path for name in ordered[: -self.keep]]
        doomed += [path for path in listing if self._is_my_partial_write(path)]
        for path in doomed:
            try:
                self.store.fs.rm_file(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                self.warn(f"cannot delete the old checkpoint {path.rsplit('/', 1)[-1]}: {exc}")
        self._written = written[-self.keep :]

    def _is_my_partial_write(self, path: str) -> bool:
        match = PARTIAL.fullmatch(path.rsplit("/", 1)[-1])
        return match is not None and match[1] == self.owner

    def describe_last(self) -> str:
        if self.last_saved is None:
            return "none"
        return f"epoch {self.last_saved[0]}, batch {self.last_saved[1]}"

    def latest(self, max_epoch: int) -> TrainState | None:
        """The newest intact checkpoint at or before `max_epoch` epochs, written by any run of
        the lineage; a damaged one is skipped with a warning, a vanished one silently."""
        found = self._newest(max_epoch)
        return found[1] if found else None

    def latest_bytes(self, max_epoch: int) -> bytes | None:
        """`latest`'s checkpoint as its file's bytes (DDP's rank 0 sends them to the others)."""
        found = self._newest(max_epoch)
        return found[0] if found else None

    def _newest(self, max_epoch: int) -> tuple[bytes, TrainState] | None:
        try:
            files = self._checkpoints(self._listing())
        except OSError as exc:
            self.warn(f"cannot list the checkpoints in {self.store.url!r} ({exc}); starting over")
            return None
        for found in reversed(files):
            if (found.epoch, found.batch) > (max_epoch, 0):
                continue
            try:
                data = self.store.read(found.path)
                if xxhash.xxh3_128_hexdigest(data) != found.checksum:
                    raise ValueError("checksum mismatch (truncated or altered)")
                return data, decode(data)
            except FileNotFoundError:
                continue  # its run pruned it since the listing: an older one will do
            except (ValueError, KeyError, OSError, RuntimeError, SafetensorError) as exc:
                self.warn(f"skipping checkpoint {found.name}: {exc}")
        return None


@dataclass(frozen=True)
class CheckpointSettings:
    """Where and how often train-epochs checkpoints (a task input, not part of its key)."""

    cache_root: str
    every_epochs: int = 0
    every_seconds: float = 30.0
    keep: int = 3
    resume: bool = True  # False under --refresh-cache: start over, still write checkpoints

    def open(
        self, lineage: str, run: str | None = None, warn: Callable[[str], None] = log.warning
    ) -> Checkpoints:
        """The lineage's checkpoints, as seen by `run`: its run folder, whose files it deletes.
        `warn` says what went wrong with a checkpoint (the stage hands in the run's logger)."""
        folder = f"{self.cache_root}/checkpoints/{lineage}"
        return Checkpoints(
            folder, self.every_epochs, self.every_seconds, self.keep, owner=run, warn=warn
        )
