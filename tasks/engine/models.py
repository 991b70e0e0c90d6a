"""The models by name (ours and installed plugins'), initialised from an explicit seed."""

from __future__ import annotations

import dataclasses
import itertools
import math
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import torch
from torch import Tensor, nn

from trainflow.tasks.cache.code_keys import code_fingerprint, plugin_loaded
from trainflow.tasks.engine.registered import load_registered, registered, registered_code
from trainflow.tasks.errors import InputError
from trainflow.tasks.names import ACTIVATIONS, MODEL_ENTRY_POINTS, STORED_X_DTYPES
from trainflow.tasks.project import Registered
from trainflow.tasks.rules import model_names

# The modules behind the activation names the config offers (tasks/names.py), in its order.
ACTIVATION_MODULES: dict[str, Callable[[], nn.Module]] = dict(
    zip(ACTIVATIONS, (nn.ReLU, nn.Tanh, nn.GELU, nn.SiLU), strict=True)
)


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the architecture; weights travel separately."""

    name: str
    n_inputs: int
    n_outputs: int
    hidden: tuple[int, ...] = ()
    activation: str = "relu"
    standardize: bool = False  # a Standardize module in front (its statistics are weights)
    # (input column, one-hot width) per categorical column: a OneHot module in front of all.
    categories: tuple[tuple[int, int], ...] = ()
    input_shape: tuple[int, ...] = ()  # one sample's shape as stored; () is (n_inputs,)
    input_dtype: str = "float32"  # x's dtype as stored (the cache's and the device's)
    n_classes: int = 0  # class ids 0…n_classes-1 in y (0: targets are values, not classes)

    @property
    def encoded_inputs(self) -> int:
        """The width after OneHot: each categorical column becomes its one-hot slots."""
        return self.n_inputs + sum(width - 1 for _, width in self.categories)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.input_shape or (self.n_inputs,)

    @property
    def builtin(self) -> bool:
        return self.name in MODELS

    @property
    def compute_dtype(self) -> torch.dtype:
        """What the model's own layers take: float32, or int64 ids for a user's model (an
        embedding's input); the built-in models take numbers, so float32 always."""
        stored = stored_dtype(self.input_dtype)
        if stored.is_floating_point or stored == torch.uint8 or self.builtin:
            return torch.float32
        return torch.int64


# The dtypes x may be stored in, by name as spec.json writes them.
INPUT_DTYPES = {name: getattr(torch, name) for name in STORED_X_DTYPES}


def stored_dtype(name: str) -> torch.dtype:
    if name not in INPUT_DTYPES:
        raise ValueError(f"input dtype {name!r} is not one of {', '.join(INPUT_DTYPES)}")
    return INPUT_DTYPES[name]


class InputCast(nn.Module):
    """The stored dtype to the one the model computes in, per batch, on the device: the cache
    and the device keep the compact form. uint8 is read as image pixels, scaled to [0, 1] as
    torchvision's ToTensor does; other integers keep their values (ids, or numbers a built-in
    model takes as float32)."""

    def __init__(self, to: torch.dtype, scale: bool):
        super().__init__()
        self.to_dtype, self.scale = to, scale

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(self.to_dtype)
        return x / 255 if self.scale else x


class Standardize(nn.Module):
    """(x - mean) / std per feature (per element of an N-d sample), the statistics as buffers:
    the saved weights carry them and the exported program takes raw rows."""

    def __init__(self, shape: int | tuple[int, ...]):
        super().__init__()
        self.register_buffer("mean", torch.zeros(shape))
        self.register_buffer("std", torch.ones(shape))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class OneHot(nn.Module):
    """Category ids (0: unknown, 1…: the vocabulary in columns.json) to one-hot slots in place
    of their columns; other columns pass through. An id outside the vocabulary, fractional or
    NaN lands in the unknown slot: the exported program takes any row and never fails on one.
    No weights: the slot counts are the spec's."""

    def __init__(self, n_inputs: int, categories: tuple[tuple[int, int], ...]):
        super().__init__()
        self.n_inputs = n_inputs
        self.widths = dict(categories)

    def forward(self, x: Tensor) -> Tensor:
        parts, start = [], 0
        for column, width in sorted(self.widths.items()):
            if column > start:
                parts.append(x[:, start:column])
            ids = x[:, column]
            known = (ids >= 1) & (ids < width) & (ids == torch.floor(ids))
            slot = torch.where(known, ids, torch.zeros_like(ids)).long()
            parts.append((slot.unsqueeze(1) == torch.arange(width, device=x.device)).to(x.dtype))
            start = column + 1
        if start < self.n_inputs:
            parts.append(x[:, start:])
        return torch.cat(parts, dim=1)


def feature_statistics(x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and population std per column (sklearn's StandardScaler), computed in float64; a
    constant column gets std 1, so it maps to 0 instead of dividing by zero."""
    x64 = x.double()
    mean = x64.mean(0)
    std = x64.std(0, correction=0)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return mean.to(x.dtype), std.to(x.dtype)


def front_layers(spec: ModelSpec) -> list[tuple[str, nn.Module]]:
    """The layers trainflow puts in front of a model, by what the data needs: the stored dtype
    cast, a flatten for a built-in model on N-d samples, the one-hot encoding, the
    standardization. None for the seed's float32 columns: its module is the seed's."""
    layers: list[tuple[str, nn.Module]] = []
    stored = stored_dtype(spec.input_dtype)
    if stored != spec.compute_dtype:
        layers.append(("input", InputCast(spec.compute_dtype, scale=stored == torch.uint8)))
    if spec.builtin and len(spec.sample_shape) > 1:
        layers.append(("flatten", nn.Flatten()))
    if spec.categories:
        layers.append(("one_hot", OneHot(spec.n_inputs, spec.categories)))
    if spec.standardize:
        flat = spec.builtin or len(spec.sample_shape) == 1
        layers.append(
            ("standardize", Standardize(spec.encoded_inputs if flat else spec.sample_shape))
        )
    return layers


def assembled(spec: ModelSpec, module: nn.Module) -> nn.Module:
    """`module` behind its front layers; a Sequential's layers keep their names ("0.weight"…)."""
    front = front_layers(spec)
    if not front:
        return module
    layers = list(module.named_children()) if type(module) is nn.Sequential else [("model", module)]
    return nn.Sequential(OrderedDict([*front, *layers]))


def inner_spec(spec: ModelSpec) -> ModelSpec:
    """What the model behind the front layers sees: numbers only, the encoded width; a built-in
    model, a flat sample."""
    if spec.categories:
        return dataclasses.replace(spec, n_inputs=spec.encoded_inputs, categories=())
    if spec.builtin and len(spec.sample_shape) > 1:
        return dataclasses.replace(spec, input_shape=(spec.n_inputs,))
    return spec


def _linear(spec: ModelSpec) -> nn.Module:
    return nn.Sequential(nn.Linear(spec.n_inputs, spec.n_outputs))  # the seed's module


def _mlp(spec: ModelSpec) -> nn.Module:
    sizes = (spec.n_inputs, *spec.hidden)
    layers: list[nn.Module] = []
    for fan_in, fan_out in itertools.pairwise(sizes):
        layers += [nn.Linear(fan_in, fan_out), ACTIVATION_MODULES[spec.activation]()]
    layers.append(nn.Linear(sizes[-1], spec.n_outputs))
    return nn.Sequential(*layers)


MODELS: dict[str, Callable[[ModelSpec], nn.Module]] = {"linear": _linear, "mlp": _mlp}
_PLUGIN_INIT = threading.Lock()  # fork_rng is process-wide: one plugin model built at a time


def plugin_entry_point(name: str) -> EntryPoint:
    """The one installed entry point of model `name`, as other packages register it, e.g. in
    their pyproject.toml:

        [project.entry-points."trainflow.models"]
        convnet = "mypackage.models:build_convnet"   # build_convnet(spec: ModelSpec) -> nn.Module

    Only installed, named entry points are loaded — never an import path from a parameter —
    and only the one chosen: another plugin's import could change what torch computes, and its
    code is in no key. A name two packages register is refused: which one would run is the
    import system's choice, and the key must name the one that does.
    """
    found = {ep.value: ep for ep in entry_points(group=MODEL_ENTRY_POINTS, name=name)}
    if not found:
        known = ", ".join(model_names())
        raise InputError(
            f"--model {name!r} is not a known model (known: {known}); a project's own model "
            "is found from the folder of the project that registers it"
        )
    if len(found) > 1:
        which = ", ".join(
            f"{ep.value} ({ep.dist.name if ep.dist else 'no distribution'})"
            for ep in found.values()
        )
        raise InputError(f"--model {name!r} is registered by more than one package: {which}")
    return next(iter(found.values()))


def load_model_code(name: str) -> Callable[[ModelSpec], nn.Module]:
    """The builder of model `name`: ours, the project's, or the one plugin that registers it,
    imported."""
    if name in MODELS:
        return MODELS[name]
    if (item := _project_model(name)) is not None:
        return load_registered(item)
    return _load(plugin_entry_point(name))


def _project_model(name: str) -> Registered | None:
    """The project's model `name`; refused if an installed package registers it too (the key
    must name the one that runs)."""
    item = registered("models", name)
    if item is not None and (others := entry_points(group=MODEL_ENTRY_POINTS, name=name)):
        which = ", ".join(ep.value for ep in others)
        raise InputError(f"--model {name!r} is registered by {item.file} and by a package: {which}")
    return item


def _load(ep: EntryPoint) -> Callable[[ModelSpec], nn.Module]:
    builder = ep.load()
    plugin_loaded(ep.module)  # every key made from now on covers it
    return builder


def _seeded_plugin(name: str, spec: ModelSpec, seed: int) -> nn.Module:
    # A plugin initialises itself with torch's global RNG: seed a fork of it, so the weights
    # depend on `seed` alone and the caller's RNG is left as it was.
    with _PLUGIN_INIT, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return load_model_code(name)(spec)


def instantiate(spec: ModelSpec, state: dict[str, Tensor] | None = None) -> nn.Module:
    """Build the architecture (no RNG use) and load `state` into it, if given."""
    inner = inner_spec(spec)
    if spec.name not in MODELS:  # a plugin may keep buffers that meta tensors would lose
        module = _seeded_plugin(spec.name, inner, 0)
    else:
        with torch.device("meta"):  # skips PyTorch's init, which draws from the global RNG
            module = MODELS[spec.name](inner)
        module = module.to_empty(device="cpu")
    module = assembled(spec, module)
    if state is not None:
        module.load_state_dict(state)
    return module


def init_weights_(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """nn.Linear.reset_parameters, draw for draw, but from `generator`.

    Layers are visited in construction order, weight before bias, so the result equals
    torch.manual_seed(seed) followed by building the module normally.
    """
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
            if layer.bias is not None:
                bound = 1 / math.sqrt(layer.in_features) if layer.in_features > 0 else 0
                nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
        elif any(True for _ in layer.parameters(recurse=False)):
            raise TypeError(f"no seeded initialiser for {type(layer).__name__}")
    return module


@dataclass(frozen=True)
class InitialModel:
    spec: ModelSpec
    state: dict[str, Tensor]
    cache_key: str = field(default="", compare=False)

    def to_cache(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return self.state, {"spec": dataclasses.asdict(self.spec)}

    @classmethod
    def from_cache(cls, tensors: dict[str, Tensor], meta: dict[str, Any]) -> InitialModel:
        return cls(spec_from_json(meta["spec"]), tensors)


def spec_from_json(spec: dict[str, Any]) -> ModelSpec:
    categories = tuple((int(column), int(width)) for column, width in spec["categories"])
    shape = tuple(int(size) for size in spec.get("input_shape", ()))
    stored_dtype(spec.get("input_dtype", "float32"))  # a name from the list, or ValueError
    return ModelSpec(
        **{**spec, "hidden": tuple(spec["hidden"]), "categories": categories, "input_shape": shape}
    )


def initial_model(spec: ModelSpec, seed: int, train_x: Tensor | None = None) -> InitialModel:
    """Seeded weights; with `spec.standardize`, the statistics of `train_x` (training rows
    only: nothing of the validation rows leaks into the model)."""
    if spec.name in MODELS:
        module = init_weights_(instantiate(spec), torch.Generator().manual_seed(seed))
    else:
        module = assembled(spec, _seeded_plugin(spec.name, inner_spec(spec), seed))
    if spec.standardize:
        if train_x is None:
            raise ValueError("standardize needs the training rows")
        # The statistics of what Standardize sees: cast, flat, one-hot slots, not raw ids.
        before = [layer for name, layer in front_layers(spec) if name != "standardize"]
        with torch.no_grad():
            rows = nn.Sequential(*before)(train_x)
        mean, std = feature_statistics(rows)
        module.standardize.mean.copy_(mean)
        module.standardize.std.copy_(std)
    return InitialModel(spec, {k: v.detach().clone() for k, v in module.state_dict().items()})


def model_code(name: str) -> dict[str, Any] | None:
    """What a plugin model's key covers besides the spec: its distribution, version and code
    (an upgrade, or an edit of an editable install, builds other weights). None for ours,
    which the stage's own code fingerprint covers."""
    if name in MODELS:
        return None
    if _project_model(name) is not None:
        return registered_code("models", name)
    ep = plugin_entry_point(name)
    dist = ep.dist
    return {
        "entry_point": ep.value,
        "distribution": dist.name if dist else None,
        "version": dist.version if dist else None,
        # The entry point's module and the builder's own (a builder may be defined elsewhere).
        "code": code_fingerprint(_load(ep), sys.modules[ep.module]),
    }


def model_spec(
    name: str,
    n_inputs: int,
    n_outputs: int,
    hidden: tuple[int, ...],
    activation: str,
    standardize: bool = False,
    categories: tuple[tuple[int, int], ...] = (),
    input_shape: tuple[int, ...] = (),
    input_dtype: str = "float32",
    n_classes: int = 0,
) -> ModelSpec:
    if name == "linear":  # unused knobs stay out of the spec, and out of the cache key
        hidden, activation = (), "relu"
    # A table's columns keep the spec they always had: () says (n_inputs,).
    shape = () if tuple(input_shape) == (n_inputs,) else tuple(input_shape)
    return ModelSpec(
        name,
        n_inputs,
        n_outputs,
        tuple(hidden),
        activation,
        standardize,
        tuple(categories),
        shape,
        input_dtype,
        n_classes,
    )
