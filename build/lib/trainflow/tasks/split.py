"""split: reproducible train/validation indices, through the stage cache."""

from __future__ import annotations

from trainflow.tasks.cache.stage import cache_entry, stage
from trainflow.tasks.data.splits import Split, split_indices, split_sizes
from trainflow.tasks.names import SYNTHETIC


@stage(name="split")
def split(n_rows: int, val_fraction: float, seed: int, source: str | None = None) -> Split:
    """`source` names the data in an error only: the split of N rows is the same for any file."""
    split_sizes(n_rows, val_fraction, None if source == SYNTHETIC else source)
    entry = cache_entry("split", split_indices, n=n_rows, val_fraction=val_fraction, seed=seed)
    return entry.resolve(Split, lambda: split_indices(n_rows, val_fraction, seed))
