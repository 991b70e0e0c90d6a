"""load-tensors on the memory-mapped path for an array file too big for memory (.npz, .pt/.pth,
.safetensors): x read a block of rows at a time into a memory-mapped safetensors file
(tasks/data/mapped.py), each block converted by the in-memory read's rules
(tasks/data/tensors.py), so both paths load the same tensors and refuse the same data."""

from __future__ import annotations

import math
import zipfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
import torch
from torch import Tensor

from trainflow.tasks.cache.stage import StageEntry, cache_entry, warn
from trainflow.tasks.data.mapped import (
    Layout,
    MappedDataset,
    MappedTable,
    MappedWriter,
    Scratch,
)
from trainflow.tasks.data.sources import DataFile
from trainflow.tasks.data.tensors import (
    KEPT_X_DTYPES,
    array_x,
    array_y,
    check_array_shapes,
    non_finite,
    real_tensor,
    torch_arrays,
)
from trainflow.tasks.errors import InputError

BLOCK_BYTES = 64 << 20  # of x read and converted at a time


@dataclass
class Arrays:
    """An array file's x and y by shape and dtype, x readable a block of rows at a time."""

    x_shape: tuple[int, ...]
    x_dtype: torch.dtype
    y: Tensor  # whole: one value or a few a row, a small part of the file
    read_rows: Any  # (start, stop) -> the rows of x as a tensor

    def blocks(self) -> Iterator[tuple[int, Tensor]]:
        row_bytes = math.prod(self.x_shape[1:]) * torch.empty(0, dtype=self.x_dtype).itemsize
        step = max(1, BLOCK_BYTES // max(row_bytes, 1))
        for start in range(0, self.x_shape[0], step):
            yield start, self.read_rows(start, min(start + step, self.x_shape[0]))


def convert_arrays(file: DataFile, suffix: str, scratch: Scratch) -> MappedDataset:
    """The array file written once into `scratch`'s file, a block of x at a time, and mapped."""
    where = f"data file {file.url!r}"
    writer = None
    try:
        with open_arrays(file, suffix) as arrays:
            check_array_shapes(arrays.x_shape, tuple(arrays.y.shape), where)
            if arrays.x_shape[0] == 0:
                raise InputError(f"{where}: the data set is empty")
            if 0 in arrays.x_shape[1:]:
                raise InputError(f"{where}: x has no values per row (shape {arrays.x_shape})")
            y = array_y(real_tensor(arrays.y, "y", where), where)
            if y.ndim == 1 and y.is_floating_point():  # one target: a column, as in memory
                y = y.unsqueeze(1)
            x_dtype = _kept_dtype(arrays.x_dtype)
            row = arrays.x_shape[1:] or (1,)
            y_row = () if y.ndim == 1 else tuple(y.shape[1:])
            writer = MappedWriter(scratch.path, x=Layout(x_dtype, row), y=Layout(y.dtype, y_row))
            unfit, bad = None, _NonFinite()
            for start, block in arrays.blocks():
                x, why = array_x(real_tensor(block, "x", where), where, start)
                unfit = unfit or why or None
                bad.add("x", x, start)
                writer.append(x.reshape(len(x), *row), y[start : start + len(x)])
            bad.add("y", y, 0)
            bad.check(where)  # x first, then y: what the whole-file read reports
            writer.finish()
    except BaseException:  # a bad block, a full disk, Ctrl-C: no file is left half-written
        if writer is not None:
            writer.abort()
        scratch.discard()
        raise
    features = tuple(f"x{i}" for i in range(row[0])) if len(row) == 1 else ("x",)
    targets = ("y",) if y.ndim == 1 else tuple(f"y{i}" for i in range(y.shape[1]))
    return MappedDataset(MappedTable(scratch.path, scratch), features, targets, unfit)


def _kept_dtype(stored: torch.dtype) -> torch.dtype:
    """What `array_x` turns a block of `stored` into (the file's layout is fixed up front)."""
    if stored == torch.bool:
        return torch.uint8
    if stored == torch.float64 or (stored.is_floating_point and stored not in KEPT_X_DTYPES):
        return torch.float32
    return stored if stored in KEPT_X_DTYPES else torch.int64


class _NonFinite:
    """NaN/Inf over all blocks: the whole-file read's message (count, first row and place)."""

    def __init__(self) -> None:
        self.found: dict[str, list[int | str]] = {}

    def add(self, name: str, tensor: Tensor, first_row: int) -> None:
        if (found := non_finite(tensor)) is None:
            return
        count, row, col = found
        if name in self.found:
            self.found[name][0] += count
        else:
            place = "column" if tensor.ndim <= 2 else "element"
            self.found[name] = [count, first_row + row, place, col]

    def check(self, where: str) -> None:
        for name in ("x", "y"):
            if name in self.found:
                count, row, place, col = self.found[name]
                raise InputError(
                    f"{where}: {count} NaN/Inf value(s) in {name}, first at row {row}, "
                    f"{place} {col}"
                )


@contextmanager
def open_arrays(file: DataFile, suffix: str) -> Iterator[Arrays]:
    where = f"data file {file.url!r}"
    with ExitStack() as stack:
        if suffix == ".safetensors":
            yield _safetensors(file.local_path(), where, stack)
        elif suffix == ".npz":
            yield _npz(stack.enter_context(file.open()), where, stack)
        else:
            yield _torch(file.local_path(), where)


def _safetensors(path: str, where: str, stack: ExitStack) -> Arrays:
    from safetensors import SafetensorError, safe_open

    try:
        f = stack.enter_context(safe_open(path, framework="pt"))
        names = set(f.keys())
    except (SafetensorError, OSError) as exc:
        raise InputError(f"{where}: not a readable .safetensors file ({exc})") from None
    _require(names, where)
    x = f.get_slice("x")
    dtype = _safetensors_dtype(x.get_dtype(), where)
    return Arrays(tuple(x.get_shape()), dtype, f.get_tensor("y"), lambda a, b: x[a:b])


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def _safetensors_dtype(code: str, where: str) -> torch.dtype:
    if code not in _SAFETENSORS_DTYPES:
        raise InputError(f"{where}: array 'x' is not real-valued numbers")
    return _SAFETENSORS_DTYPES[code]


def _npz(f: IO[bytes], where: str, stack: ExitStack) -> Arrays:
    try:
        archive = stack.enter_context(zipfile.ZipFile(f))
        names = {name.removesuffix(".npy") for name in archive.namelist()}
        _require(names, where)
        y = np.load(stack.enter_context(archive.open("y.npy")), allow_pickle=False)
        member = stack.enter_context(archive.open("x.npy"))
        version = np.lib.format.read_magic(member)
        read_header = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        shape, fortran_order, dtype = read_header(member)
    except (ValueError, zipfile.BadZipFile, OSError, EOFError, KeyError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"{where}: not a readable .npz of numeric arrays") from None
    if dtype.hasobject:
        raise InputError(f"{where}: array 'x' is not real-valued numbers")
    if fortran_order:  # column after column: no block of rows lies together
        raise InputError(
            f"{where}: too big for memory, and array 'x' is stored in Fortran order, which "
            "can't be read a block of rows at a time; save it C-ordered (np.ascontiguousarray)"
        )
    row_values = math.prod(shape[1:])
    position = [0]

    def read_rows(start: int, stop: int) -> Tensor:
        if start != position[0]:  # a zip member streams front to back
            raise ValueError("blocks are read in order")
        data = member.read((stop - start) * row_values * dtype.itemsize)
        rows = np.frombuffer(data, dtype=dtype).reshape(stop - start, *shape[1:])
        position[0] = stop
        return real_tensor(rows.copy(), "x", where)

    x_dtype = real_tensor(np.empty(0, dtype=dtype), "x", where).dtype
    return Arrays(tuple(shape), x_dtype, real_tensor(y, "y", where), read_rows)


LEGACY_TORCH = (
    "too big for memory, and a torch.save file of the legacy format can't be read a block at "
    "a time; save it again with torch.save's default format, or as .safetensors"
)


def _torch(path: str, where: str) -> Arrays:
    x, y = torch_arrays(path, where, mmap=True, unreadable=LEGACY_TORCH)
    x = real_tensor(x, "x", where)
    real_tensor(y, "y", where)
    return Arrays(tuple(x.shape), x.dtype, y.clone(), lambda a, b: x[a:b].clone())


def _require(names: set[str], where: str) -> None:
    missing = [key for key in ("x", "y") if key not in names]
    if missing:
        raise InputError(
            f"{where}: missing array(s) {', '.join(missing)} "
            f"(has: {', '.join(sorted(names)) or 'none'})"
        )


def load_mapped_arrays(file: DataFile, suffix: str, data: object) -> MappedDataset | object:
    """load-tensors on the memory-mapped path for an array file: a hit maps the cached file; a
    miss converts the file into the cache's blob folder, adopted when the entry is kept."""
    entry = cache_entry("load-tensors", convert_arrays, data=data, format=suffix, layout="mapped")
    return keep_mapped(entry, file.url, lambda scratch: convert_arrays(file, suffix, scratch))


def keep_mapped(
    entry: StageEntry, url: str, convert: Callable[[Scratch], MappedDataset]
) -> MappedDataset | object:
    """load-tensors on the memory-mapped path: a hit maps the cached file; a miss converts
    into the cache's blob folder (`convert(scratch)`), adopted when the entry is kept."""
    hit = entry.load(MappedDataset)
    if hit is not None:
        return entry.cached(hit)
    store = entry.store
    if store is not None and not store.local:
        # A map needs a local file: this run converts into a temporary folder, uncached.
        warn(f"the memory-mapped copy of {url!r} is not kept in a remote cache")
        entry = StageEntry(entry.key)
    folder = store.path("blobs") if store is not None and store.local else None
    return entry.keep(convert(Scratch(folder)))
