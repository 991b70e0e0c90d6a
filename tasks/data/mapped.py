"""Data larger than memory: one safetensors file of x (N×F) and y (N×T), read through maps.

The file is written once, front to back, by `MappedWriter` (row chunks appended as a reader
streams them, the header filled in last), so converting a table never holds more than a
chunk. It is an ordinary safetensors file: `safetensors.safe_open` reads it too. Training
gathers each batch's rows through read-only maps of the file's windows (`MappedTable`).
"""

from __future__ import annotations

import itertools
import json
import math
import mmap
import os
import struct
import tempfile
import weakref
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from trainflow.tasks.data.sources import DataFile
from trainflow.tasks.errors import InputError
from trainflow.tasks.files import FILE_MODE, make_dirs

# The header is written last, into space kept at the front: two tensors' entries take about
# 200 bytes; 4096 also puts the data on a page boundary, so every row sits at a fixed offset.
HEADER_SPACE = 4096
WINDOW_BYTES = 8 << 20  # the part of the file mapped at a time while gathering rows
ENV_LIMIT = "TRAINFLOW_IN_MEMORY_BYTES"  # see in_memory_limit()


def in_memory_limit(available: int | None) -> int | None:
    """Bytes of estimated load memory above which a table is memory-mapped instead: the
    TRAINFLOW_IN_MEMORY_BYTES environment variable, else half of MemAvailable (the other half
    is left for the model, the batches and everything else in the process)."""
    value = os.environ.get(ENV_LIMIT, "").strip()
    if value:
        try:
            limit = int(value)
        except ValueError:
            raise InputError(f"{ENV_LIMIT}={value!r}: expected a number of bytes") from None
        if limit < 0:
            raise InputError(f"{ENV_LIMIT}={value!r}: expected a number of bytes ≥ 0")
        return limit
    return None if available is None else available // 2


def too_big(file: DataFile, suffix: str, available: int | None) -> bool:
    """Whether loading `file` whole would take more than `in_memory_limit` (README, "Data").
    The estimate of `_check_fits_in_memory` for CSV (half the text); for Parquet, its rows ×
    columns × 12 bytes (pyarrow's float64 columns, then the float32 tensors)."""
    limit = in_memory_limit(available)
    if limit is None:
        return False
    if suffix in (".npz", ".pt", ".pth", ".safetensors"):  # arrays: about their size in memory
        return array_bytes(file, suffix) > limit
    needed = file.size // 2  # CSV: digits are denser than float32; Arrow files: float64s
    if suffix == ".parquet":
        import pyarrow as pa  # here: a CSV's check, and so a cached CSV run, never loads it
        import pyarrow.parquet as pq

        with file.open() as f:
            try:
                meta = pq.read_metadata(f)
            except (pa.ArrowInvalid, OSError):
                return False  # not Parquet: the whole-file reader says so in one line
            needed = meta.num_rows * meta.num_columns * 12
    return needed > limit


# safetensors' dtype codes for what a mapped file holds, and how numpy reads each (bfloat16,
# which numpy lacks, as its 16 bits, viewed as bfloat16 by torch afterwards).
DTYPE_CODES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
}
_TORCH_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
_NUMPY_DTYPES = {
    "F32": "<f4",
    "F16": "<f2",
    "BF16": "<u2",
    "U8": "u1",
    "I8": "i1",
    "I16": "<i2",
    "I32": "<i4",
    "I64": "<i8",
}


@dataclass(frozen=True)
class Layout:
    """One tensor of a mapped file: its dtype, and one row's shape (() for one value a row)."""

    dtype: torch.dtype = torch.float32
    row: tuple[int, ...] = ()

    @property
    def code(self) -> str:
        return DTYPE_CODES[self.dtype]

    @property
    def row_bytes(self) -> int:
        return math.prod(self.row) * torch.empty(0, dtype=self.dtype).element_size()


def array_bytes(file: DataFile, suffix: str) -> int:
    """An array file's size in memory: its own, or an .npz's members' unpacked."""
    if suffix != ".npz":
        return file.size
    with file.open() as f:
        try:
            return sum(info.file_size for info in zipfile.ZipFile(f).infolist())
        except zipfile.BadZipFile:
            return 0  # not a zip: the whole-file reader says so in one line


class MappedWriter:
    """Writes x and y row chunks into a new file at `path`; `finish()` makes it a complete
    safetensors file, `abort()` removes it (and the side file holding y until then). A table's
    are float32 columns (`n_features`, `n_targets`); an array file's, `x` and `y` layouts."""

    def __init__(
        self,
        path: str,
        n_features: int = 0,
        n_targets: int = 0,
        x: Layout | None = None,
        y: Layout | None = None,
    ):
        self.path, self.rows = path, 0
        self.x_layout = x or Layout(torch.float32, (n_features,))
        self.y_layout = y or Layout(torch.float32, (n_targets,))
        self.x = open(path, "xb")  # noqa: SIM115 (closed by finish or abort)
        os.fchmod(self.x.fileno(), FILE_MODE)
        self.x.write(b"\0" * HEADER_SPACE)
        # y goes after x in the file, and x's length is known only at the end: y waits here.
        self.y = tempfile.TemporaryFile(dir=os.path.dirname(path))  # noqa: SIM115

    def append(self, x: np.ndarray | Tensor, y: np.ndarray | Tensor) -> None:
        self.x.write(_row_bytes(x, self.x_layout))
        self.y.write(_row_bytes(y, self.y_layout))
        self.rows += x.shape[0]

    def finish(self) -> None:
        x_bytes = self.rows * self.x_layout.row_bytes
        y_bytes = self.rows * self.y_layout.row_bytes
        self.y.seek(0)
        while block := self.y.read(16 << 20):
            self.x.write(block)
        self.y.close()
        header = {
            "x": {
                "dtype": self.x_layout.code,
                "shape": [self.rows, *self.x_layout.row],
                "data_offsets": [0, x_bytes],
            },
            "y": {
                "dtype": self.y_layout.code,
                "shape": [self.rows, *self.y_layout.row],
                "data_offsets": [x_bytes, x_bytes + y_bytes],
            },
        }
        text = json.dumps(header, separators=(",", ":")).encode()
        # safetensors allows trailing spaces in the header: its own writer pads with them.
        self.x.seek(0)
        self.x.write(struct.pack("<Q", HEADER_SPACE - 8) + text.ljust(HEADER_SPACE - 8, b" "))
        self.x.flush()
        os.fsync(self.x.fileno())
        self.x.close()

    def abort(self) -> None:
        self.x.close()
        self.y.close()
        Path(self.path).unlink(missing_ok=True)


def _row_bytes(rows: np.ndarray | Tensor, layout: Layout) -> bytes:
    if isinstance(rows, Tensor):
        rows = rows.contiguous()
        if rows.dtype == torch.bfloat16:
            rows = rows.view(torch.int16)
        rows = rows.numpy()
    return np.ascontiguousarray(rows, dtype=_NUMPY_DTYPES[layout.code]).tobytes()


class MappedTable:
    """x and y of a finished file, gathered by row through short-lived maps of it.

    A touched page of a map counts in the process's RSS for as long as the map lives, and the
    kernel maps far more than the page read (whole large folios of the page cache: about 1 MB
    per random row was measured on Linux 6.18). So no map of the whole file is kept: a batch's
    rows are sorted, and each WINDOW_BYTES window of the file that holds some of them is
    mapped, read and unmapped in turn. The file is opened once, so a cache entry pruned or a
    temporary folder removed while a run reads it stays readable to the end.
    """

    def __init__(self, path: str, scratch: Scratch | None = None):
        self.path, self._scratch = path, scratch  # the scratch file lives as long as this
        self.file = open(path, "rb")  # noqa: SIM115 (open as long as the table)
        (length,) = struct.unpack("<Q", self.file.read(8))
        header = json.loads(self.file.read(length))
        self.x = _Region.of(header["x"], 8 + length)
        self.y = _Region.of(header["y"], 8 + length)

    def __len__(self) -> int:
        return self.x.rows

    def __reduce__(self) -> tuple[type[MappedTable], tuple[str]]:
        # To a DDP rank, a process on this machine: the path, opened again there. A temporary
        # copy's folder stays this process's to remove, once the ranks are done.
        return (MappedTable, (self.path,))

    def gather(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Copies of rows `rows` (int64) of x and y, in that order."""
        index = rows.numpy()
        order = np.argsort(index, kind="stable")
        ordered = index[order]
        return self._take(self.x, ordered, order), self._take(self.y, ordered, order)

    def targets(self) -> Tensor:
        """All of y (N×T float32: a small part of the table), read window by window."""
        every = np.arange(len(self))
        return self._take(self.y, every, every)

    def _take(self, region: _Region, ordered: np.ndarray, order: np.ndarray) -> Tensor:
        """out[order[i]] = region[ordered[i]], for `ordered` sorted ascending."""
        dtype = np.dtype(_NUMPY_DTYPES[region.code])
        row_bytes = region.cols * dtype.itemsize
        out = np.empty((len(ordered), region.cols), dtype=dtype)
        per_window = max(1, WINDOW_BYTES // row_bytes)
        windows = ordered // per_window
        bounds = [0, *(np.flatnonzero(np.diff(windows)) + 1).tolist(), len(ordered)]
        for lo, hi in itertools.pairwise(bounds):
            if lo == hi:
                continue
            first = int(windows[lo]) * per_window
            count = min(region.rows, first + per_window) - first
            begin = region.start + first * row_bytes
            aligned = begin - begin % mmap.ALLOCATIONGRANULARITY
            window = mmap.mmap(
                self.file.fileno(),
                begin - aligned + count * row_bytes,
                offset=aligned,
                access=mmap.ACCESS_READ,
            )
            try:
                view = np.frombuffer(
                    window, dtype=dtype, count=count * region.cols, offset=begin - aligned
                ).reshape(count, region.cols)
                out[order[lo:hi]] = view[ordered[lo:hi] - first]
                del view  # a map can't be closed while an array still looks into it
            finally:
                window.close()
        rows = torch.from_numpy(out)
        if region.code == "BF16":
            rows = rows.view(torch.bfloat16)
        return rows.reshape(len(ordered), *region.row)


@dataclass(frozen=True)
class _Region:
    """Where a tensor of the file lies: N rows of `row`-shaped values of one dtype."""

    start: int  # its first byte, from the start of the file
    rows: int
    cols: int  # values per row
    code: str = "F32"  # its safetensors dtype
    row: tuple[int, ...] = ()

    @property
    def dtype(self) -> torch.dtype:
        return _TORCH_DTYPES[self.code]

    @classmethod
    def of(cls, entry: dict[str, Any], data_start: int) -> _Region:
        code, shape = entry["dtype"], [int(size) for size in entry["shape"]]
        if code not in _NUMPY_DTYPES or not shape:
            raise ValueError(f"expected rows of a known dtype, got {code} {shape}")
        begin, end = entry["data_offsets"]
        rows, row = shape[0], tuple(shape[1:])
        cols = math.prod(row)
        if end - begin != rows * cols * np.dtype(_NUMPY_DTYPES[code]).itemsize:
            raise ValueError("tensor offsets do not match its shape")
        return cls(data_start + begin, rows, cols, code, row)


@dataclass(frozen=True)
class MappedDataset:
    """A data set on the memory-mapped path: the shape of tensors.py's `Dataset` for every stage
    but `x`, which is never held whole (batches come from `table.gather`)."""

    table: MappedTable = field(compare=False, repr=False)
    feature_names: tuple[str, ...]
    target_names: tuple[str, ...]
    # An array file's integer x that float32 can't hold: why (tensors.py's Dataset, the same).
    # None, not "": Prefect links inputs to a stage by the ids inside its output (tensors.py).
    unfit_for_float32: str | None = None
    cache_key: str = field(default="", compare=False)

    def to_cache_file(self) -> tuple[str, dict[str, Any]]:
        """The finished file the store adopts as this entry's blob, and the record's fields."""
        return self.table.path, {
            "feature_names": list(self.feature_names),
            "target_names": list(self.target_names),
            "unfit_for_float32": self.unfit_for_float32,
        }

    def cache_file_moved(self, path: str) -> None:
        """The store renamed the file to its blob name: where a DDP rank opens it from now."""
        self.table.path = path

    @classmethod
    def from_cache_file(cls, path: str, meta: dict[str, Any]) -> MappedDataset:
        table = MappedTable(path)
        if len(table.x.row) == 1 and table.x.cols != len(meta["feature_names"]):
            raise ValueError("x's width does not match the feature names")
        names = tuple(meta["feature_names"]), tuple(meta["target_names"])
        return cls(table, *names, meta.get("unfit_for_float32"))

    def __len__(self) -> int:
        return len(self.table)

    @property
    def y(self) -> Tensor:
        return self.table.targets()

    @property
    def x(self) -> Tensor:
        # Only --standardize asks for all training features at once (build-model).
        raise InputError(
            f"--standardize needs all training rows in memory, and this data ({len(self)} rows "
            f"× {self.n_features} features) is on the memory-mapped path; see README, 'Data'"
        )

    @property
    def columns(self) -> dict[str, list[str]]:
        return {"features": list(self.feature_names), "targets": list(self.target_names)}

    # Numbers only on this path (tasks/data/stream.py refuses text columns): no categories.
    categories: ClassVar[dict[str, tuple[str, ...]]] = {}
    category_slots: ClassVar[tuple[tuple[int, int], ...]] = ()
    classes: ClassVar[tuple[str, ...] | None] = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.table.x.row

    @property
    def input_dtype(self) -> str:
        return str(self.table.x.dtype).removeprefix("torch.")

    @property
    def n_features(self) -> int:
        return self.table.x.cols

    @property
    def n_targets(self) -> int:
        return self.table.y.cols if self.table.y.row else 1  # () a row: class ids


class Scratch:
    """A conversion's output file until the cache adopts it (renamed to its checksum), or for
    the whole run when there is no local cache (in a temporary folder). Whatever is left when
    the table that reads it is gone (or at exit) is removed: a failed conversion, a transaction
    rolled back, a --no-cache run. A SIGKILL leaves it; its `.tmp-` name is never trusted."""

    def __init__(self, blob_folder: str | None):
        folder = None
        if blob_folder is None:
            folder = tempfile.TemporaryDirectory(prefix="trainflow-mapped-")
            blob_folder = folder.name
        make_dirs(blob_folder)
        self.path = os.path.join(blob_folder, f".tmp-mapped-{os.urandom(8).hex()}.safetensors")
        self.discard = weakref.finalize(self, _remove, self.path, folder)  # now, or when gone


def _remove(path: str, folder: tempfile.TemporaryDirectory | None) -> None:
    Path(path).unlink(missing_ok=True)
    if folder is not None:
        folder.cleanup()
