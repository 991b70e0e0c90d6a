"""load-tensors: the data as tensors, from the synthetic recipe, a file or an image folder,
through the stage cache; a table too big for memory goes the memory-mapped way
(tasks/data/stream.py)."""

from __future__ import annotations

from prefect import get_run_logger

from trainflow.tasks.cache.stage import cache_enabled, cache_entry, stage
from trainflow.tasks.data import tensors
from trainflow.tasks.data.mapped import too_big
from trainflow.tasks.data.sources import DataFile, Identity
from trainflow.tasks.data.tables import TABLE_FORMATS
from trainflow.tasks.data.tensors import (
    ARRAY_FORMATS,
    Dataset,
    check_format,
    image_dataset,
    is_image_folder,
    read_file,
    synthetic,
    table_roles_of,
)
from trainflow.tasks.errors import InputError
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
    image_size: tuple[int, ...] = (),
) -> Dataset:
    """The data as tensors, keyed by the file's content (not its name) or the recipe; an image
    folder by every file's bytes and its class layout (not where it is)."""
    if source == SYNTHETIC:
        entry = cache_entry("load-tensors", synthetic, n=n_samples, seed=data_seed, noise=noise)
        return entry.resolve(Dataset, lambda: synthetic(n_samples, data_seed, noise))
    if is_image_folder(source):
        return _load_image_folder(source, target, features, image_size)
    if image_size:
        raise InputError(f"--image-size applies to image folders only, not {source!r}")
    suffix = check_format(source, target, features)
    with DataFile(source) as file:  # a remote file is fetched once, for the key and the load
        data = file.identity(identity) if cache_enabled() else None
        if suffix in TABLE_FORMATS and identity == "content":
            # The key reads every byte anyway: naming the default columns keys as leaving them
            # out. A version-identity hit reads nothing, so there the flags key as written.
            features, target = table_roles_of(file, suffix, target, features)
        if suffix in ARRAY_FORMATS and too_big(file, suffix, tensors.available_memory()):
            from trainflow.tasks.data import mapped_arrays  # here: as the tables' below

            return mapped_arrays.load_mapped_arrays(file, suffix, data)
        if suffix in TABLE_FORMATS and too_big(file, suffix, tensors.available_memory()):
            # Imported here: a cached run never loads the table readers (pyarrow).
            from trainflow.tasks.data import stream

            return stream.load_mapped(file, suffix, target, features, data)
        entry = cache_entry(
            "load-tensors", read_file, data=data, format=suffix, target=target, features=features
        )
        return entry.resolve(Dataset, lambda: read_file(file, target, features))


def _load_image_folder(
    source: str, target: tuple[str, ...], features: tuple[str, ...], image_size: tuple[int, ...]
) -> Dataset:
    if target or features:
        flag = "--target" if target else "--features"
        raise InputError(f"{flag} applies to tables only, not the image folder {source!r}")
    # Imported here: only a run on an image folder loads Pillow.
    from trainflow.tasks.data import images

    folder = images.scan_image_folder(source)
    size = (image_size[0], image_size[1]) if image_size else None
    layout = images.folder_identity(folder) if cache_enabled() else None
    entry = cache_entry("load-tensors", image_dataset, folder=layout, image_size=size)
    # Decoded from the bytes the key was made of, or refused (a file rewritten meanwhile).
    digests = {relative: digest for relative, _, digest in layout["files"]} if layout else None
    log = get_run_logger().info
    return entry.resolve(Dataset, lambda: image_dataset(folder, size, log, digests))
