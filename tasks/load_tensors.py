"""load-tensors: the data as float32 tensors, from the synthetic recipe or a file, through the
stage cache; a table too big for memory goes the memory-mapped way (tasks/data/stream.py)."""

from __future__ import annotations

from trainflow.tasks.cache.stage import cache_enabled, cache_entry, stage
from trainflow.tasks.data import tensors
from trainflow.tasks.data.mapped import too_big
from trainflow.tasks.data.sources import DataFile, Identity
from trainflow.tasks.data.tables import TABLE_FORMATS
from trainflow.tasks.data.tensors import (
    Dataset,
    check_format,
    read_file,
    synthetic,
    table_roles_of,
)
from trainflow.tasks.names import SYNTHETIC


@stage(name="load-tensors")
def load_tensors(
    source: str,
    target: tuple[str, ...],
    n_samples: int,
    data_seed: int,
    noise: float,
    identity: Identity = "content",
    features: tuple[str, ...] = (),
) -> Dataset:
    """The data as float32 tensors, keyed by the file's content (not its name) or the recipe."""
    if source == SYNTHETIC:
        entry = cache_entry("load-tensors", synthetic, n=n_samples, seed=data_seed, noise=noise)
        return entry.resolve(Dataset, lambda: synthetic(n_samples, data_seed, noise))
    suffix = check_format(source, target, features)
    with DataFile(source) as file:  # a remote file is fetched once, for the key and the load
        data = file.identity(identity) if cache_enabled() else None
        if suffix in TABLE_FORMATS and identity == "content":
            # The key reads every byte anyway: naming the default columns keys as leaving them
            # out. A version-identity hit reads nothing, so there the flags key as written.
            features, target = table_roles_of(file, suffix, target, features)
        if suffix in TABLE_FORMATS and too_big(file, suffix, tensors.available_memory()):
            # Imported here: a cached run never loads the table readers (pyarrow).
            from trainflow.tasks.data import stream

            return stream.load_mapped(file, suffix, target, features, data)
        entry = cache_entry(
            "load-tensors", read_file, data=data, format=suffix, target=target, features=features
        )
        return entry.resolve(Dataset, lambda: read_file(file, target, features))
