"""Training checkpoints: pickle-free, checksummed, atomic, found again by any later run.

One checkpoint is one safetensors file holding every tensor the result depends on (weights,
optimizer state, the shuffle generator at the start of the epoch in progress, the batch losses
of that epoch so far, the loss history, torch's CPU/CUDA RNG states) and a JSON header for the
rest. Its name carries its position and the xxh3-128 of its bytes:

    <cache>/checkpoints/<lineage key>/ckpt-<epoch>-<batch>-<xxh3>.safetensors

so a truncated or altered file is detected by name alone and skipped for the previous one.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import xxhash
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import Tensor

from tasks.errors import writing
from tasks.stage import warn
from tasks.store import CacheStore

NAME = re.compile(r"ckpt-(\d{9})-(\d{9})-([0-9a-f]{32})\.safetensors")


@dataclass
class TrainState:
    """Where training stands: `batch` batches of `epoch` are done (0 = at the epoch's start)."""

    epoch: int
    batch: int
    model: dict[str, Tensor]
    optimizer: dict[str, Any]  # optimizer.state_dict()
    loader: dict[str, Tensor]  # the shuffle generator at the start of `epoch`
    batch_losses: Tensor  # this epoch's first `batch` training losses
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    rng: dict[str, Tensor] = field(default_factory=dict)  # torch's global CPU/CUDA RNG states


def _flatten(state: TrainState) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors = {f"model.{k}": v for k, v in state.model.items()}
    tensors |= {f"loader.{k}": v for k, v in state.loader.items()}
    tensors |= {f"rng.{k}": v for k, v in state.rng.items()}
    tensors["batch_losses"] = state.batch_losses
    tensors["train_loss"] = torch.tensor(state.train_loss, dtype=torch.float64)
    tensors["val_loss"] = torch.tensor(state.val_loss, dtype=torch.float64)
    plain: dict[str, dict[str, Any]] = {}  # optimizer state that is not a tensor (or is None)
    for param_id, values in state.optimizer["state"].items():
        for name, value in values.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer.{param_id}.{name}"] = value
            else:
                plain.setdefault(str(param_id), {})[name] = value
    meta = {"epoch": state.epoch, "batch": state.batch, "optimizer_plain": plain,
            "optimizer_groups": state.optimizer["param_groups"]}  # fmt: skip
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
    )


def encode(state: TrainState) -> bytes:
    tensors, meta = _flatten(state)
    return safetensors_save(tensors, metadata={"trainflow": json.dumps(meta)})


def decode(data: bytes) -> TrainState:
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    meta = json.loads(header["__metadata__"]["trainflow"])
    return _unflatten(safetensors_load(data), meta)


class Checkpoints:
    """Save on a cadence (every N epochs and/or S seconds, and at the end); keep the last few."""

    def __init__(
        self,
        url: str,
        every_epochs: int = 0,
        every_seconds: float = 30.0,
        keep: int = 3,
    ):
        self.store = CacheStore(url)
        self.every_epochs, self.every_seconds, self.keep = every_epochs, every_seconds, keep
        self.last_save = time.monotonic()
        self.saved = 0

    def _files(self) -> list[tuple[int, int, str, str]]:
        folder = self.store.path()
        if not self.store.fs.exists(folder):
            return []
        found = []
        for path in self.store.fs.ls(folder, detail=False):
            if match := NAME.fullmatch(path.rsplit("/", 1)[-1]):
                found.append((int(match[1]), int(match[2]), match[3], path))
        return sorted(found)

    def time_due(self) -> bool:
        return self.every_seconds > 0 and time.monotonic() - self.last_save >= self.every_seconds

    def epoch_due(self, epochs_done: int) -> bool:
        return self.time_due() or (self.every_epochs > 0 and epochs_done % self.every_epochs == 0)

    def save(self, state: TrainState) -> str:
        data = encode(state)
        checksum = xxhash.xxh3_128_hexdigest(data)
        path = self.store.path(f"ckpt-{state.epoch:09d}-{state.batch:09d}-{checksum}.safetensors")
        with writing(f"a checkpoint to {self.store.url!r}"):  # the older ones stay as they are
            self.store.write(path, data)
        self.last_save = time.monotonic()
        self.saved += 1
        for *_, old in self._files()[: -self.keep]:
            self.store.fs.rm_file(old)
        return path

    def latest(self, max_epoch: int) -> TrainState | None:
        """The newest intact checkpoint at or before `max_epoch` epochs; a bad one is skipped."""
        for epoch, batch, checksum, path in reversed(self._files()):
            if epoch > max_epoch or (epoch == max_epoch and batch > 0):
                continue
            try:
                data = self.store.read(path)
                if xxhash.xxh3_128_hexdigest(data) != checksum:
                    raise ValueError("checksum mismatch (truncated or altered)")
                return decode(data)
            except (ValueError, KeyError, OSError, RuntimeError, SafetensorError) as exc:
                warn(f"skipping checkpoint {path.rsplit('/', 1)[-1]}: {exc}")
        return None


@dataclass(frozen=True)
class Checkpointing:
    """Where and how often train-epochs checkpoints (a task input, not part of its key)."""

    cache_root: str
    every_epochs: int = 0
    every_seconds: float = 30.0
    keep: int = 3
    resume: bool = True  # False under --refresh-cache: start over, still write checkpoints

    def open(self, lineage: str) -> Checkpoints:
        return Checkpoints(f"{self.cache_root}/checkpoints/{lineage}", self.every_epochs,
                           self.every_seconds, self.keep)  # fmt: skip
