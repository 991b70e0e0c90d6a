from __future__ import annotations

import os
import pathlib
import uuid
import warnings
from pathlib import Path

import fsspec
import fsspec.implementations.local
import numpy as np
import pytest
import torch

import trainflow.tasks.data.sources
from trainflow.tasks.build_model import build_model
from trainflow.tasks.data.tensors import Dataset, load_dataset, synthetic
from trainflow.tasks.errors import InputError


def write_csv(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def assert_one_line_error(source: str, *fragments: str, target: tuple[str, ...] = ()) -> None:
    with pytest.raises(InputError) as info:
        load_dataset(source, target)
    message = str(info.value)
    assert "\n" not in message
    assert repr(source) in message
    for fragment in fragments:
        assert fragment in message


# --- synthetic ------------------------------------------------------------------------------


def test_synthetic_equals_book_recipe():
    state = np.random.get_state()
    try:
        np.random.seed(42)
        x = np.random.rand(100, 1)
        y = 1 + 2 * x + 0.1 * np.random.randn(100, 1)
    finally:
        np.random.set_state(state)
    data = synthetic()
    assert torch.equal(data.x, torch.as_tensor(x).float())
    assert torch.equal(data.y, torch.as_tensor(y).float())


def test_synthetic_shapes_and_dtype():
    data = synthetic()
    assert isinstance(data, Dataset)
    assert data.x.shape == (100, 1)
    assert data.y.shape == (100, 1)
    assert data.x.dtype == data.y.dtype == torch.float32
    assert len(data) == 100
    assert (data.n_features, data.n_targets) == (1, 1)


def test_synthetic_leaves_global_rng_state_alone():
    np_before = np.random.get_state()
    torch_before = torch.get_rng_state()
    synthetic()
    np_after = np.random.get_state()
    assert np_before[0] == np_after[0]
    assert np.array_equal(np_before[1], np_after[1])
    assert np_before[2:] == np_after[2:]
    assert torch.equal(torch_before, torch.get_rng_state())


def test_load_dataset_synthetic_dispatch():
    assert torch.equal(load_dataset("synthetic").x, synthetic().x)


# --- CSV ------------------------------------------------------------------------------------


def test_csv_default_target_is_last_column(tmp_path):
    source = write_csv(tmp_path / "d.csv", "a,b,c\n1,2,3\n4,5,6\n")
    data = load_dataset(source)
    assert data.feature_names == ("a", "b")
    assert data.target_names == ("c",)
    assert torch.equal(data.x, torch.tensor([[1.0, 2.0], [4.0, 5.0]]))
    assert torch.equal(data.y, torch.tensor([[3.0], [6.0]]))
    assert data.x.dtype == data.y.dtype == torch.float32


@pytest.mark.parametrize(
    ("target", "features", "x", "y"),
    [
        (("a",), ("b", "c"), [[2, 3], [5, 6]], [[1], [4]]),
        (("b",), ("a", "c"), [[1, 3], [4, 6]], [[2], [5]]),
        (("c", "a"), ("b",), [[2], [5]], [[3, 1], [6, 4]]),
    ],
)
def test_csv_named_targets(tmp_path, target, features, x, y):
    source = write_csv(tmp_path / "d.csv", "a,b,c\n1,2,3\n4,5,6\n")
    data = load_dataset(source, target)
    assert data.feature_names == features
    assert data.target_names == target
    assert torch.equal(data.x, torch.tensor(x, dtype=torch.float32))
    assert torch.equal(data.y, torch.tensor(y, dtype=torch.float32))
    assert data.x.dtype == data.y.dtype == torch.float32


def test_csv_via_file_url(tmp_path):
    path = write_csv(tmp_path / "d.csv", "u,v\n1.5,2.5\n")
    data = load_dataset("file://" + path)
    assert data.feature_names == ("u",)
    assert torch.equal(data.y, torch.tensor([[2.5]]))


def test_csv_via_memory_url():
    url = f"memory://trainflow-{uuid.uuid4().hex}/d.csv"
    with fsspec.open(url, "wb") as f:
        f.write(b"p,q\n1,2\n3,4\n")
    try:
        data = load_dataset(url)
    finally:
        fsspec.filesystem("memory").rm(url)
    assert data.feature_names == ("p",)
    assert data.target_names == ("q",)
    assert torch.equal(data.x, torch.tensor([[1.0], [3.0]]))


# --- NPZ and PT -----------------------------------------------------------------------------


def test_npz_1d_arrays_become_columns(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.arange(4.0), y=np.arange(4) * 2.0)
    data = load_dataset(str(path))
    assert data.x.shape == data.y.shape == (4, 1)
    assert data.x.dtype == data.y.dtype == torch.float32
    assert torch.equal(data.y[:, 0], torch.tensor([0.0, 2.0, 4.0, 6.0]))


def test_an_integer_y_of_one_value_per_row_is_int64_class_ids(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.arange(4.0), y=np.array([[0], [2], [1], [2]], dtype=np.int32))
    data = load_dataset(str(path))
    assert data.y.dtype == torch.int64 and data.y.shape == (4,)
    assert data.y.tolist() == [0, 2, 1, 2]
    assert data.n_targets == 1 and data.target_names == ("y",)


def test_npz_2d_arrays(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.ones((3, 2)), y=np.zeros((3, 2)))
    data = load_dataset(str(path))
    assert data.x.shape == data.y.shape == (3, 2)
    assert data.feature_names == ("x0", "x1")
    assert data.target_names == ("y0", "y1")


@pytest.mark.parametrize("suffix", [".pt", ".pth"])
def test_torch_dict_of_tensors(tmp_path, suffix):
    path = tmp_path / f"d{suffix}"
    x = torch.arange(6, dtype=torch.float64).reshape(3, 2)
    torch.save({"x": x, "y": torch.tensor([1.0, 2.0, 3.0])}, path)
    data = load_dataset(str(path))
    assert torch.equal(data.x, x.float())
    assert data.y.shape == (3, 1)
    assert data.x.dtype == data.y.dtype == torch.float32


# --- errors ---------------------------------------------------------------------------------


CSV_ERRORS = [
    ("header_only", "a,b\n", (), ["no data rows"]),
    ("non_numeric", "a,b\n1,2\n3,oops\n", (), ["line 3", "'b'", "'oops'", "not a number"]),
    ("ragged", "a,b,c\n1,2,3\n4,5\n", (), ["line 3", "2 fields", "header has 3"]),
    ("missing_target", "a,b\n1,2\n", ("zz",), ["'zz'", "not found"]),
    ("duplicate_target", "a,y,y\n1,2,3\n", (), ["'y'", "twice"]),
    ("nan_inf", "a,b\n1,nan\ninf,2\n-inf,nan\n", (), ["2 NaN/Inf", "in x"]),
    # Quoted, and still not a number: the cell is named as written, comma and all.
    ("quoted_comma", 'a,b\n"1,5",2\n', (), ["line 2, column 'a': '1,5' is not a number"]),
    ("quoted_text", 'a,b\n1,2\n3,"x"\n', (), ["line 3, column 'b': 'x' is not a number"]),
]


def test_csv_with_quoted_numbers_is_read(tmp_path):
    # What pandas (quoting=csv.QUOTE_NONNUMERIC on strings) and spreadsheets write.
    source = write_csv(tmp_path / "q.csv", '"a","y"\n"1.5",2\n3,"-4e-1"\n')
    data = load_dataset(source)
    assert (data.feature_names, data.target_names) == (("a",), ("y",))
    assert torch.equal(data.x, torch.tensor([[1.5], [3.0]]))
    assert torch.equal(data.y, torch.tensor([[2.0], [-0.4]]))


@pytest.mark.parametrize(
    ("text", "target", "fragments"),
    [case[1:] for case in CSV_ERRORS],
    ids=[case[0] for case in CSV_ERRORS],
)
def test_csv_errors(tmp_path, text, target, fragments):
    assert_one_line_error(write_csv(tmp_path / "d.csv", text), *fragments, target=target)


def test_header_only_csv_emits_no_warning(tmp_path):
    source = write_csv(tmp_path / "d.csv", "a,b\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(InputError):
            load_dataset(source)
    assert [str(w.message) for w in caught] == []


def test_missing_file(tmp_path):
    assert_one_line_error(str(tmp_path / "absent.csv"), "not found")


def test_directory(tmp_path):
    folder = tmp_path / "folder.csv"
    folder.mkdir()
    assert_one_line_error(str(folder), "directory")


def test_unknown_extension(tmp_path):
    source = write_csv(tmp_path / "d.txt", "a,b\n1,2\n")
    assert_one_line_error(source, "unknown extension", "'.txt'")


@pytest.mark.parametrize("suffix", [".csv", ".npz", ".pt"])
def test_empty_file(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    path.write_bytes(b"")
    assert_one_line_error(str(path), "empty")


def test_target_given_for_npz(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.ones(2), y=np.ones(2))
    assert_one_line_error(str(path), "--target", "CSV", ".npz", target=("y",))


def test_npz_nan_count(tmp_path):
    path = tmp_path / "d.npz"
    y = np.array([1.0, np.nan, np.inf, 4.0, np.nan])
    np.savez(path, x=np.ones(5), y=y)
    assert_one_line_error(str(path), "3 NaN/Inf", "in y", "row 1")


def test_npz_row_mismatch(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.ones((3, 2)), y=np.ones(2))
    assert_one_line_error(str(path), "x has 3 rows", "y has 2")


def test_npz_without_y(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.ones(3), z=np.ones(3))
    assert_one_line_error(str(path), "missing", "y")


def test_pt_bare_tensor(tmp_path):
    path = tmp_path / "d.pt"
    torch.save(torch.ones(3, 2), path)
    assert_one_line_error(str(path), "expected a dict", "'x'", "'y'")


class _Exploit:
    marker: Path

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_pt_pickled_object_is_rejected_without_running_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "d.pt"
    torch.save({"x": _Exploit(marker), "y": torch.ones(1)}, path)
    assert not marker.exists()
    assert_one_line_error(str(path), "unpickling")
    assert not marker.exists()


def test_permission_denied(tmp_path, monkeypatch):
    path = tmp_path / "d.csv"
    path.write_text("a,b\n1,2\n")
    path.chmod(0)
    if os.geteuid() == 0:  # root reads any file (and may not drop privileges here): simulate

        def deny(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(trainflow.tasks.data.sources, "open", deny, raising=False)
    assert_one_line_error(str(path), "permission denied")


@pytest.mark.parametrize("suffix", [".npz", ".pt"])
def test_arrays_float32_cannot_hold_are_one_line_naming_row_and_column(tmp_path, suffix, recwarn):
    path = str(tmp_path / f"d{suffix}")

    def save(x, y):
        if suffix == ".npz":
            np.savez(path, x=x, y=y)
        else:
            torch.save({"x": torch.as_tensor(x), "y": torch.as_tensor(y)}, path)

    timestamps = np.ones((5, 2), dtype=np.int64)
    timestamps[3, 1] = 1_700_000_000_000_000_001
    save(timestamps, np.ones(5))
    # Integer x is kept as stored (a model of one's own may take ids); a built-in model, which
    # computes in float32, refuses it at build-model with the same line.
    data = load_dataset(path)
    assert data.x.dtype == torch.int64 and int(data.x[3, 1]) == 1_700_000_000_000_000_001
    why = "x, row 3, column 1: the integer 1700000000000000001 is not exact in float32"
    assert why in data.unfit_for_float32 and path in data.unfit_for_float32
    with pytest.raises(InputError, match=why) as info:
        build_model.fn(
            name="linear", n_inputs=2, n_outputs=1, hidden=(), activation="relu", seed=0, data=data
        )
    assert "\n" not in str(info.value)
    save(np.ones(5), np.array([1.0, 2.0, 1e300, 1.0, 1.0]))
    assert_one_line_error(path, "y, row 2, column 0: 1e+300 is beyond float32's range")
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
    exact = np.array([16_777_216, 30_000_000, -(2**60)], dtype=np.int64)
    save(exact, np.ones(3))
    assert load_dataset(path).unfit_for_float32 is None
