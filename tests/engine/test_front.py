"""The model's front layers (tasks/engine/models.py): the stored dtype cast on the device, a
flatten for a built-in model on N-d samples, standardization, and the seed's module untouched."""

import dataclasses
import json
import sys
import uuid
from pathlib import Path

import pytest
import torch
from torch import nn

import trainflow.tasks.cache.code_keys
from trainflow.tasks.build_model import build_model
from trainflow.tasks.data.splits import Split
from trainflow.tasks.data.tensors import Dataset
from trainflow.tasks.engine.models import (
    InputCast,
    Standardize,
    front_layers,
    initial_model,
    instantiate,
    model_spec,
    spec_from_json,
)
from trainflow.tasks.export_graph import export_program

PREFIX = "tffront_"

USER_MODELS = """
import math

import torch
from torch import nn

SEEN = []  # (dtype, one sample's shape) of every batch the models get


class Tokens(nn.Module):
    def __init__(self, spec):
        super().__init__()
        self.embed = nn.Embedding(50, 4)
        self.out = nn.Linear(4 * spec.n_inputs, spec.n_outputs)

    def forward(self, x):
        SEEN.append((x.dtype, tuple(x.shape[1:])))
        return self.out(self.embed(x).flatten(1))


class Images(nn.Module):
    def __init__(self, spec):
        super().__init__()
        self.out = nn.Linear(math.prod(spec.sample_shape), spec.n_outputs)

    def forward(self, x):
        SEEN.append((x.dtype, tuple(x.shape[1:])))
        return self.out(x.flatten(1))


def tokens(spec):
    return Tokens(spec)


def images(spec):
    return Images(spec)
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A project (the working folder) that registers the models 'tokens' and 'images'; the
    module of the user's models is returned once loaded, through `seen()`."""
    module = f"{PREFIX}{uuid.uuid4().hex[:10]}"
    (tmp_path / f"{module}.py").write_text(USER_MODELS)
    (tmp_path / "trainflow.toml").write_text(
        f'[models]\ntokens = "{module}:tokens"\nimages = "{module}:images"\n'
    )
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(trainflow.tasks.cache.code_keys, "_plugins", set())
    yield lambda: sys.modules[module].SEEN
    for name in [name for name in sys.modules if name.startswith(PREFIX)]:
        del sys.modules[name]


def uint8_images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8)


def image_spec(name="linear", hidden=(), n_outputs=3, dtype="uint8", **kw):
    return model_spec(
        name, 64, n_outputs, hidden, "tanh", input_shape=(1, 8, 8), input_dtype=dtype, **kw
    )


# --- built-in models on images -------------------------------------------------------------------


def test_uint8_images_reach_linear_as_float32_scaled_and_flattened():
    spec = image_spec()
    assert [name for name, _ in front_layers(spec)] == ["input", "flatten"]
    initial = initial_model(spec, seed=0)
    assert list(initial.state) == ["0.weight", "0.bias"]  # the front layers have no weights
    model = instantiate(spec, initial.state)
    reference = nn.Linear(64, 3)
    reference.load_state_dict(
        {"weight": initial.state["0.weight"], "bias": initial.state["0.bias"]}
    )
    x = uint8_images(5)
    with torch.no_grad():
        out, expected = model(x), reference(x.float().flatten(1) / 255)
    assert out.dtype == torch.float32 and out.shape == (5, 3)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_uint8_images_reach_mlp_as_float32_scaled_and_flattened():
    spec = image_spec("mlp", (8,), 2)
    initial = initial_model(spec, seed=1)
    reference = nn.Sequential(nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 2))
    reference.load_state_dict(initial.state)  # the mlp's own keys, "0.weight", …, "2.bias"
    x = uint8_images(4)
    with torch.no_grad():
        out = instantiate(spec, initial.state)(x)
        expected = reference(x.float().flatten(1) / 255)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_the_linear_weights_on_images_equal_a_plain_linear_of_the_same_width():
    # The front layers draw nothing: the seeded weights are those of a 64-input table.
    images = initial_model(image_spec(), seed=7).state
    table = initial_model(model_spec("linear", 64, 3, (), "relu"), seed=7).state
    assert images.keys() == table.keys()
    assert all(torch.equal(images[k], table[k]) for k in table)


@pytest.mark.parametrize("name", ["linear", "mlp"])
def test_the_seeds_float32_columns_have_no_front_layers(name):
    spec = model_spec(name, 1, 1, (4,), "relu", input_shape=(1,), input_dtype="float32")
    assert spec.input_shape == () and spec == model_spec(name, 1, 1, (4,), "relu")
    assert front_layers(spec) == []
    model = instantiate(spec, initial_model(spec, 0).state)
    assert type(model) is nn.Sequential
    assert not any(isinstance(m, (InputCast, nn.Flatten, Standardize)) for m in model.modules())
    if name == "linear":
        assert list(model.state_dict()) == ["0.weight", "0.bias"]


@pytest.mark.parametrize("dtype", ["int64", "int32", "int16", "int8"])
def test_integer_ids_reach_a_builtin_model_as_float32_values_unscaled(dtype):
    spec = model_spec("linear", 5, 1, (), "relu", input_shape=(5,), input_dtype=dtype)
    assert spec.compute_dtype == torch.float32
    (name, cast), *_ = front_layers(spec)
    assert name == "input" and cast.to_dtype == torch.float32 and not cast.scale
    initial = initial_model(spec, seed=0)
    x = torch.tensor([[1, 2, 3, 4, 5], [0, 0, 0, 0, 100]]).to(getattr(torch, dtype))
    with torch.no_grad():
        out = instantiate(spec, initial.state)(x)
        expected = x.float() @ initial.state["0.weight"].T + initial.state["0.bias"]
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_reaches_a_builtin_model_as_float32_unscaled(dtype):
    spec = model_spec("linear", 2, 1, (), "relu", input_shape=(2,), input_dtype=dtype)
    x = torch.tensor([[200.0, 3.0]]).to(getattr(torch, dtype))
    (_, cast), *_ = front_layers(spec)
    assert torch.equal(cast(x), torch.tensor([[200.0, 3.0]]))


def test_input_cast_scales_uint8_only():
    x = torch.tensor([[0, 51, 255]], dtype=torch.uint8)
    assert torch.equal(InputCast(torch.float32, scale=True)(x), x.float() / 255)
    assert torch.equal(InputCast(torch.float32, scale=False)(x), x.float())
    assert InputCast(torch.int64, scale=False)(x.to(torch.int32)).dtype == torch.int64


# --- a model of the user's own -------------------------------------------------------------------


def test_int64_ids_reach_the_users_model_as_int64(project):
    spec = model_spec("tokens", 6, 2, (), "relu", input_shape=(6,), input_dtype="int64")
    assert front_layers(spec) == []  # nothing to cast: the ids go in as stored
    initial = initial_model(spec, seed=0)
    model = instantiate(spec, initial.state)
    x = torch.randint(0, 50, (3, 6), generator=torch.Generator().manual_seed(0))
    out = model(x)
    assert out.shape == (3, 2) and project()[-1] == (torch.int64, (6,))


def test_narrower_int_ids_reach_the_users_model_as_int64(project):
    spec = model_spec("tokens", 4, 2, (), "relu", input_shape=(4,), input_dtype="int16")
    model = instantiate(spec, initial_model(spec, seed=0).state)
    model(torch.tensor([[1, 2, 3, 4]], dtype=torch.int16))
    assert project()[-1] == (torch.int64, (4,))


def test_uint8_images_reach_the_users_model_scaled_and_not_flattened(project):
    spec = model_spec("images", 64, 3, (), "relu", input_shape=(1, 8, 8), input_dtype="uint8")
    assert [name for name, _ in front_layers(spec)] == ["input"]
    initial = initial_model(spec, seed=0)
    model = instantiate(spec, initial.state)
    x = uint8_images(2)
    with torch.no_grad():
        out = model(x)
        w, b = initial.state["model.out.weight"], initial.state["model.out.bias"]
        expected = (x.float() / 255).flatten(1) @ w.T + b
    assert project()[-1] == (torch.float32, (1, 8, 8))
    torch.testing.assert_close(out, expected)


def test_the_users_model_is_seeded_by_the_seed_alone(project):
    spec = model_spec("tokens", 3, 2, (), "relu", input_shape=(3,), input_dtype="int64")
    torch.manual_seed(123)
    first = initial_model(spec, seed=4).state
    torch.manual_seed(999)
    second = initial_model(spec, seed=4).state
    other = initial_model(spec, seed=5).state
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["embed.weight"], other["embed.weight"])


def test_standardize_on_nd_data_keeps_per_element_statistics_of_the_training_rows(project):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 1, 4, 4, generator=g) * torch.arange(1, 17.0).view(1, 1, 4, 4)
    x[15:] += 100.0  # the validation rows: far off, so a leak would show
    data = Dataset(x, torch.zeros(20, 1), ("x",), ("y",))
    parts = Split(torch.arange(15), torch.arange(15, 20))
    initial = build_model.fn(
        name="images",
        n_inputs=16,
        n_outputs=1,
        hidden=(),
        activation="relu",
        seed=0,
        standardize=True,
        data=data,
        parts=parts,
        input_shape=(1, 4, 4),
        input_dtype="float32",
    )
    mean, std = initial.state["standardize.mean"], initial.state["standardize.std"]
    assert mean.shape == std.shape == (1, 4, 4)
    train = x[:15].double()
    torch.testing.assert_close(mean, train.mean(0).float())
    torch.testing.assert_close(std, train.std(0, correction=0).float())
    model = instantiate(initial.spec, initial.state)
    with torch.no_grad():
        model(x[:15])
    assert project()[-1] == (torch.float32, (1, 4, 4))  # standardized, still N-d


def test_standardize_on_uint8_images_is_of_the_scaled_pixels(project):
    x = uint8_images(10)
    spec = model_spec("images", 64, 1, (), "relu", True, input_shape=(1, 8, 8), input_dtype="uint8")
    state = initial_model(spec, seed=0, train_x=x[:8]).state
    torch.testing.assert_close(state["standardize.mean"], (x[:8].double() / 255).mean(0).float())


def test_standardize_for_a_builtin_model_on_images_is_per_flat_feature():
    x = uint8_images(10)
    spec = image_spec(standardize=True)
    state = initial_model(spec, seed=0, train_x=x).state
    assert state["standardize.mean"].shape == (64,)
    flat = x.double().flatten(1) / 255
    torch.testing.assert_close(state["standardize.mean"], flat.mean(0).float())


# --- export and spec.json ------------------------------------------------------------------------


def test_export_with_a_uint8_sample_runs_on_a_batch_of_another_size():
    spec = image_spec("mlp", (8,), 3)
    model = instantiate(spec, initial_model(spec, seed=0).state)
    program = export_program(model, uint8_images(4))
    x = uint8_images(7, seed=1)
    with torch.no_grad():
        out, expected = program.module()(x), model(x)
    assert out.shape == (7, 3)
    torch.testing.assert_close(out, expected)


def test_export_of_the_users_token_model_runs_on_another_batch_size(project):
    spec = model_spec("tokens", 6, 2, (), "relu", input_shape=(6,), input_dtype="int64")
    model = instantiate(spec, initial_model(spec, seed=0).state)
    g = torch.Generator().manual_seed(0)
    program = export_program(model, torch.randint(0, 50, (3, 6), generator=g))
    x = torch.randint(0, 50, (5, 6), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x))


def test_spec_json_round_trips_the_front_fields():
    spec = image_spec("mlp", (8, 4), 10, n_classes=10)
    back = spec_from_json(json.loads(json.dumps(dataclasses.asdict(spec))))
    assert back == spec and back.input_shape == (1, 8, 8) and back.input_dtype == "uint8"


def test_an_old_spec_json_without_the_front_fields_is_the_seeds():
    spec = model_spec("linear", 1, 1, (), "relu")
    new = ("input_shape", "input_dtype", "n_classes")
    old = {k: v for k, v in dataclasses.asdict(spec).items() if k not in new}
    assert spec_from_json(old) == spec


@pytest.mark.parametrize("dtype", ["load", "float64", "torch.uint8", "", "bool"])
def test_spec_json_with_an_unknown_input_dtype_is_refused(dtype):
    raw = dataclasses.asdict(image_spec())
    raw["input_dtype"] = dtype
    with pytest.raises(ValueError, match="input dtype"):
        spec_from_json(raw)
