"""Array files too big for memory (.npz, .pt, .safetensors): the memory-mapped path.

x is read a block of rows at a time into one mapped safetensors file; what training gathers
from it must equal the in-memory read bit for bit (dtype and values), and both paths must refuse
the same data with the same one-line error, leaving nothing behind.
"""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from trainflow.tasks.cache.stage import using_cache
from trainflow.tasks.data import mapped_arrays
from trainflow.tasks.data.mapped import (
    ENV_LIMIT,
    MappedDataset,
    MappedWriter,
    Scratch,
    array_bytes,
    too_big,
)
from trainflow.tasks.data.mapped_arrays import convert_arrays
from trainflow.tasks.data.sources import DataFile
from trainflow.tasks.data.tensors import Dataset, available_memory, load_dataset
from trainflow.tasks.errors import InputError

from ..conftest import REPO

N = 40
# How each format's own library writes it; "npz-compressed" is still an .npz file.
FORMATS = ("npz", "npz-compressed", "pt", "safetensors")
SUFFIX = {"npz": ".npz", "npz-compressed": ".npz", "pt": ".pt", "safetensors": ".safetensors"}
# A float32 intermediate is fine: every stored value is then exact in its own dtype.
X_CASES = {
    "uint8 images": ((1, 8, 8), torch.uint8),
    "int64 tokens": ((7,), torch.int64),
    "float64 columns": ((3,), torch.float64),
    "bfloat16 grids": ((2, 2), torch.bfloat16),
    "float16 grids": ((2, 2), torch.float16),
}
Y_CASES = ("int64 class ids", "float32 N×2")


def save(folder: Path, fmt: str, name: str = "d", **arrays: np.ndarray | torch.Tensor) -> str:
    """`arrays` in a file of format `fmt`, as that format's own library writes it."""
    path = folder / f"{name}{SUFFIX[fmt]}"
    if fmt.startswith("npz"):
        as_numpy = {k: a.numpy() if isinstance(a, torch.Tensor) else a for k, a in arrays.items()}
        (np.savez_compressed if fmt == "npz-compressed" else np.savez)(path, **as_numpy)
    elif fmt == "safetensors":
        save_file({k: torch.as_tensor(a).contiguous() for k, a in arrays.items()}, str(path))
    else:
        torch.save({k: torch.as_tensor(a) for k, a in arrays.items()}, path)
    return str(path)


def make_x(case: str, n: int = N, seed: int = 0) -> torch.Tensor:
    row, dtype = X_CASES[case]
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.uint8:
        return torch.randint(0, 256, (n, *row), generator=g, dtype=torch.uint8)
    if dtype == torch.int64:
        return torch.randint(0, 50_000, (n, *row), generator=g, dtype=torch.int64)
    x = torch.randn((n, *row), generator=g, dtype=torch.float64) * 100
    x.view(-1)[3] = -0.0  # a sign only the bits keep
    return x.to(dtype)


def make_y(case: str, n: int = N) -> torch.Tensor:
    if case == "int64 class ids":
        return torch.arange(n, dtype=torch.int64) % 3
    return torch.linspace(-2, 2, 2 * n, dtype=torch.float32).reshape(n, 2)


def assert_same_bits(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert torch.equal(got.contiguous().view(torch.uint8), expected.contiguous().view(torch.uint8))


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    folder = tmp_path / "scratch"
    folder.mkdir()
    return folder


@pytest.fixture
def appended(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Small blocks: the conversion takes several; the rows of each block appended, in order."""
    monkeypatch.setattr(mapped_arrays, "BLOCK_BYTES", 64)
    append, rows = MappedWriter.append, []

    def counting(self, x, y):
        rows.append(len(x))
        append(self, x, y)

    monkeypatch.setattr(MappedWriter, "append", counting)
    return rows


def convert(source: str, fmt: str, scratch: Path) -> MappedDataset:
    return convert_arrays(DataFile(source), SUFFIX[fmt], Scratch(str(scratch)))


# --- the mapped file holds what the in-memory read holds ---------------------------------------


def _conversion_cases():
    for fmt in FORMATS:
        for x_case in X_CASES:
            if fmt.startswith("npz") and X_CASES[x_case][1] == torch.bfloat16:
                continue  # numpy has no bfloat16
            for y_case in Y_CASES:
                yield pytest.param(fmt, x_case, y_case, id=f"{fmt}-{x_case}-{y_case}")


@pytest.mark.parametrize(("fmt", "x_case", "y_case"), list(_conversion_cases()))
def test_the_mapped_file_holds_the_in_memory_tensors_bit_for_bit(
    tmp_path, scratch, appended, fmt, x_case, y_case
):
    source = save(tmp_path, fmt, x=make_x(x_case), y=make_y(y_case))
    expected = load_dataset(source)
    data = convert(source, fmt, scratch)
    assert len(appended) > 3 and sum(appended) == N, appended  # several blocks, every row once

    x, y = data.table.gather(torch.arange(N))
    assert_same_bits(x, expected.x)
    assert_same_bits(y, expected.y)
    assert_same_bits(data.table.targets(), expected.y)
    assert_same_bits(data.y, expected.y)
    for name in ("input_shape", "input_dtype", "n_features", "n_targets"):
        assert getattr(data, name) == getattr(expected, name), name
    assert data.feature_names == expected.feature_names
    assert data.target_names == expected.target_names
    assert data.unfit_for_float32 == expected.unfit_for_float32 is None
    assert len(data) == len(expected) == N

    rows = torch.randperm(N, generator=torch.Generator().manual_seed(7))
    x, y = data.table.gather(rows)
    assert_same_bits(x, expected.x[rows])
    assert_same_bits(y, expected.y[rows])
    rows = torch.tensor([5, 5, 0, N - 1, 5])  # repeated and unordered: a batch may be so
    assert_same_bits(data.table.gather(rows)[0], expected.x[rows])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    ("stored", "kept"),
    [(torch.bool, torch.uint8), (torch.uint16, torch.int64), (torch.int32, torch.int32)],
)
def test_converted_dtypes_follow_the_in_memory_rules(
    tmp_path, scratch, appended, fmt, stored, kept
):
    x = (torch.arange(N * 3).reshape(N, 3) % 5).to(stored)
    source = save(tmp_path, fmt, x=x, y=make_y("int64 class ids"))
    expected = load_dataset(source)
    data = convert(source, fmt, scratch)
    assert expected.x.dtype == kept
    assert_same_bits(data.table.gather(torch.arange(N))[0], expected.x)
    assert data.input_dtype == expected.input_dtype


@pytest.mark.parametrize("fmt", ["npz", "pt", "safetensors"])
def test_integer_x_float32_cannot_hold_in_a_later_block_is_flagged_as_in_memory(
    tmp_path, scratch, appended, fmt
):
    x = make_x("int64 tokens")
    x[33, 4] = 2**60 + 1
    source = save(tmp_path, fmt, x=x, y=make_y("int64 class ids"))
    expected = load_dataset(source)
    data = convert(source, fmt, scratch)
    assert appended[0] < 33  # the value is past the first block
    assert "x, row 33, column 4" in expected.unfit_for_float32
    assert data.unfit_for_float32 == expected.unfit_for_float32
    assert int(data.table.gather(torch.tensor([33]))[0][0, 4]) == 2**60 + 1


@pytest.mark.parametrize("fmt", ["npz", "pt", "safetensors"])
def test_a_float_y_of_one_value_per_row_is_n_by_1_as_in_memory(tmp_path, scratch, fmt):
    source = save(tmp_path, fmt, x=make_x("float64 columns"), y=torch.linspace(0, 1, N))
    expected = load_dataset(source)
    data = convert(source, fmt, scratch)
    assert expected.y.shape == (N, 1)
    assert_same_bits(data.y, expected.y)
    assert_same_bits(data.table.gather(torch.arange(N))[1], expected.y)
    assert data.target_names == expected.target_names


# --- errors: the in-memory read's, in one line, and nothing left behind ------------------------


def mapped_error(source: str, fmt: str, scratch: Path) -> str:
    with pytest.raises(InputError) as caught:
        convert(source, fmt, scratch)
    message = str(caught.value)
    assert "\n" not in message and repr(source) in message, message
    assert os.listdir(scratch) == []  # neither the half-written file nor y's side file
    return message


def in_memory_error(source: str) -> str:
    with pytest.raises(InputError) as caught:
        load_dataset(source)
    return str(caught.value)


def _shape_errors():
    for fmt in FORMATS:
        yield pytest.param(fmt, make_x("uint8 images"), torch.ones(N, 2, 2), id=f"{fmt}-3d-y")
        yield pytest.param(fmt, make_x("uint8 images"), torch.ones(N - 1), id=f"{fmt}-lengths")
        complex_x = torch.ones(N, 3, dtype=torch.complex64)
        yield pytest.param(fmt, complex_x, torch.ones(N), id=f"{fmt}-complex-x")


@pytest.mark.parametrize(("fmt", "x", "y"), list(_shape_errors()))
def test_bad_shapes_and_dtypes_are_the_in_memory_error(tmp_path, scratch, appended, fmt, x, y):
    source = save(tmp_path, fmt, x=x, y=y)
    assert mapped_error(source, fmt, scratch) == in_memory_error(source)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("missing", ["x", "y"])
def test_a_missing_array_is_the_in_memory_error(tmp_path, scratch, fmt, missing):
    arrays = {"x": torch.ones(N, 3), "y": torch.ones(N), "z": torch.ones(N)}
    del arrays[missing]
    source = save(tmp_path, fmt, **arrays)
    message = mapped_error(source, fmt, scratch)
    assert f"'{missing}'" in message or f"(s) {missing} (has: " in message
    if fmt == "safetensors":  # the in-memory read says "tensor(s)" here: the same facts
        assert message == in_memory_error(source).replace("missing tensor(s)", "missing array(s)")
    else:
        assert message == in_memory_error(source)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    ("x_case", "where"), [("float64 columns", "column 2"), ("float16 grids", "element 3")]
)
def test_nan_in_a_later_block_is_the_in_memory_error(
    tmp_path, scratch, appended, fmt, x_case, where
):
    x = make_x(x_case)
    x.reshape(N, -1)[29, int(where.split()[1])] = float("nan")
    x.reshape(N, -1)[35, 0] = float("inf")
    source = save(tmp_path, fmt, x=x, y=make_y("float32 N×2"))
    expected = in_memory_error(source)
    message = mapped_error(source, fmt, scratch)
    assert len(appended) > 1  # read in several blocks; the count is over all of them
    # The whole file's count, and the first place, as the in-memory read says it.
    assert expected.endswith(f"2 NaN/Inf value(s) in x, first at row 29, {where}"), expected
    assert message == expected


@pytest.mark.parametrize("fmt", ["npz", "pt", "safetensors"])
def test_a_float64_float32_cannot_hold_in_a_later_block_is_the_in_memory_error(
    tmp_path, scratch, appended, fmt
):
    x = make_x("float64 columns")
    x[31, 1] = 1e300
    source = save(tmp_path, fmt, x=x, y=make_y("int64 class ids"))
    message = mapped_error(source, fmt, scratch)
    assert appended and sum(appended) < 31
    assert "x, row 31, column 1: 1e+300 is beyond float32's range" in message
    assert message == in_memory_error(source)


class RunsCode:
    """Unpickling this makes a folder: the proof that a loader ran a pickle's code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_an_npz_of_python_objects_is_refused_without_unpickling(tmp_path, scratch):
    marker = tmp_path / "unpickled"
    x = np.empty((N, 2), dtype=object)
    x[:] = 1
    x[0, 0] = RunsCode(marker)
    path = tmp_path / "objects.npz"
    np.savez(path, x=x, y=np.ones(N))
    message = mapped_error(str(path), "npz", scratch)
    assert "'x'" in message and "objects" in message, message
    in_memory_error(str(path))  # refused there too (its message names no array)
    assert not marker.exists()


def test_an_npz_in_fortran_order_is_refused_in_one_line(tmp_path, scratch):
    path = tmp_path / "fortran.npz"
    np.savez(path, x=np.asfortranarray(np.ones((N, 3))), y=np.ones(N))
    message = mapped_error(str(path), "npz", scratch)
    assert "'x'" in message and "Fortran order" in message, message


def test_a_torch_file_holding_a_pickled_object_is_refused_without_running_it(tmp_path, scratch):
    marker = tmp_path / "unpickled"
    path = tmp_path / "objects.pt"
    torch.save({"x": torch.ones(N, 2), "y": torch.ones(N), "extra": RunsCode(marker)}, path)
    message = mapped_error(str(path), "pt", scratch)
    assert message == in_memory_error(str(path))
    assert "unpickling" in message and not marker.exists()


def test_a_legacy_format_torch_file_too_big_for_memory_is_one_line_saying_how_to_resave(
    tmp_path, scratch
):
    """The legacy format can't be mapped, and this path is for files memory can't hold: it is
    refused with what to do, where the in-memory read (a file that fits) loads it."""
    path = tmp_path / "legacy.pt"
    x = make_x("uint8 images")
    torch.save({"x": x, "y": make_y("int64 class ids")}, path, _use_new_zipfile_serialization=False)
    assert torch.equal(load_dataset(str(path)).x, x)
    message = mapped_error(str(path), "pt", scratch)
    assert "legacy format" in message and ".safetensors" in message


@pytest.mark.parametrize(
    ("x", "y"),
    [
        (torch.ones(0, 3), torch.ones(0)),
        (torch.ones(0, 3), torch.ones(0, dtype=torch.int64)),
        (torch.ones(N, 0), torch.ones(N)),
    ],
    ids=["no-rows-float-y", "no-rows-class-ids", "no-columns"],
)
def test_an_empty_data_set_is_the_in_memory_error(tmp_path, scratch, x, y):
    source = save(tmp_path, "npz", x=x, y=y)
    assert mapped_error(source, "npz", scratch) == in_memory_error(source)


# --- which files go the mapped way ---------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_array_file_goes_the_mapped_way_only_above_the_limit(tmp_path, monkeypatch, fmt):
    source = save(tmp_path, fmt, x=make_x("uint8 images"), y=make_y("int64 class ids"))
    file = DataFile(source)
    monkeypatch.setenv(ENV_LIMIT, "0")
    assert too_big(file, SUFFIX[fmt], available_memory())
    assert too_big(file, SUFFIX[fmt], None)  # the variable decides, whatever memory says
    monkeypatch.setenv(ENV_LIMIT, str(array_bytes(file, SUFFIX[fmt])))
    assert not too_big(file, SUFFIX[fmt], None)
    monkeypatch.delenv(ENV_LIMIT)
    assert not too_big(file, SUFFIX[fmt], available_memory())
    assert not too_big(file, SUFFIX[fmt], None)


def _npy_size(array: np.ndarray) -> int:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return len(buffer.getvalue())


def test_an_npz_counts_its_members_unpacked_size(tmp_path, monkeypatch):
    x, y = np.zeros((500, 64), dtype=np.uint8), np.zeros(500, dtype=np.int64)
    source = save(tmp_path, "npz-compressed", x=x, y=y)
    file = DataFile(source)
    unpacked = _npy_size(x) + _npy_size(y)
    assert array_bytes(file, ".npz") == unpacked
    assert file.size < unpacked // 10  # zeros compress: the file's own size would mislead
    monkeypatch.setenv(ENV_LIMIT, str(unpacked - 1))
    assert too_big(file, ".npz", None)
    pt = save(tmp_path, "pt", x=x, y=y)
    assert array_bytes(DataFile(pt), ".pt") == os.path.getsize(pt)


def test_load_tensors_maps_an_array_file_over_the_limit_and_hits_the_cache(tmp_path, monkeypatch):
    from trainflow.tasks.load_tensors import load_tensors

    monkeypatch.delenv(ENV_LIMIT, raising=False)
    x, y = make_x("uint8 images"), make_y("int64 class ids")
    source = save(tmp_path, "npz", x=x, y=y)
    with using_cache(str(tmp_path / "cache"), "use"):
        assert isinstance(load_tensors.fn(source, (), 100, 42, 0.1), Dataset)
        monkeypatch.setenv(ENV_LIMIT, "0")
        data = load_tensors.fn(source, (), 100, 42, 0.1)
        assert isinstance(data, MappedDataset)
        assert_same_bits(data.table.gather(torch.arange(N))[0], x)
        hit = load_tensors.fn(source, (), 100, 42, 0.1)
    assert hit.name == "Cached" and isinstance(hit.data, MappedDataset)
    assert_same_bits(hit.data.table.gather(torch.arange(N))[0], x)
    assert_same_bits(hit.data.y, y)
    blobs = tmp_path / "cache" / "blobs"
    assert not [p.name for p in blobs.iterdir() if p.name.startswith(".")]  # scratch adopted


# --- a whole run: mapped == in memory ------------------------------------------------------------


def _train(tmp_path: Path, env: dict[str, str], data: str, name: str, cache: str) -> Path:
    result = subprocess.run(
        [
            sys.executable,
            "flows/train_flow.py",
            *("--data", data, "--loss", "cross_entropy", "--model", "linear", "--epochs", "2"),
            *("--cache-dir", str(tmp_path / cache), "--runs-dir", str(tmp_path / f"runs-{name}")),
            *("--run-name", name),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return tmp_path / f"runs-{name}" / name


def _states(run: Path) -> dict[str, str]:
    return {s["name"]: s["state"] for s in json.loads((run / "stages.json").read_text())}


@pytest.mark.system
def test_a_run_on_the_mapped_path_trains_the_same_model_as_in_memory(tmp_path, subprocess_env):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 1, 4, 4), generator=g, dtype=torch.uint8)
    data = save(tmp_path, "npz", x=x, y=torch.arange(64, dtype=torch.int64) % 3)
    in_memory_env = {k: v for k, v in subprocess_env.items() if k != ENV_LIMIT}
    in_memory = _train(tmp_path, in_memory_env, data, "in-memory", "cache-memory")
    mapped_env = {**subprocess_env, ENV_LIMIT: "0"}
    mapped = _train(tmp_path, mapped_env, data, "mapped", "cache-mapped")
    weights = (in_memory / "model.safetensors").read_bytes()
    assert (mapped / "model.safetensors").read_bytes() == weights
    records = [json.loads(p.read_text()) for p in (tmp_path / "cache-mapped/records").iterdir()]
    assert [r["artifact"] for r in records].count("MappedDataset") == 1
    assert "MappedDataset" not in [
        json.loads(p.read_text())["artifact"] for p in (tmp_path / "cache-memory/records").iterdir()
    ]
    assert _states(mapped)["load-tensors"] != "Cached"

    again = _train(tmp_path, mapped_env, data, "again", "cache-mapped")
    assert _states(again)["load-tensors"] == "Cached"
    assert (again / "model.safetensors").read_bytes() == weights
