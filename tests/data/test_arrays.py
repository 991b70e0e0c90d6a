"""Array files (.npz, .pt/.pth, .safetensors): x of any shape N×… in the dtype a model can take as
stored, y as float32 targets or int64 class ids, and one-line errors naming file and array."""

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from trainflow.tasks.data.tensors import Dataset, load_dataset
from trainflow.tasks.errors import InputError

FORMATS = ("npz", "pt", "pth", "safetensors")
TORCH_FORMATS = ("pt", "safetensors")  # what numpy can't hold (bfloat16) goes through these


def save(folder: Path, fmt: str, **arrays: torch.Tensor) -> str:
    """`arrays` in a file of format `fmt`, written as that format's own library writes it."""
    path = folder / f"d.{fmt}"
    if fmt == "npz":
        np.savez(path, **{name: a.numpy() for name, a in arrays.items()})
    elif fmt == "safetensors":
        save_file({name: a.contiguous() for name, a in arrays.items()}, str(path))
    else:
        torch.save(arrays, path)
    return str(path)


def one_line_error(source: str, *fragments: str) -> str:
    with pytest.raises(InputError) as info:
        load_dataset(source)
    message = str(info.value)
    assert "\n" not in message, message
    assert repr(source) in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def images(n=6, dtype=torch.uint8) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 1, 8, 8), generator=g).to(dtype)


# --- x keeps its dtype and shape ----------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_uint8_images_stay_uint8_n_by_c_by_h_by_w(tmp_path, fmt):
    x, y = images(), torch.tensor([0, 1, 2, 0, 1, 2])
    data = load_dataset(save(tmp_path, fmt, x=x, y=y))
    assert data.x.dtype == torch.uint8 and torch.equal(data.x, x)
    assert data.input_shape == (1, 8, 8) and data.input_dtype == "uint8"
    assert data.n_features == 64 and data.n_targets == 1 and len(data) == 6
    assert data.y.dtype == torch.int64 and data.y.tolist() == [0, 1, 2, 0, 1, 2]


def test_a_uint8_image_set_is_cached_4_times_smaller_than_float32(tmp_path):
    data = load_dataset(save(tmp_path, "npz", x=images(), y=torch.zeros(6)))
    tensors, meta = data.to_cache()
    assert tensors["x"].dtype == torch.uint8 and tensors["x"].element_size() == 1
    assert tensors["x"].element_size() * 4 == torch.ones(1).element_size()
    back = Dataset.from_cache(tensors, meta)
    assert back.x.dtype == torch.uint8 and back.input_shape == (1, 8, 8)


@pytest.mark.parametrize("fmt", FORMATS)
def test_int64_token_ids_n_by_t_stay_int64(tmp_path, fmt):
    x = torch.arange(5 * 7, dtype=torch.int64).reshape(5, 7) * 1000
    data = load_dataset(save(tmp_path, fmt, x=x, y=torch.ones(5)))
    assert data.x.dtype == torch.int64 and torch.equal(data.x, x)
    assert data.input_shape == (7,) and data.input_dtype == "int64" and data.n_features == 7
    assert data.unfit_for_float32 is None


@pytest.mark.parametrize(
    ("fmt", "dtype"),
    [
        *((fmt, torch.float16) for fmt in FORMATS),
        *((fmt, torch.bfloat16) for fmt in TORCH_FORMATS),
        *((fmt, torch.float32) for fmt in FORMATS),
        *((fmt, dtype) for fmt in FORMATS for dtype in (torch.int8, torch.int16, torch.int32)),
    ],
)
def test_kept_dtypes_are_kept(tmp_path, fmt, dtype):
    x = images(4).to(dtype)
    data = load_dataset(save(tmp_path, fmt, x=x, y=torch.ones(4)))
    assert data.x.dtype == dtype and torch.equal(data.x, x)
    assert data.input_dtype == str(dtype).removeprefix("torch.")


@pytest.mark.parametrize("fmt", FORMATS)
def test_float64_becomes_float32(tmp_path, fmt):
    x = torch.linspace(-1, 1, 4 * 3 * 2, dtype=torch.float64).reshape(4, 3, 2)
    data = load_dataset(save(tmp_path, fmt, x=x, y=torch.ones(4, dtype=torch.float64)))
    assert data.x.dtype == torch.float32 and torch.equal(data.x, x.float())
    assert data.y.dtype == torch.float32 and data.y.shape == (4, 1)


@pytest.mark.parametrize("fmt", FORMATS)
def test_bool_becomes_uint8(tmp_path, fmt):
    x = torch.tensor([[True, False], [False, True], [True, True]])
    data = load_dataset(save(tmp_path, fmt, x=x, y=torch.ones(3)))
    assert data.x.dtype == torch.uint8 and data.x.tolist() == [[1, 0], [0, 1], [1, 1]]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32])
def test_unsigned_wider_than_a_byte_becomes_int64(tmp_path, fmt, dtype):
    values = [[0, 1], [2, 65535], [7, 40000]]
    data = load_dataset(save(tmp_path, fmt, x=torch.tensor(values).to(dtype), y=torch.ones(3)))
    assert data.x.dtype == torch.int64 and data.x.tolist() == values


@pytest.mark.parametrize("role", ["x", "y"])
def test_uint64_arrays_become_int64(tmp_path, role):
    arrays = {"x": torch.ones(3, 2), "y": torch.ones(3)}
    arrays[role] = torch.tensor([[1], [2], [3]]).to(torch.uint64)
    data = load_dataset(save(tmp_path, "npz", **arrays))
    assert getattr(data, role).dtype == torch.int64


# --- y: float32 targets or int64 class ids ------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_float_y_is_float32_n_by_1(tmp_path, fmt, dtype):
    y = torch.tensor([0.5, 1.5, -2.0]).to(dtype)
    data = load_dataset(save(tmp_path, fmt, x=images(3), y=y))
    assert data.y.dtype == torch.float32 and data.y.shape == (3, 1)
    assert data.y[:, 0].tolist() == [0.5, 1.5, -2.0] and data.n_targets == 1


def test_float_y_n_by_t_is_float32_n_by_t(tmp_path):
    y = torch.arange(12, dtype=torch.float64).reshape(4, 3)
    data = load_dataset(save(tmp_path, "npz", x=images(4), y=y))
    assert data.y.dtype == torch.float32 and torch.equal(data.y, y.float())
    assert data.n_targets == 3 and data.target_names == ("y0", "y1", "y2")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int32, torch.int64])
@pytest.mark.parametrize("shape", [(5,), (5, 1)])
def test_integer_y_of_one_value_per_row_is_int64_class_ids(tmp_path, fmt, dtype, shape):
    y = torch.tensor([3, 0, 1, 2, 1]).to(dtype).reshape(shape)
    data = load_dataset(save(tmp_path, fmt, x=images(5), y=y))
    assert data.y.dtype == torch.int64 and data.y.shape == (5,)
    assert data.y.tolist() == [3, 0, 1, 2, 1] and data.n_targets == 1


@pytest.mark.parametrize("fmt", FORMATS)
def test_integer_y_of_several_values_per_row_is_float32_targets(tmp_path, fmt):
    y = torch.tensor([[1, 0], [0, 1], [1, 1]], dtype=torch.int32)
    data = load_dataset(save(tmp_path, fmt, x=images(3), y=y))
    assert data.y.dtype == torch.float32 and torch.equal(data.y, y.float())
    assert data.n_targets == 2


# --- errors: one line, naming the file and the array ---------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_3d_y_is_refused(tmp_path, fmt):
    source = save(tmp_path, fmt, x=images(4), y=torch.ones(4, 2, 2))
    one_line_error(source, "y", "(4, 2, 2)")


@pytest.mark.parametrize("fmt", FORMATS)
def test_mismatched_lengths_are_refused(tmp_path, fmt):
    source = save(tmp_path, fmt, x=images(4), y=torch.ones(3))
    one_line_error(source, "x has 4 rows", "y has 3")


@pytest.mark.parametrize("fmt", ["npz", "pt", "safetensors"])
@pytest.mark.parametrize("role", ["x", "y"])
def test_complex_values_are_refused(tmp_path, fmt, role):
    arrays = {"x": torch.ones(3, 2), "y": torch.ones(3)}
    arrays[role] = arrays[role].to(torch.complex64)
    one_line_error(save(tmp_path, fmt, **arrays), f"{role!r}", "not real-valued")


@pytest.mark.parametrize("fmt", ["npz", "pt", "safetensors"])
@pytest.mark.parametrize("role", ["x", "y"])
def test_a_0d_array_is_refused(tmp_path, fmt, role):
    arrays = {"x": torch.ones(3, 2), "y": torch.ones(3)}
    arrays[role] = torch.tensor(1.0)
    one_line_error(save(tmp_path, fmt, **arrays), f"{role} is a single value")


@pytest.mark.parametrize("fmt", ["npz", "safetensors"])
@pytest.mark.parametrize("role", ["x", "y"])
def test_a_missing_array_is_named(tmp_path, fmt, role):
    arrays = {"x": torch.ones(3, 2), "y": torch.ones(3), "z": torch.ones(3)}
    del arrays[role]
    one_line_error(save(tmp_path, fmt, **arrays), "missing", f"(s) {role} (has: ")


def test_a_missing_array_in_a_torch_file_names_both_keys(tmp_path):
    one_line_error(save(tmp_path, "pt", x=torch.ones(3, 2)), "'x'", "'y'")


@pytest.mark.parametrize(
    ("fmt", "dtype"),
    [("npz", torch.float16), ("pt", torch.float16), ("pt", torch.bfloat16)],
)
def test_nan_in_a_half_precision_image_is_named(tmp_path, fmt, dtype):
    x = images(4).to(dtype)
    x[2, 0, 3, 5] = float("nan")
    source = save(tmp_path, fmt, x=x, y=torch.ones(4))
    one_line_error(source, "1 NaN/Inf", "in x", "row 2", f"element {3 * 8 + 5}")


def test_an_empty_x_is_refused(tmp_path):
    source = save(tmp_path, "npz", x=torch.ones(0, 1, 8, 8), y=torch.ones(0))
    one_line_error(source, "empty")


def test_a_big_endian_npz_is_read_or_refused_in_one_line(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.ones((3, 2), dtype=">f8"), y=np.ones(3, dtype=">f8"))
    try:
        data = load_dataset(str(path))
    except InputError as exc:  # refusing it is fine too, in one line naming the file
        assert "\n" not in str(exc) and repr(str(path)) in str(exc)
    else:
        assert data.x.dtype == torch.float32 and torch.equal(data.x, torch.ones(3, 2))


def test_2d_integer_x_float32_cannot_hold_is_flagged_for_the_builtin_models(tmp_path):
    x = torch.ones(3, 4, dtype=torch.int64)
    x[1, 2] = 2**60 + 1
    data = load_dataset(save(tmp_path, "npz", x=x, y=torch.ones(3)))
    assert data.x.dtype == torch.int64 and int(data.x[1, 2]) == 2**60 + 1
    assert "x, row 1, column 2" in data.unfit_for_float32


def test_nd_integer_x_float32_cannot_hold_is_flagged_for_the_builtin_models(tmp_path):
    x = torch.ones(3, 2, 2, dtype=torch.int64)
    x[1, 1, 0] = 2**60 + 1
    data = load_dataset(save(tmp_path, "npz", x=x, y=torch.ones(3)))
    assert data.x.dtype == torch.int64  # kept for a model of one's own
    assert "x, row 1, element 2" in data.unfit_for_float32


def test_float8_x_becomes_float32_exactly_and_a_sparse_array_is_one_line(tmp_path):
    x = torch.tensor([[0.75, 2.5, 0.75]] * 4).to(torch.float8_e4m3fn)
    path = tmp_path / "f8.pt"
    torch.save({"x": x, "y": torch.zeros(4)}, path)
    data = load_dataset(str(path))
    assert data.x.dtype == torch.float32 and data.x[0].tolist() == [0.75, 2.5, 0.75]
    torch.save({"x": torch.eye(4, 3).to_sparse(), "y": torch.zeros(4)}, path)
    with pytest.raises(InputError, match="'x' is sparse") as info:
        load_dataset(str(path))
    assert str(path) in str(info.value) and "\n" not in str(info.value)
