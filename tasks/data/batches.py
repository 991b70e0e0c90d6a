"""Training and validation batches, resumable at any (epoch, batch).

Batches hold data, never a position: an epoch's order is drawn from a generator that the
caller makes (`shuffle()`) and passes in, so a retried task, which gets the same Loaders
object, sees exactly the batches the first attempt saw.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler, TensorDataset

from trainflow.tasks.data.mapped import MappedDataset, MappedTable
from trainflow.tasks.data.splits import Split

if TYPE_CHECKING:  # only named here: the engine, which imports this module, reads no files
    from trainflow.tasks.data.tensors import Dataset

Batch = tuple[Tensor, Tensor]


class Batches(Protocol):
    """One split's rows in batches; `epoch(generator)` draws that epoch's order from it."""

    batch_size: int

    def __len__(self) -> int: ...

    def shuffle(self) -> torch.Generator | None:
        """A new generator at its state before epoch 0's draw; None if the rows stay in order."""
        ...

    def epoch(self, generator: torch.Generator | None, start_batch: int = 0) -> Iterator[Batch]:
        """One epoch's batches from `start_batch` on, in an order drawn from `generator`."""
        ...


def epoch_order(n: int, generator: torch.Generator | None) -> Tensor | None:
    """This epoch's row order: one permutation drawn from `generator`, or None for in order.

    One randperm per epoch, so the 'tensor' and 'dataloader' paths visit rows in the same
    order, and the generator's state at an epoch's start says where the epoch stands.
    """
    return None if generator is None else torch.randperm(n, generator=generator)


class _Seeded:
    seed: int | None  # None: every epoch in row order

    def shuffle(self) -> torch.Generator | None:
        # A CPU generator: the same order on every device.
        return None if self.seed is None else torch.Generator().manual_seed(self.seed)

    def _check(self, generator: torch.Generator | None) -> None:
        # Either would silently train on another order than the seed promises.
        if (generator is None) != (self.seed is None):
            wanted = "no generator" if self.seed is None else "the generator from shuffle()"
            raise ValueError(f"these batches need {wanted} to draw an epoch's order")


class TensorBatches(_Seeded):
    """Batches as slices of tensors already on the training device: no per-sample collation.

    A shuffled epoch gathers the rows once in permuted order, then every batch is a view.
    """

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, seed: int | None):
        self.x, self.y, self.batch_size, self.seed = x, y, batch_size, seed

    def __len__(self) -> int:
        return math.ceil(self.x.shape[0] / self.batch_size)

    def epoch(self, generator: torch.Generator | None, start_batch: int = 0) -> Iterator[Batch]:
        self._check(generator)
        x, y = self.x, self.y
        order = epoch_order(x.shape[0], generator)
        if order is not None:
            order = order.to(x.device, non_blocking=True)
            x, y = x.index_select(0, order), y.index_select(0, order)
        if x.shape[0] == 0:  # split() would make one empty batch of none
            return iter(())
        # The same views as slicing batch by batch, in two calls instead of two a batch.
        batches = zip(x.split(self.batch_size), y.split(self.batch_size), strict=True)
        return batches if start_batch == 0 else itertools.islice(batches, start_batch, None)


class EpochIndices(Sampler[int]):
    """The row indices of the epoch being read, which DataLoaderBatches sets before each one."""

    def __init__(self) -> None:
        self.indices: list[int] = []

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)


class DataLoaderBatches(_Seeded):
    """torch DataLoader batches (workers, pinned memory) for data the tensor path can't hold."""

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batch_size: int,
        seed: int | None,
        device: torch.device,
        num_workers: int,
    ):
        self.n, self.batch_size, self.seed, self.device = x.shape[0], batch_size, seed, device
        # Sampling runs in this process; workers only fetch the rows it names. The indices are
        # set whole at the start of every epoch, so nothing of an earlier epoch carries over.
        self.sampler = EpochIndices()
        self.loader = DataLoader(
            TensorDataset(x, y),
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=num_workers,
            pin_memory=device.type == "cuda",
            persistent_workers=num_workers > 0,
        )

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def epoch(self, generator: torch.Generator | None, start_batch: int = 0) -> Iterator[Batch]:
        self._check(generator)
        order = epoch_order(self.n, generator)
        indices = range(self.n) if order is None else order.tolist()
        self.sampler.indices = list(indices[start_batch * self.batch_size :])
        for x, y in self.loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


class MappedBatches(_Seeded):
    """Batches gathered row by row from a memory-mapped table (data larger than memory).

    The same epoch order as TensorBatches (one randperm over the split's rows from the same
    generator), so the same batches, bit for bit; only where the rows come from differs.
    """

    def __init__(
        self,
        table: MappedTable,
        rows: Tensor,
        batch_size: int,
        seed: int | None,
        device: torch.device,
    ):
        self.table, self.rows, self.batch_size, self.seed = table, rows, batch_size, seed
        self.device = device

    def __len__(self) -> int:
        return math.ceil(len(self.rows) / self.batch_size)

    def epoch(self, generator: torch.Generator | None, start_batch: int = 0) -> Iterator[Batch]:
        self._check(generator)
        order = epoch_order(len(self.rows), generator)
        for start in range(start_batch * self.batch_size, len(self.rows), self.batch_size):
            # Batch by batch: the whole permuted index would be another copy of the split.
            batch = slice(start, start + self.batch_size)
            rows = self.rows[batch] if order is None else self.rows[order[batch]]
            x, y = self.table.gather(rows)
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


@dataclass
class Loaders:
    """A cheap view of tensors already cached upstream: built every run, never stored."""

    train: Batches
    val: Batches
    sample: Tensor  # a real input batch (CPU) for add_graph and torch.export
    cache_key: str = ""


def make_loaders(
    data: Dataset | MappedDataset,
    parts: Split,
    batch_size: int,
    shuffle_seed: int,
    kind: Literal["tensor", "dataloader"],
    num_workers: int,
    device: torch.device,
) -> Loaders:
    if isinstance(data, MappedDataset):  # `kind` and workers: the map is read in this process
        train = MappedBatches(data.table, parts.train, batch_size, shuffle_seed, device)
        val = MappedBatches(data.table, parts.val, batch_size, None, device)
        sample = data.table.gather(parts.train[:batch_size])[0]
        return Loaders(train=train, val=val, sample=sample)
    x_train, y_train = data.x[parts.train], data.y[parts.train]
    x_val, y_val = data.x[parts.val], data.y[parts.val]
    sample = x_train[:batch_size].clone()
    if kind == "tensor":
        train = TensorBatches(x_train.to(device), y_train.to(device), batch_size, shuffle_seed)
        val = TensorBatches(x_val.to(device), y_val.to(device), batch_size, None)
    else:
        train = DataLoaderBatches(x_train, y_train, batch_size, shuffle_seed, device, num_workers)
        val = DataLoaderBatches(x_val, y_val, batch_size, None, device, num_workers)
    return Loaders(train=train, val=val, sample=sample)
