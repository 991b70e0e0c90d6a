"""load-tensors: read the data source into tensors x (N×…) and y (N×T float, or N class ids).

A table becomes float32 columns. An array file (.npz, .pt/.pth, .safetensors) keeps its dtypes
where the model can take them as stored (uint8 images, int64 token ids, float16): they are
converted per batch, on the device, by the model's front (tasks/engine/models.py), so the cache
and the device hold the compact form. float64 becomes float32 (the models compute in float32).
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import pickle
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from trainflow.tasks.data.sources import DataFile, suffix_of
from trainflow.tasks.data.tables import (
    TABLE_FORMATS,
    UNKNOWN,
    available_memory,
    column_names,
    iter_columns,
    read_columns,
    unfit_for_float32,
)
from trainflow.tasks.errors import InputError
from trainflow.tasks.names import STORED_X_DTYPES, SYNTHETIC

ARRAY_FORMATS = (".npz", ".pt", ".pth", ".safetensors")
EXTENSIONS = (*TABLE_FORMATS, *ARRAY_FORMATS)

if TYPE_CHECKING:
    from trainflow.tasks.data.images import ImageFolder


@dataclass(frozen=True)
class Dataset:
    x: Tensor
    y: Tensor
    feature_names: tuple[str, ...]
    target_names: tuple[str, ...]
    # Per categorical feature column, its vocabulary: x holds 1 + a value's index in it, or
    # UNKNOWN. The file's values after load-tensors, the training rows' after the split.
    categories: dict[str, tuple[str, ...]] = field(default_factory=dict, hash=False)
    # None where there is nothing, not () or "": Prefect links a later task's input to this
    # stage by the id of any value inside its output, and () and "" are one object each.
    classes: tuple[str, ...] | None = None  # the class names of y's ids (an image folder's)
    # Integer x that float32 can't hold exactly: why, in one line. A model of the user's own
    # may take the ids as stored; the built-in ones compute in float32 and refuse such data.
    unfit_for_float32: str | None = None
    cache_key: str = field(default="", compare=False)

    def to_cache(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return {"x": self.x, "y": self.y}, {
            "feature_names": list(self.feature_names),
            "target_names": list(self.target_names),
            "categories": {name: list(values) for name, values in self.categories.items()},
            "classes": list(self.classes or ()),
            "unfit_for_float32": self.unfit_for_float32,
        }

    @classmethod
    def from_cache(cls, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Dataset:
        categories = {name: tuple(values) for name, values in meta["categories"].items()}
        return cls(
            tensors["x"],
            tensors["y"],
            tuple(meta["feature_names"]),
            tuple(meta["target_names"]),
            categories,
            tuple(meta["classes"]) if meta.get("classes") else None,
            meta.get("unfit_for_float32"),
        )

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def columns(self) -> dict[str, list[str]]:
        """The column schema a trained model expects back (predict reads it from columns.json);
        `categories` only for a table that has categorical columns."""
        columns: dict[str, Any] = {
            "features": list(self.feature_names),
            "targets": list(self.target_names),
        }
        if self.categories:
            columns["categories"] = {name: list(v) for name, v in self.categories.items()}
        if self.classes:
            columns["classes"] = list(self.classes)
        return columns

    @property
    def category_slots(self) -> tuple[tuple[int, int], ...]:
        """(feature index, one-hot width: the vocabulary and the unknown slot) per categorical
        column, as the model's encoding layer takes them."""
        return tuple(
            (i, len(self.categories[name]) + 1)
            for i, name in enumerate(self.feature_names)
            if name in self.categories
        )

    @property
    def n_features(self) -> int:
        """Values per sample: a table's columns, an image's C·H·W."""
        return math.prod(self.x.shape[1:])

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One sample's shape: (F,) for a table, (C, H, W) for images, (T,) for sequences."""
        return tuple(self.x.shape[1:])

    @property
    def input_dtype(self) -> str:
        return dtype_name(self.x.dtype)

    @property
    def n_targets(self) -> int:
        return 1 if self.y.ndim == 1 else self.y.shape[1]


def synthetic(n_samples: int = 100, seed: int = 42, noise: float = 0.1) -> Dataset:
    """The book's data: np.random.seed(42); x = rand(N, 1); y = 1 + 2x + 0.1·randn(N, 1)."""
    rng = np.random.RandomState(seed)  # legacy RandomState: the stream np.random.seed gives
    x = rng.rand(n_samples, 1)
    y = 1 + 2 * x + noise * rng.randn(n_samples, 1)
    return _checked(torch.as_tensor(x).float(), torch.as_tensor(y).float(), ("x",), ("y",), "")


def is_image_folder(source: str) -> bool:
    """A local folder: the class folders of images (tasks/data/images.py). One named like a
    data file (`data.csv/`) is a mistaken path, which the file readers refuse as a folder."""
    return "://" not in source and suffix_of(source) not in EXTENSIONS and os.path.isdir(source)


def image_dataset(
    folder: ImageFolder,
    image_size: tuple[int, int] | None = None,
    progress: Callable[[str], None] | None = None,
    digests: Mapping[str, str] | None = None,
) -> Dataset:
    """An image folder as uint8 x (N×C×H×W) and int64 class ids, with the class names."""
    from trainflow.tasks.data.images import decode_images  # Pillow: for image folders only

    x, y = decode_images(folder, image_size, progress, digests)
    return _checked(x, y, (), (), folder.root, classes=folder.classes)


def check_format(source: str, target: tuple[str, ...], features: tuple[str, ...] = ()) -> str:
    """The file's format (its extension), or a one-line error before anything is read."""
    suffix = suffix_of(source)
    if suffix not in EXTENSIONS:
        raise InputError(
            f"data file {source!r}: unknown extension {suffix or '(none)'!r}; "
            f"expected one of {', '.join(EXTENSIONS)} or 'synthetic'"
        )
    for flag, given in (("--target", target), ("--features", features)):
        if given and suffix not in TABLE_FORMATS:
            raise InputError(
                f"{flag} applies to tables (CSV, Parquet, Feather) only, not {suffix} ({source!r})"
            )
    return suffix


def read_file(
    file: DataFile, target: tuple[str, ...] = (), features: tuple[str, ...] = ()
) -> Dataset:
    """The tensors of a table (.csv, .parquet, .feather/.arrow), .npz or .pt/.pth file."""
    suffix = check_format(file.url, target, features)
    with file.open() as f:
        _check_fits_in_memory(f, suffix, file.url)
        if suffix in TABLE_FORMATS:
            return _from_table(f, suffix, target, features, file.url)
        if suffix == ".npz":
            return _from_npz(f, file.url)
        if suffix == ".safetensors":
            return _from_safetensors(f, file.url)
        return _from_torch(f, file.url)


def load_dataset(
    source: str,
    target: tuple[str, ...] = (),
    n_samples: int = 100,
    data_seed: int = 42,
    noise: float = 0.1,
    features: tuple[str, ...] = (),
) -> Dataset:
    """'synthetic' or a file, without the cache."""
    if source == SYNTHETIC:
        return synthetic(n_samples, data_seed, noise)
    check_format(source, target, features)
    with DataFile(source) as file:
        return read_file(file, target, features)


def training_categories(data: Dataset, train: Tensor) -> Dataset:
    """`data` with each categorical column's vocabulary narrowed to the values its training
    rows hold, and its ids renumbered to match: a value seen only in validation rows is
    UNKNOWN, as an unseen one will be in predict. No categorical column: `data` itself."""
    if not data.categories:
        return data
    x = data.x.clone()
    narrowed: dict[str, tuple[str, ...]] = {}
    for i, name in enumerate(data.feature_names):
        if name not in data.categories:
            continue
        ids = x[:, i].long()
        seen = torch.unique(ids[train])
        seen = seen[seen != UNKNOWN]  # sorted, as the file's vocabulary is: so is the new one
        renumber = torch.full((len(data.categories[name]) + 1,), UNKNOWN, dtype=torch.long)
        renumber[seen] = torch.arange(1, len(seen) + 1)
        x[:, i] = renumber[ids].to(x.dtype)
        narrowed[name] = tuple(data.categories[name][j - 1] for j in seen.tolist())
    return Dataset(x, data.y, data.feature_names, data.target_names, narrowed)


def _check_fits_in_memory(f: IO[bytes], suffix: str, source: str) -> None:
    """Say up front that a file can't be loaded, instead of dying of OOM half-way."""
    size = f.seek(0, io.SEEK_END)
    f.seek(0)
    if suffix == ".npz":  # compressed members: what counts is their unpacked size
        with suppress(zipfile.BadZipFile):  # an unreadable file is the loader's to report
            size = sum(info.file_size for info in zipfile.ZipFile(f).infolist())
        f.seek(0)
    elif suffix == ".csv":  # Parquet and Feather: compressed or not, about their size
        size //= 2  # text digits are denser than float32 plus parsing buffers; an estimate
    available = available_memory()
    if available is not None and size > available:
        raise InputError(
            f"data file {source!r}: needs about {size / 1e9:.1f} GB of memory to load, "
            f"but only {available / 1e9:.1f} GB is available"
        )


def table_row_blocks(
    f: IO[bytes],
    source: str,
    required: tuple[str, ...],
    optional: tuple[str, ...],
    categories: Mapping[str, tuple[str, ...]],
    rows_per_block: int,
) -> Iterator[tuple[Tensor, Tensor | None]]:
    """The `required` columns, and the `optional` ones if the file has all of them, as float32
    tensors in the given order, a block of rows at a time; any other column, or a part of
    `optional`, is an error, raised by the header alone before any row is read. A column in
    `categories` becomes the ids of its values in that vocabulary (predict)."""
    names, has_optional = _scored_columns(f, source, required, optional)
    blocks = iter_columns(f, suffix_of(source), source, names, dict(categories), rows_per_block)
    return (_x_and_y(block, len(required), has_optional) for block in blocks)


def _x_and_y(table: np.ndarray, n_x: int, has_y: bool) -> tuple[Tensor, Tensor | None]:
    x = torch.from_numpy(np.ascontiguousarray(table[:, :n_x]))
    return x, torch.from_numpy(np.ascontiguousarray(table[:, n_x:])) if has_y else None


def _scored_columns(
    f: IO[bytes], source: str, required: tuple[str, ...], optional: tuple[str, ...]
) -> tuple[tuple[str, ...], bool]:
    """The columns to read, by the header alone, and whether `optional` is among them."""
    header = column_names(f, suffix_of(source), source)
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
    return (*required, *(optional if present else ())), bool(present)


def _from_table(
    f: IO[bytes], suffix: str, target: tuple[str, ...], features: tuple[str, ...], source: str
) -> Dataset:
    chosen, targets = table_roles(column_names(f, suffix, source), target, features, source)
    # One read of every chosen column; a string feature column is categorical, a target never.
    table = read_columns(f, suffix, source, (*chosen, *targets), frozenset(chosen))
    x = torch.from_numpy(np.ascontiguousarray(table.values[:, : len(chosen)]))
    y = torch.from_numpy(np.ascontiguousarray(table.values[:, len(chosen) :]))
    return _checked(x, y, chosen, targets, source, table.categories)


def table_roles_of(
    file: DataFile, suffix: str, target: tuple[str, ...], features: tuple[str, ...]
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """table_roles from the file's header: the columns by name, so that naming the default
    columns (`--target y` for a last column y) keys and reads as leaving them out."""
    with file.open() as f:
        return table_roles(column_names(f, suffix, file.url), target, features, file.url)


def table_roles(
    header: list[str], target: tuple[str, ...], features: tuple[str, ...], source: str
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The feature and the target columns `--features` and `--target` choose from a header."""
    if len(header) < 2:
        raise InputError(f"data file {source!r}: needs a header row and at least 2 columns")
    targets = target or (header[-1],)
    for role, names in (("target", targets), ("feature", features)):
        for name in names:
            if header.count(name) == 0:
                raise InputError(
                    f"data file {source!r}: {role} column {name!r} not found "
                    f"(columns: {', '.join(header)})"
                )
            if header.count(name) > 1:
                raise InputError(f"data file {source!r}: {role} column {name!r} appears twice")
    both = [name for name in features if name in targets]
    if both:
        raise InputError(f"data file {source!r}: {', '.join(both)} both feature and target")
    chosen = features or tuple(name for name in header if name not in targets)
    if not chosen:
        raise InputError(f"data file {source!r}: no feature columns left besides the target")
    if len(set(chosen)) != len(chosen):
        raise InputError(f"data file {source!r}: a feature column name appears twice")
    return chosen, targets


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
    return _from_arrays(x, y, source)


def _from_torch(f: IO[bytes], source: str) -> Dataset:
    x, y = torch_arrays(f, f"data file {source!r}")
    return _from_arrays(x, y, source)


def torch_arrays(
    f: IO[bytes] | str, where: str, mmap: bool = False, unreadable: str = ""
) -> tuple[Tensor, Tensor]:
    """A torch.save file's tensors x and y; `mmap`: its storages left on disk (a zip-format file
    only: `unreadable` says why another can't be read)."""
    try:
        # weights_only: tensors and plain containers only, never a pickled object's code.
        loaded = torch.load(f, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        raise InputError(
            f"{where}: holds objects that need unpickling code; "
            "save a plain dict of tensors {'x': ..., 'y': ...}"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile):
        why = unreadable if mmap and not zipfile.is_zipfile(f) else "not a readable torch.save file"
        raise InputError(f"{where}: {why}") from None
    if not isinstance(loaded, Mapping) or not all(
        isinstance(loaded.get(key), Tensor) for key in ("x", "y")
    ):
        raise InputError(f"{where}: expected a dict with tensors 'x' and 'y'")
    return loaded["x"], loaded["y"]


def _from_safetensors(f: IO[bytes], source: str) -> Dataset:
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    try:
        loaded = load_safetensors(f.read())  # a header and raw buffers: nothing to unpickle
    except (SafetensorError, ValueError, OSError) as exc:
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(
            f"data file {source!r}: not a readable .safetensors file ({why})"
        ) from None
    missing = [key for key in ("x", "y") if key not in loaded]
    if missing:
        raise InputError(
            f"data file {source!r}: missing array(s) {', '.join(missing)} "
            f"(has: {', '.join(sorted(loaded)) or 'none'})"
        )
    return _from_arrays(loaded["x"], loaded["y"], source)


# The dtypes x is kept in as stored; any other real dtype becomes one of them (below).
KEPT_X_DTYPES = tuple(getattr(torch, name) for name in STORED_X_DTYPES)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _from_arrays(x: np.ndarray | Tensor, y: np.ndarray | Tensor, source: str) -> Dataset:
    """An array file's x and y: x as stored where a model can take it so; y as float32 targets,
    or class ids (an integer y of one value per row) as int64."""
    where = f"data file {source!r}"
    x, y = real_tensor(x, "x", where), real_tensor(y, "y", where)
    check_array_shapes(tuple(x.shape), tuple(y.shape), where)
    x, unfit = array_x(x, where)
    data = _checked(x if x.ndim > 1 else x.unsqueeze(1), array_y(y, where), (), (), source)
    return dataclasses.replace(data, unfit_for_float32=unfit) if unfit else data


def check_array_shapes(x: tuple[int, ...], y: tuple[int, ...], where: str) -> None:
    if not x or not y:
        raise InputError(f"{where}: {'x' if not x else 'y'} is a single value, not rows")
    if len(y) > 2:
        raise InputError(f"{where}: y must be N values or N×T targets, got shape {y} ({len(y)}-D)")
    if x[0] != y[0]:
        raise InputError(f"{where}: x has {x[0]} rows but y has {y[0]}")


def array_x(x: Tensor, where: str, first_row: int = 0) -> tuple[Tensor, str]:
    """x (rows from `first_row` on) in the dtype it is kept in, and why float32 can't hold it
    ("" where it can: a built-in model refuses it otherwise)."""
    if x.dtype == torch.bool:
        x = x.to(torch.uint8)
    elif x.dtype == torch.float64:
        x = _as_float32(x, "x", where, first_row)
    elif x.is_floating_point() and x.dtype not in KEPT_X_DTYPES:  # float8: float32 holds it
        x = x.to(torch.float32)
    elif x.dtype not in KEPT_X_DTYPES:  # uint16/32/64: int64 holds them, and torch works on it
        x = _as_int64(x, "x", where)
    unfit = ""
    if not x.is_floating_point() and x.dtype != torch.uint8:
        found = unfit_for_float32(x.numpy())
        unfit = _unfit_message(x, "x", where, found, first_row) if found else ""
    return x, unfit


def y_is_class_ids(dtype: torch.dtype, shape: tuple[int, ...]) -> bool:
    """An integer y of one value per row: class ids, as CrossEntropyLoss takes them."""
    integer = not dtype.is_floating_point and dtype != torch.bool
    return integer and (len(shape) == 1 or shape[1] == 1)


def array_y(y: Tensor, where: str, first_row: int = 0) -> Tensor:
    """y (rows from `first_row` on) as int64 class ids (N), or float32 targets."""
    if y_is_class_ids(y.dtype, tuple(y.shape)):
        return _as_int64(y.reshape(-1), "y", where)
    return _as_float32(y, "y", where, first_row)


def real_tensor(array: np.ndarray | Tensor, name: str, where: str) -> Tensor:
    if isinstance(array, np.ndarray) and not array.dtype.isnative:  # big-endian bytes
        array = array.astype(array.dtype.newbyteorder("="))
    try:
        tensor = torch.as_tensor(array)
    except (TypeError, ValueError):
        tensor = None
    if tensor is None or tensor.is_complex():
        raise InputError(f"{where}: array {name!r} is not real-valued numbers")
    if tensor.layout != torch.strided:
        raise InputError(f"{where}: array {name!r} is sparse; save it dense")
    return tensor


def _as_int64(tensor: Tensor, name: str, where: str) -> Tensor:
    if tensor.dtype == torch.uint64:  # torch compares no uint64: numpy does
        values = tensor.numpy()
        if values.size and int(values.max()) > 2**63 - 1:
            raise InputError(f"{where}: {name} holds an integer beyond int64's range")
        return torch.from_numpy(values.astype(np.int64))
    return tensor.to(torch.int64)


def _as_float32(tensor: Tensor, name: str, where: str, first_row: int = 0) -> Tensor:
    # The tables' rule for arrays too: float32 must hold each value (an integer exactly).
    wide = tensor.dtype == torch.float64 or not tensor.is_floating_point()
    if wide and tensor.dtype != torch.bool and (found := unfit_for_float32(tensor.numpy())):
        raise InputError(_unfit_message(tensor, name, where, found, first_row))
    return tensor.to(torch.float32)


def _unfit_message(
    tensor: Tensor, name: str, where: str, found: tuple[int, str], first_row: int = 0
) -> str:
    index, why = found
    per_row = math.prod(tensor.shape[1:])
    row, col = divmod(index, per_row) if tensor.ndim > 1 else (index, 0)
    row += first_row
    return f"{where}: {name}, row {row}, {'column' if tensor.ndim <= 2 else 'element'} {col}: {why}"


def non_finite(tensor: Tensor, rows_per_chunk: int = 1 << 16) -> tuple[int, int, int] | None:
    """(count, first row, first column) of NaN/Inf values; in row chunks, so a large data
    set costs no extra copy. An N-d tensor counts by row and flat element; integers have none."""
    if not tensor.is_floating_point():
        return None
    rows = tensor.reshape(tensor.shape[0], -1) if tensor.ndim != 2 else tensor
    count, first = 0, None
    for start in range(0, rows.shape[0], rows_per_chunk):
        chunk = rows[start : start + rows_per_chunk]
        if chunk.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds every value
            chunk = chunk.float()
        # numpy for the common all-finite case: ~10x faster than torch's on a busy 2-core
        # machine, where torch's thread pool waits for a core.
        if np.isfinite(chunk.numpy()).all():
            continue
        bad = ~torch.isfinite(chunk)
        count += int(bad.sum())
        if first is None:
            row, col = (int(i) for i in bad.nonzero()[0])
            first = (start + row, col)
    return None if first is None else (count, *first)


def _checked(
    x: Tensor,
    y: Tensor,
    features: tuple[str, ...],
    targets: tuple[str, ...],
    source: str,
    categories: dict[str, tuple[str, ...]] | None = None,
    classes: tuple[str, ...] | None = None,
) -> Dataset:
    """x: N×F columns, or N×… samples (array files); y: N×T targets, or N int64 class ids."""
    where = f"data file {source!r}" if source else "synthetic data"
    if x.ndim == 1:
        x = x.unsqueeze(1)
    if y.ndim == 1 and y.is_floating_point():
        y = y.unsqueeze(1)
    if y.ndim > 2 or (y.ndim == 1 and y.dtype != torch.int64):
        raise InputError(f"{where}: y must be N×T targets or N class ids, got {tuple(y.shape)}")
    if x.shape[0] != y.shape[0]:
        raise InputError(f"{where}: x has {x.shape[0]} rows but y has {y.shape[0]}")
    if x.shape[0] == 0:
        raise InputError(f"{where}: the data set is empty")
    if 0 in x.shape[1:]:
        raise InputError(f"{where}: x has no values per row (shape {tuple(x.shape)})")
    for name, tensor, columns in (("x", x, features), ("y", y, targets)):
        if found := non_finite(tensor):
            count, row, col = found
            column = repr(columns[col]) if columns else str(col)
            place = "column" if tensor.ndim <= 2 else "element"
            raise InputError(
                f"{where}: {count} NaN/Inf value(s) in {name}, first at row {row}, {place} {column}"
            )
    if not features:
        features = tuple(f"x{i}" for i in range(x.shape[1])) if x.ndim == 2 else ("x",)
    if not targets:
        targets = ("y",) if y.ndim == 1 else tuple(f"y{i}" for i in range(y.shape[1]))
    return Dataset(
        x.contiguous(), y.contiguous(), features, targets, categories or {}, classes or None
    )
