"""Reproducible train/validation indices, as the seed's `random_split` draws them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from trainflow.tasks.errors import InputError
from trainflow.tasks.rules import train_size


@dataclass(frozen=True)
class Split:
    train: Tensor  # int64 row indices
    val: Tensor
    cache_key: str = field(default="", compare=False)

    def to_cache(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return {"train": self.train, "val": self.val}, {}

    @classmethod
    def from_cache(cls, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Split:
        return cls(tensors["train"], tensors["val"])


def split_sizes(n: int, val_fraction: float, source: str | None = None) -> tuple[int, int]:
    """(n_train, n_val) as the seed computes them: n_train = int(n * ratio).

    `source`, the data file the rows come from, is named in the error: a file too small for
    the split is the file's problem as much as the flag's.
    """
    n_train = train_size(n, val_fraction)
    if n_train == 0 or n_train == n:
        empty = "training" if n_train == 0 else "validation"
        rows = f"{n} row" if n == 1 else f"{n} rows"
        rule = f"--val-fraction {val_fraction} leaves the {empty} split empty"
        if source is None:
            raise InputError(f"{rule} for {rows}")
        raise InputError(f"data file {source!r} has {rows}: {rule}")
    return n_train, n - n_train


def split_indices(n: int, val_fraction: float, seed: int) -> Split:
    """Same indices as torch.manual_seed(seed); random_split(range(n), [n_train, n_val])."""
    n_train, _ = split_sizes(n, val_fraction)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return Split(train=perm[:n_train].clone(), val=perm[n_train:].clone())
