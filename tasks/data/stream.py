"""load-tensors on the memory-mapped path: a table too big for memory, read once a block of
rows at a time (`iter_columns` of tasks/data/tables.py: the same columns, conversions and
one-line errors as the whole-file read) into a memory-mapped safetensors file."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import IO, Protocol

import numpy as np
import pyarrow.parquet as pq
import torch

from trainflow.tasks.cache.stage import StageEntry, cache_entry
from trainflow.tasks.data.mapped import (
    MappedDataset,
    MappedTable,
    MappedWriter,
    Scratch,
)
from trainflow.tasks.data.mapped_arrays import keep_mapped
from trainflow.tasks.data.sources import DataFile
from trainflow.tasks.data.tables import (
    CSV_BYTES_PER_ROW,
    categorical_columns,
    column_names,
    iter_columns,
)
from trainflow.tasks.data.tensors import non_finite, table_roles
from trainflow.tasks.errors import InputError

CHUNK_ROWS = 1 << 16  # rows read at a time
# Even a small file is read in a few chunks (a chunk is at least a few rows): the code that
# joins chunks runs on every file, so a test's small table exercises it too.
CHUNKS_AT_LEAST = 16


class Sink(Protocol):
    def append(self, x: np.ndarray, y: np.ndarray) -> None: ...


class _NonFinite:
    """NaN/Inf over all chunks: `_checked`'s message (count, first row and column)."""

    def __init__(self) -> None:
        self.found: dict[str, tuple[int, int, int]] = {}

    def add(self, name: str, array: np.ndarray, first_row: int) -> None:
        if found := non_finite(torch.from_numpy(array)):
            count, row, col = found
            if name in self.found:
                total, row0, col0 = self.found[name]
                self.found[name] = (total + count, row0, col0)
            else:
                self.found[name] = (count, first_row + row, col)

    def check(self, roles: dict[str, tuple[str, ...]], source: str) -> None:
        for name, names in roles.items():
            if name in self.found:
                count, row, col = self.found[name]
                raise InputError(
                    f"data file {source!r}: {count} NaN/Inf value(s) in {name}, "
                    f"first at row {row}, column {names[col]!r}"
                )


def _rows_per_chunk(file: DataFile, suffix: str) -> int:
    """CHUNK_ROWS, or fewer for a small file so that it still comes in several chunks."""
    if suffix == ".parquet":
        with file.open() as f:
            rows = pq.read_metadata(f).num_rows
    else:  # CSV (its parser's blocks are bytes) and Arrow files: from the size
        rows = file.size // CSV_BYTES_PER_ROW
    return min(CHUNK_ROWS, max(8, rows // CHUNKS_AT_LEAST))


def stream_table(
    file: DataFile,
    suffix: str,
    target: tuple[str, ...],
    features: tuple[str, ...],
    open_sink: Callable[[int, int], Sink],
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Read `file` once, chunk by chunk, into the sink `open_sink(n_features, n_targets)`
    makes; the feature and target names. A one-line InputError for a bad cell (its row, in a
    CSV its line, and column), a NaN/Inf, a text column, or no rows."""
    source = file.url
    with file.open() as f:
        chosen, targets = table_roles(column_names(f, suffix, source), target, features, source)
        sink = open_sink(len(chosen), len(targets))
        rows, bad = 0, _NonFinite()
        names = (*chosen, *targets)
        every = _rows_per_chunk(file, suffix)
        try:
            # No vocabularies: on this path every column is numbers (a text cell is a bad cell).
            for block in iter_columns(f, suffix, source, names, {}, every):
                x = np.ascontiguousarray(block[:, : len(chosen)])
                y = np.ascontiguousarray(block[:, len(chosen) :])
                bad.add("x", x, rows)
                bad.add("y", y, rows)
                sink.append(x, y)
                rows += len(block)
        except InputError:
            _refuse_text(f, suffix, chosen, source, every)
            raise
    bad.check({"x": chosen, "y": targets}, source)
    return chosen, targets


def _refuse_text(
    f: IO[bytes], suffix: str, chosen: tuple[str, ...], source: str, rows_per_block: int
) -> None:
    """Categorical columns need the training rows' vocabulary before the ids are written:
    not on this path yet (README). A categorical column always fails the numbers-only read
    (its cells are text or blank); which columns are categorical is the whole read's own
    test over every block, in every format alike (a Parquet string column of numbers is
    numbers here, as in a CSV), so it is asked only once the read has failed."""
    try:
        text = categorical_columns(f, suffix, source, chosen, rows_per_block)
    except InputError:  # the read's own error, already raised, says what is wrong
        return
    if text:
        raise InputError(
            f"data file {source!r}: column {text[0]!r} is text (categorical); a table too "
            "big for memory takes numeric columns only (README, 'Data larger than memory')"
        ) from None


def convert_to_map(
    file: DataFile,
    suffix: str,
    target: tuple[str, ...],
    features: tuple[str, ...],
    scratch: Scratch,
) -> MappedDataset:
    """The table written once into `scratch`'s file (never held whole), and mapped."""
    opened: list[MappedWriter] = []  # the header says the widths: opened once it is read

    def open_writer(n_features: int, n_targets: int) -> MappedWriter:
        opened.append(MappedWriter(scratch.path, n_features, n_targets))
        return opened[0]

    try:
        chosen, targets = stream_table(file, suffix, target, features, open_writer)
        opened[0].finish()
    except BaseException:  # a bad cell, a full disk, Ctrl-C: no file is left half-written
        for writer in opened:
            writer.abort()
        scratch.discard()  # now: the traceback keeps `scratch` alive for as long as it lives
        raise
    return MappedDataset(MappedTable(scratch.path, scratch), chosen, targets)


def load_mapped(
    file: DataFile, suffix: str, target: tuple[str, ...], features: tuple[str, ...], data: object
) -> MappedDataset | object:
    """load-tensors on the memory-mapped path: a hit maps the cached file; a miss converts the
    table into the cache's blob folder, and the entry adopts the file when it is kept."""
    entry: StageEntry = cache_entry(
        "load-tensors",
        convert_to_map,
        data=data,
        format=suffix,
        target=target,
        features=features,
        layout="mapped",
    )
    convert = functools.partial(convert_to_map, file, suffix, target, features)
    return keep_mapped(entry, file.url, convert)
