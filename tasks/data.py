"""load-tensors: read the data source into float32 tensors x (N×F) and y (N×T)."""

from __future__ import annotations

import csv
import io
import pickle
import warnings
import zipfile
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np
import torch
from torch import Tensor

from tasks.errors import InputError
from tasks.sources import DataFile, Identity, suffix_of
from tasks.stage import cache_enabled, cache_entry, stage

SYNTHETIC = "synthetic"
EXTENSIONS = (".csv", ".parquet", ".npz", ".pt", ".pth")


@dataclass(frozen=True)
class Dataset:
    x: Tensor
    y: Tensor
    feature_names: tuple[str, ...]
    target_names: tuple[str, ...]
    cache_key: str = field(default="", compare=False)

    def to_cache(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return {"x": self.x, "y": self.y}, {
            "feature_names": list(self.feature_names),
            "target_names": list(self.target_names),
        }

    @classmethod
    def from_cache(cls, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Dataset:
        return cls(
            tensors["x"], tensors["y"], tuple(meta["feature_names"]), tuple(meta["target_names"])
        )

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def columns(self) -> dict[str, list[str]]:
        """The column schema a trained model expects back (predict reads it from columns.json)."""
        return {"features": list(self.feature_names), "targets": list(self.target_names)}

    @property
    def n_features(self) -> int:
        return self.x.shape[1]

    @property
    def n_targets(self) -> int:
        return self.y.shape[1]


def synthetic(n_samples: int = 100, seed: int = 42, noise: float = 0.1) -> Dataset:
    """The book's data: np.random.seed(42); x = rand(N, 1); y = 1 + 2x + 0.1·randn(N, 1)."""
    rng = np.random.RandomState(seed)  # legacy RandomState: the stream np.random.seed gives
    x = rng.rand(n_samples, 1)
    y = 1 + 2 * x + noise * rng.randn(n_samples, 1)
    return _checked(torch.as_tensor(x).float(), torch.as_tensor(y).float(), ("x",), ("y",), "")


def check_format(source: str, target: tuple[str, ...]) -> str:
    """The file's format (its extension), or a one-line error before anything is read."""
    suffix = suffix_of(source)
    if suffix not in EXTENSIONS:
        raise InputError(
            f"data file {source!r}: unknown extension {suffix or '(none)'!r}; "
            f"expected one of {', '.join(EXTENSIONS)} or 'synthetic'"
        )
    if target and suffix not in (".csv", ".parquet"):
        raise InputError(
            f"--target applies to CSV and Parquet files only, not {suffix} ({source!r})"
        )
    return suffix


def read_file(file: DataFile, target: tuple[str, ...] = ()) -> Dataset:
    """The tensors of a .csv, .npz or .pt/.pth file."""
    suffix = check_format(file.url, target)
    with file.open() as f:
        _check_fits_in_memory(f, suffix, file.url)
        if suffix == ".csv":
            return _from_csv(f, target, file.url)
        if suffix == ".parquet":
            from tasks.stream import read_parquet  # stream builds on this module's helpers

            return _checked(*read_parquet(file, target), file.url)
        if suffix == ".npz":
            return _from_npz(f, file.url)
        return _from_torch(f, file.url)


def load_dataset(
    source: str,
    target: tuple[str, ...] = (),
    n_samples: int = 100,
    data_seed: int = 42,
    noise: float = 0.1,
) -> Dataset:
    """'synthetic' or a file, without the cache."""
    if source == SYNTHETIC:
        return synthetic(n_samples, data_seed, noise)
    check_format(source, target)
    with DataFile(source) as file:
        return read_file(file, target)


def available_memory() -> int | None:
    """Bytes the kernel says a new allocation can get (Linux's MemAvailable), if known."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _check_fits_in_memory(f: IO[bytes], suffix: str, source: str) -> None:
    """Say up front that a file can't be loaded, instead of dying of OOM half-way."""
    size = f.seek(0, io.SEEK_END)
    f.seek(0)
    if suffix == ".npz":  # compressed members: what counts is their unpacked size
        with suppress(zipfile.BadZipFile):  # an unreadable file is the loader's to report
            size = sum(info.file_size for info in zipfile.ZipFile(f).infolist())
        f.seek(0)
    elif suffix == ".csv":
        size //= 2  # text digits are denser than float32 plus parsing buffers; an estimate
    available = available_memory()
    if available is not None and size > available:
        raise InputError(
            f"data file {source!r}: needs about {size / 1e9:.1f} GB of memory to load, "
            f"but only {available / 1e9:.1f} GB is available"
        )


def csv_header(f: IO[bytes], source: str) -> tuple[IO[str], list[str]]:
    """The file as text, positioned after its header row, and the header's column names."""
    text = io.TextIOWrapper(f, encoding="utf-8-sig", errors="replace", newline="")
    return text, [name.strip() for name in next(csv.reader([text.readline()]), [])]


def _csv_rows(text: IO[str], header: list[str], source: str) -> np.ndarray:
    """The rows after the header as one float32 array, or a one-line error naming the cell."""
    try:
        # numpy's C parser is the fast path; on failure, _locate_bad_cell says where and why.
        with warnings.catch_warnings():
            # A header-only file: reported below as one InputError, not a numpy warning.
            warnings.filterwarnings("ignore", "loadtxt: input contained no data", UserWarning)
            # quotechar: pandas and spreadsheets may quote numbers ("1.5"); that is valid CSV.
            table = np.loadtxt(text, delimiter=",", quotechar='"', dtype=np.float32, ndmin=2)
    except ValueError:
        text.seek(0)
        raise InputError(_locate_bad_cell(text, header, source)) from None
    if table.shape[0] == 0:
        raise InputError(f"data file {source!r}: has a header but no data rows")
    if table.shape[1] != len(header):
        raise InputError(
            f"data file {source!r}: rows have {table.shape[1]} fields, the header has {len(header)}"
        )
    return table


def read_csv_columns(
    f: IO[bytes], source: str, required: tuple[str, ...], optional: tuple[str, ...]
) -> tuple[Tensor, Tensor | None]:
    """The `required` columns, and the `optional` ones if the file has all of them, as float32
    tensors in the given order; any other column, or a part of `optional`, is an error."""
    text, header = csv_header(f, source)
    missing = [name for name in required if name not in header]
    if missing:
        raise InputError(f"data file {source!r}: missing column(s) {', '.join(missing)}")
    present = [name for name in optional if name in header]
    if present and len(present) != len(optional):
        absent = [name for name in optional if name not in header]
        raise InputError(
            f"data file {source!r}: has target column(s) {', '.join(present)} "
            f"but not {', '.join(absent)}; give all of them or none"
        )
    extra = [name for name in header if name not in required and name not in optional]
    if extra:
        raise InputError(f"data file {source!r}: unexpected column(s) {', '.join(extra)}")
    if len(set(header)) != len(header):
        raise InputError(f"data file {source!r}: a column name appears twice")
    table = _csv_rows(text, header, source)
    x = torch.from_numpy(np.ascontiguousarray(table[:, [header.index(n) for n in required]]))
    if not present:
        return x, None
    return x, torch.from_numpy(np.ascontiguousarray(table[:, [header.index(n) for n in optional]]))


def _from_csv(f: IO[bytes], target: tuple[str, ...], source: str) -> Dataset:
    text, header = csv_header(f, source)
    if len(header) < 2:
        raise InputError(f"data file {source!r}: needs a header row and at least 2 columns")
    targets = target or (header[-1],)
    for name in targets:
        if header.count(name) == 0:
            raise InputError(
                f"data file {source!r}: target column {name!r} not found "
                f"(columns: {', '.join(header)})"
            )
        if header.count(name) > 1:
            raise InputError(f"data file {source!r}: target column {name!r} appears twice")
    target_idx = [header.index(name) for name in targets]
    feature_idx = [i for i in range(len(header)) if i not in target_idx]
    if not feature_idx:
        raise InputError(f"data file {source!r}: no feature columns left besides the target")
    table = _csv_rows(text, header, source)
    x = torch.from_numpy(np.ascontiguousarray(table[:, feature_idx]))
    y = torch.from_numpy(np.ascontiguousarray(table[:, target_idx]))
    names = (tuple(header[i] for i in feature_idx), tuple(targets))
    return _checked(x, y, *names, source)


def _locate_bad_cell(text: IO[str], header: list[str], source: str) -> str:
    rows = csv.reader(text)
    next(rows, None)  # the header
    for line_no, row in enumerate(rows, start=2):
        if not row:
            continue
        if len(row) != len(header):
            return (
                f"data file {source!r}: line {line_no} has {len(row)} fields, "
                f"the header has {len(header)}"
            )
        for column, cell in zip(header, row, strict=True):
            try:
                float(cell)
            except ValueError:
                return (
                    f"data file {source!r}: line {line_no}, column {column!r}: "
                    f"{cell.strip()!r} is not a number"
                )
    return f"data file {source!r}: not a numeric CSV table"


def _from_npz(f: IO[bytes], source: str) -> Dataset:
    try:
        with np.load(f, allow_pickle=False) as arrays:
            missing = [key for key in ("x", "y") if key not in arrays.files]
            if missing:
                raise InputError(
                    f"data file {source!r}: missing array(s) {', '.join(missing)} "
                    f"(has: {', '.join(arrays.files) or 'none'})"
                )
            x, y = arrays["x"], arrays["y"]
    except (ValueError, zipfile.BadZipFile, OSError, EOFError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"data file {source!r}: not a readable .npz of numeric arrays") from None
    return _checked(
        _as_float_tensor(x, "x", source), _as_float_tensor(y, "y", source), (), (), source
    )


def _from_torch(f: IO[bytes], source: str) -> Dataset:
    try:
        # weights_only: tensors and plain containers only, never a pickled object's code.
        loaded = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise InputError(
            f"data file {source!r}: holds objects that need unpickling code; "
            "save a plain dict of tensors {'x': ..., 'y': ...}"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile):
        raise InputError(f"data file {source!r}: not a readable torch.save file") from None
    if not isinstance(loaded, Mapping) or not all(
        isinstance(loaded.get(key), Tensor) for key in ("x", "y")
    ):
        raise InputError(f"data file {source!r}: expected a dict with tensors 'x' and 'y'")
    return _checked(
        _as_float_tensor(loaded["x"], "x", source),
        _as_float_tensor(loaded["y"], "y", source),
        (),
        (),
        source,
    )


def _as_float_tensor(array: np.ndarray | Tensor, name: str, source: str) -> Tensor:
    try:
        tensor = torch.as_tensor(array)
    except TypeError:
        tensor = None
    if tensor is None or tensor.is_complex():
        raise InputError(f"data file {source!r}: array {name!r} is not real-valued numbers")
    return tensor.to(torch.float32)


def _non_finite(tensor: Tensor, rows_per_chunk: int = 1 << 16) -> tuple[int, int, int] | None:
    """(count, first row, first column) of NaN/Inf values; in row chunks, so a large data
    set costs no extra copy."""
    count, first = 0, None
    for start in range(0, tensor.shape[0], rows_per_chunk):
        chunk = tensor[start : start + rows_per_chunk]
        if bool(torch.isfinite(chunk).all()):
            continue
        bad = ~torch.isfinite(chunk)
        count += int(bad.sum())
        if first is None:
            row, col = (int(i) for i in bad.nonzero()[0])
            first = (start + row, col)
    return None if first is None else (count, *first)


def _checked(
    x: Tensor, y: Tensor, features: tuple[str, ...], targets: tuple[str, ...], source: str
) -> Dataset:
    where = f"data file {source!r}" if source else "synthetic data"
    if x.ndim == 1:
        x = x.unsqueeze(1)
    if y.ndim == 1:
        y = y.unsqueeze(1)
    for name, tensor in (("x", x), ("y", y)):
        if tensor.ndim != 2:
            raise InputError(f"{where}: {name} must be 1- or 2-dimensional, got {tensor.ndim}")
    if x.shape[0] != y.shape[0]:
        raise InputError(f"{where}: x has {x.shape[0]} rows but y has {y.shape[0]}")
    if x.shape[0] == 0:
        raise InputError(f"{where}: the data set is empty")
    for name, tensor, columns in (("x", x, features), ("y", y, targets)):
        if found := _non_finite(tensor):
            count, row, col = found
            column = repr(columns[col]) if columns else str(col)
            raise InputError(
                f"{where}: {count} NaN/Inf value(s) in {name}, first at row {row}, column {column}"
            )
    features = features or tuple(f"x{i}" for i in range(x.shape[1]))
    targets = targets or tuple(f"y{i}" for i in range(y.shape[1]))
    return Dataset(x.contiguous(), y.contiguous(), features, targets)


@stage(name="load-tensors")
def load_tensors(
    source: str,
    target: tuple[str, ...],
    n_samples: int,
    data_seed: int,
    noise: float,
    identity: Identity = "content",
) -> Dataset:
    """The data as float32 tensors, keyed by the file's content (not its name) or the recipe."""
    if source == SYNTHETIC:
        entry = cache_entry("load-tensors", synthetic, n=n_samples, seed=data_seed, noise=noise)
        return entry.resolve(Dataset, lambda: synthetic(n_samples, data_seed, noise))
    suffix = check_format(source, target)
    with DataFile(source) as file:  # a remote file is fetched once, for the key and the load
        data = file.identity(identity) if cache_enabled() else None
        if suffix in (".csv", ".parquet"):
            from tasks import stream  # stream builds on this module's helpers

            if stream.too_big(file, suffix, available_memory()):
                return stream.load_mapped(file, suffix, target, data)  # README: "Data"
        entry = cache_entry("load-tensors", read_file, data=data, format=suffix, target=target)
        return entry.resolve(Dataset, lambda: read_file(file, target))
