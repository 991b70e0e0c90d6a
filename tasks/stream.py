"""Tables read in row chunks (pyarrow), converted to float32 as they stream: the memory-mapped
path of load-tensors, and Parquet's whole-file read, share one conversion."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import IO, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import torch
from prefect import get_run_logger
from prefect.exceptions import MissingContextError

from tasks.data import _locate_bad_cell, _non_finite, csv_header
from tasks.errors import InputError
from tasks.mapped import MappedDataset, MappedTable, MappedWriter, Scratch, in_memory_limit
from tasks.sources import DataFile
from tasks.stage import StageEntry, cache_entry, warn

log = logging.getLogger("trainflow.data")

CHUNK_ROWS = 1 << 16  # Parquet's batch; a CSV block of BLOCK_BYTES holds about as many rows
BLOCK_BYTES = 8 << 20
# Even a small file is read in a few chunks (a chunk is at least a few rows): the code that
# joins chunks runs on every file, so a test's small table exercises it too.
CHUNKS_AT_LEAST = 16
PROGRESS_S = 5.0  # a progress line this often, for files that take longer than that
MAPPABLE = (".csv", ".parquet")


class Sink(Protocol):
    def append(self, x: np.ndarray, y: np.ndarray) -> None: ...


class Columns:
    """Which columns of a table are the features and which the targets (as `_from_csv`)."""

    def __init__(self, header: list[str], target: tuple[str, ...], source: str):
        if len(header) < 2:
            raise InputError(f"data file {source!r}: needs a header row and at least 2 columns")
        self.header, self.targets = header, target or (header[-1],)
        for name in self.targets:
            if header.count(name) == 0:
                raise InputError(
                    f"data file {source!r}: target column {name!r} not found "
                    f"(columns: {', '.join(header)})"
                )
            if header.count(name) > 1:
                raise InputError(f"data file {source!r}: target column {name!r} appears twice")
        self.target_idx = [header.index(name) for name in self.targets]
        self.feature_idx = [i for i in range(len(header)) if i not in self.target_idx]
        if not self.feature_idx:
            raise InputError(f"data file {source!r}: no feature columns left besides the target")

    @property
    def features(self) -> tuple[str, ...]:
        return tuple(self.header[i] for i in self.feature_idx)


class Progress:
    """Rows read and MB/s, to the task's log, every PROGRESS_S."""

    def __init__(self, source: str, size: int):
        self.source, self.size, self.start = source, size, time.perf_counter()
        self.last = self.start

    def update(self, rows: int, position: int) -> None:
        now = time.perf_counter()
        if now - self.last < PROGRESS_S:
            return
        self.last = now
        rate = position / (now - self.start) / 1e6
        done, size = position / 1e6, self.size / 1e6
        line = f"{self.source}: {rows:,} rows read, {done:,.0f} of {size:,.0f} MB ({rate:.0f} MB/s)"
        try:
            get_run_logger().info(line)
        except MissingContextError:
            log.info(line)


def _position(f: IO[bytes]) -> int:
    try:
        return f.tell()
    except (OSError, ValueError):
        return 0


def _csv_batches(f: IO[bytes], header: list[str], size: int) -> Iterator[pa.RecordBatch]:
    names = [f"c{i}" for i in range(len(header))]  # header names may repeat or be blank
    block = min(BLOCK_BYTES, max(1 << 10, size // CHUNKS_AT_LEAST))
    reader = pacsv.open_csv(
        f,
        read_options=pacsv.ReadOptions(column_names=names, skip_rows=1, block_size=block),
        # float64, then float32 below: the same rounding as numpy's float32 parse of the text.
        # No null spellings: "nan" is a NaN (reported as numpy's parse reports it), "" an error.
        convert_options=pacsv.ConvertOptions(
            column_types=dict.fromkeys(names, pa.float64()), null_values=[]
        ),
    )
    yield from reader


def _parquet_batches(f: IO[bytes], source: str) -> tuple[list[str], Iterator[pa.RecordBatch]]:
    try:
        # buffer_size: column chunks are read a buffer at a time, not a row group at once.
        parquet = pq.ParquetFile(f, buffer_size=1 << 20, pre_buffer=False)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"data file {source!r}: not a readable Parquet file ({exc})") from None
    schema = parquet.schema_arrow
    for column in schema:
        if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)):
            raise InputError(
                f"data file {source!r}: column {column.name!r} is {column.type}, not numbers"
            )
    rows = min(CHUNK_ROWS, max(16, parquet.metadata.num_rows // CHUNKS_AT_LEAST))
    return list(schema.names), parquet.iter_batches(batch_size=rows)


def _arrays(
    batch: pa.RecordBatch, columns: Columns, first_row: int, source: str
) -> tuple[np.ndarray, np.ndarray]:
    for i, column in enumerate(batch.columns):
        if column.null_count:
            row = first_row + int(
                np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0]
            )
            raise InputError(
                f"data file {source!r}: row {row}, column {columns.header[i]!r}: missing value"
            )

    def stack(indices: list[int]) -> np.ndarray:
        out = np.empty((batch.num_rows, len(indices)), dtype=np.float32)
        for j, i in enumerate(indices):
            out[:, j] = batch.column(i).to_numpy(zero_copy_only=False)  # float64 → float32
        return out

    return stack(columns.feature_idx), stack(columns.target_idx)


class _NonFinite:
    """NaN/Inf over all chunks: `_checked`'s message (count, first row and column)."""

    def __init__(self) -> None:
        self.found: dict[str, tuple[int, int, int]] = {}

    def add(self, name: str, array: np.ndarray, first_row: int) -> None:
        if found := _non_finite(torch.from_numpy(array)):
            count, row, col = found
            if name in self.found:
                total, row0, col0 = self.found[name]
                self.found[name] = (total + count, row0, col0)
            else:
                self.found[name] = (count, first_row + row, col)

    def check(self, columns: Columns, source: str) -> None:
        for name, names in (("x", columns.features), ("y", columns.targets)):
            if name in self.found:
                count, row, col = self.found[name]
                raise InputError(
                    f"data file {source!r}: {count} NaN/Inf value(s) in {name}, "
                    f"first at row {row}, column {names[col]!r}"
                )


def stream_table(
    file: DataFile, suffix: str, target: tuple[str, ...], open_sink: Callable[[Columns], Sink]
) -> tuple[Columns, Sink]:
    """Read `file` once, chunk by chunk, into the sink `open_sink(columns)` makes; a one-line
    InputError for a bad cell (CSV: its line and column), a NaN/Inf, or no rows."""
    source = file.url
    if suffix == ".csv":
        with file.open() as f:
            header = csv_header(f, source)[1]
    with file.open() as f:
        if suffix == ".csv":
            batches = _csv_batches(f, header, file.size)
        else:
            header, batches = _parquet_batches(f, source)
        columns = Columns(header, target, source)
        sink = open_sink(columns)
        rows, bad, progress = 0, _NonFinite(), Progress(source, file.size)
        try:
            for batch in batches:
                x, y = _arrays(batch, columns, rows, source)
                bad.add("x", x, rows)
                bad.add("y", y, rows)
                sink.append(x, y)
                rows += batch.num_rows
                progress.update(rows, _position(f))
        except pa.ArrowInvalid:
            if suffix != ".csv":
                raise InputError(f"data file {source!r}: not a readable Parquet file") from None
            with file.open() as again:
                text, names = csv_header(again, source)
                text.seek(0)  # _locate_bad_cell counts lines from the header's
                raise InputError(_locate_bad_cell(text, names, source)) from None
    if rows == 0:
        raise InputError(f"data file {source!r}: has a header but no data rows")
    bad.check(columns, source)
    return columns, sink


class _InMemory:
    def __init__(self, columns: Columns):
        self.x: list[np.ndarray] = []
        self.y: list[np.ndarray] = []

    def append(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x.append(x)
        self.y.append(y)


def read_parquet(file: DataFile, target: tuple[str, ...]) -> tuple[torch.Tensor, ...]:
    """A Parquet table whole, as (x, y) float32 tensors, and its column names."""
    columns, sink = stream_table(file, ".parquet", target, _InMemory)
    assert isinstance(sink, _InMemory)
    x, y = np.concatenate(sink.x), np.concatenate(sink.y)
    return torch.from_numpy(x), torch.from_numpy(y), columns.features, columns.targets


def convert_to_map(
    file: DataFile, suffix: str, target: tuple[str, ...], scratch: Scratch
) -> MappedDataset:
    """The table written once into `scratch`'s file (never held whole), and mapped."""
    opened: list[MappedWriter] = []  # the header says the widths: opened once it is read

    def open_writer(columns: Columns) -> MappedWriter:
        opened.append(MappedWriter(scratch.path, len(columns.feature_idx), len(columns.targets)))
        return opened[0]

    try:
        columns, _ = stream_table(file, suffix, target, open_writer)
        opened[0].finish()
    except BaseException:  # a bad cell, a full disk, Ctrl-C: no file is left half-written
        for writer in opened:
            writer.abort()
        scratch.discard()  # now: the traceback keeps `scratch` alive for as long as it lives
        raise
    return MappedDataset(MappedTable(scratch.path, scratch), columns.features, columns.targets)


def too_big(file: DataFile, suffix: str, available: int | None) -> bool:
    """Whether loading `file` whole would take more than `in_memory_limit` (README, "Data").
    The estimate of `_check_fits_in_memory` for CSV (half the text); for Parquet, its rows ×
    columns × 12 bytes (pyarrow's float64 columns, then the float32 tensors)."""
    limit = in_memory_limit(available)
    if limit is None:
        return False
    needed = file.size // 2
    if suffix == ".parquet":
        with file.open() as f:
            try:
                meta = pq.read_metadata(f)
            except (pa.ArrowInvalid, OSError):
                return False  # not Parquet: the whole-file reader says so in one line
            needed = meta.num_rows * meta.num_columns * 12
    return needed > limit


def load_mapped(
    file: DataFile, suffix: str, target: tuple[str, ...], data: object
) -> MappedDataset | object:
    """load-tensors on the memory-mapped path: a hit maps the cached file; a miss converts the
    table into the cache's blob folder, and the entry adopts the file when it is kept."""
    entry: StageEntry = cache_entry(
        "load-tensors", convert_to_map, data=data, format=suffix, target=target, layout="mapped"
    )
    hit = entry.load(MappedDataset)
    if hit is not None:
        return entry.cached(hit)
    store = entry.store
    if store is not None and not store.local:
        # A map needs a local file: this run converts into a temporary folder, uncached.
        warn(f"the memory-mapped copy of {file.url!r} is not kept in a remote cache")
        entry = StageEntry(entry.key)
    folder = store.path("blobs") if store is not None and store.local else None
    return entry.keep(convert_to_map(file, suffix, target, Scratch(folder)))
