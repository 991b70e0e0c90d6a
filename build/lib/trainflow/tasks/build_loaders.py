"""build-loaders: training and validation batches on the device (tasks/data/batches.py)."""

from __future__ import annotations

from typing import Literal

from trainflow.tasks.cache.stage import cache_entry, stage, with_key
from trainflow.tasks.data.batches import Loaders, make_loaders
from trainflow.tasks.data.mapped import MappedDataset
from trainflow.tasks.data.splits import Split
from trainflow.tasks.data.tensors import Dataset
from trainflow.tasks.device import resolve_device


@stage(name="build-loaders")
def build_loaders(
    data: Dataset | MappedDataset,
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
