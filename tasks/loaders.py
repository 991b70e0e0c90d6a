"""build-loaders: training and validation batches, resumable at any (epoch, batch)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler, TensorDataset

from tasks.data import Dataset
from tasks.device import resolve_device
from tasks.split import Split
from tasks.stage import cache_entry, stage, with_key

Batch = tuple[Tensor, Tensor]


class Batches(Protocol):
    """One epoch of batches per call to `epoch`; `state_dict` is the shuffle position."""

    batch_size: int

    def __len__(self) -> int: ...

    def epoch(self, start_batch: int = 0) -> Iterator[Batch]: ...

    def state_dict(self) -> dict[str, Tensor]: ...

    def load_state_dict(self, state: dict[str, Tensor]) -> None: ...


def epoch_order(n: int, generator: torch.Generator | None) -> Tensor | None:
    """This epoch's row order: a permutation drawn from `generator`, or None for in order.

    One randperm per epoch, the draw a DataLoader's RandomSampler makes from its generator,
    so the 'tensor' and 'dataloader' paths visit rows in the same order.
    """
    return None if generator is None else torch.randperm(n, generator=generator)


class _GeneratorState:
    generator: torch.Generator | None

    def state_dict(self) -> dict[str, Tensor]:
        return {} if self.generator is None else {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if self.generator is not None:
            self.generator.set_state(state["generator"])


class TensorBatches(_GeneratorState):
    """Batches as slices of tensors already on the training device: no per-sample collation.

    A shuffled epoch gathers the rows once in permuted order, then every batch is a view.
    """

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, generator: torch.Generator | None):
        self.x, self.y, self.batch_size, self.generator = x, y, batch_size, generator

    def __len__(self) -> int:
        return math.ceil(self.x.shape[0] / self.batch_size)

    def epoch(self, start_batch: int = 0) -> Iterator[Batch]:
        x, y = self.x, self.y
        order = epoch_order(x.shape[0], self.generator)
        if order is not None:
            order = order.to(x.device, non_blocking=True)
            x, y = x.index_select(0, order), y.index_select(0, order)
        for start in range(start_batch * self.batch_size, x.shape[0], self.batch_size):
            yield x[start : start + self.batch_size], y[start : start + self.batch_size]


class EpochSampler(Sampler[int]):
    """Yields epoch_order's indices from a start offset, so a resumed epoch skips cheaply."""

    def __init__(self, n: int, generator: torch.Generator | None):
        self.n, self.generator, self.start = n, generator, 0

    def __len__(self) -> int:
        return self.n - self.start

    def __iter__(self) -> Iterator[int]:
        order = epoch_order(self.n, self.generator)
        indices = range(self.n) if order is None else order.tolist()
        yield from indices[self.start :]


class DataLoaderBatches(_GeneratorState):
    """torch DataLoader batches (workers, pinned memory) for data the tensor path can't hold."""

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batch_size: int,
        generator: torch.Generator | None,
        device: torch.device,
        num_workers: int,
    ):
        self.batch_size, self.generator, self.device = batch_size, generator, device
        self.sampler = EpochSampler(x.shape[0], generator)
        self.loader = DataLoader(
            TensorDataset(x, y),
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=num_workers,
            pin_memory=device.type == "cuda",
            persistent_workers=num_workers > 0,
        )

    def __len__(self) -> int:
        return math.ceil(self.sampler.n / self.batch_size)

    def epoch(self, start_batch: int = 0) -> Iterator[Batch]:
        self.sampler.start = start_batch * self.batch_size
        for x, y in self.loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


@dataclass
class Loaders:
    """A cheap view of tensors already cached upstream: built every run, never stored."""

    train: Batches
    val: Batches
    sample: Tensor  # a real input batch (CPU) for add_graph and torch.export
    cache_key: str = ""


def make_loaders(
    data: Dataset,
    parts: Split,
    batch_size: int,
    shuffle_seed: int,
    kind: Literal["tensor", "dataloader"],
    num_workers: int,
    device: torch.device,
) -> Loaders:
    shuffle = torch.Generator().manual_seed(shuffle_seed)  # CPU: same order on every device
    x_train, y_train = data.x[parts.train], data.y[parts.train]
    x_val, y_val = data.x[parts.val], data.y[parts.val]
    sample = x_train[:batch_size].clone()
    if kind == "tensor":
        train = TensorBatches(x_train.to(device), y_train.to(device), batch_size, shuffle)
        val = TensorBatches(x_val.to(device), y_val.to(device), batch_size, None)
    else:
        train = DataLoaderBatches(x_train, y_train, batch_size, shuffle, device, num_workers)
        val = DataLoaderBatches(x_val, y_val, batch_size, None, device, num_workers)
    return Loaders(train=train, val=val, sample=sample)


@stage(name="build-loaders")
def build_loaders(
    data: Dataset,
    parts: Split,
    batch_size: int,
    shuffle_seed: int,
    kind: Literal["tensor", "dataloader"],
    num_workers: int,
    device: str,
) -> Loaders:
    """Not cached: a cheap view of tensors cached upstream. Its key says which batches these
    are (data, split, batch size, shuffle), not how they arrive (device, loader kind,
    workers), so those settings don't split the training cache."""
    entry = cache_entry(
        "build-loaders",
        make_loaders,
        data=data,
        parts=parts,
        batch_size=batch_size,
        shuffle_seed=shuffle_seed,
    )
    loaders = make_loaders(
        data, parts, batch_size, shuffle_seed, kind, num_workers, resolve_device(device)
    )
    return with_key(loaders, entry.key)
