"""build-model: a small registry of models, initialised from an explicit seed."""

from __future__ import annotations

import dataclasses
import itertools
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

import torch
from torch import Tensor, nn

from tasks.errors import InputError
from tasks.keys import code_fingerprint
from tasks.rules import MODEL_ENTRY_POINTS
from tasks.stage import cache_entry, stage

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
}


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the architecture; weights travel separately."""

    name: str
    n_inputs: int
    n_outputs: int
    hidden: tuple[int, ...] = ()
    activation: str = "relu"


def _linear(spec: ModelSpec) -> nn.Module:
    return nn.Sequential(nn.Linear(spec.n_inputs, spec.n_outputs))  # the seed's module


def _mlp(spec: ModelSpec) -> nn.Module:
    sizes = (spec.n_inputs, *spec.hidden)
    layers: list[nn.Module] = []
    for fan_in, fan_out in itertools.pairwise(sizes):
        layers += [nn.Linear(fan_in, fan_out), ACTIVATIONS[spec.activation]()]
    layers.append(nn.Linear(sizes[-1], spec.n_outputs))
    return nn.Sequential(*layers)


MODELS: dict[str, Callable[[ModelSpec], nn.Module]] = {"linear": _linear, "mlp": _mlp}
_PLUGIN_INIT = threading.Lock()  # fork_rng is process-wide: one plugin model built at a time


def plugin_models() -> dict[str, Callable[[ModelSpec], nn.Module]]:
    """Models other packages register, e.g. in their pyproject.toml:

        [project.entry-points."trainflow.models"]
        convnet = "mypackage.models:build_convnet"   # build_convnet(spec: ModelSpec) -> nn.Module

    Only installed, named entry points are loaded — never an import path from a parameter.
    """
    return {
        ep.name: ep.load() for ep in entry_points(group=MODEL_ENTRY_POINTS) if ep.name not in MODELS
    }


def _builder(name: str) -> Callable[[ModelSpec], nn.Module]:
    if name in MODELS:
        return MODELS[name]
    plugins = plugin_models()
    if name not in plugins:
        known = ", ".join((*MODELS, *plugins))
        raise InputError(f"--model {name!r} is not a known model (known: {known})")
    return plugins[name]


def _seeded_plugin(name: str, spec: ModelSpec, seed: int) -> nn.Module:
    # A plugin initialises itself with torch's global RNG: seed a fork of it, so the weights
    # depend on `seed` alone and the caller's RNG is left as it was.
    with _PLUGIN_INIT, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _builder(name)(spec)


def instantiate(spec: ModelSpec, state: dict[str, Tensor] | None = None) -> nn.Module:
    """Build the architecture (no RNG use) and load `state` into it, if given."""
    if spec.name not in MODELS:  # a plugin may keep buffers that meta tensors would lose
        module = _seeded_plugin(spec.name, spec, 0)
    else:
        with torch.device("meta"):  # skips PyTorch's init, which draws from the global RNG
            module = MODELS[spec.name](spec)
        module = module.to_empty(device="cpu")
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
    return ModelSpec(**{**spec, "hidden": tuple(spec["hidden"])})


def initial_model(spec: ModelSpec, seed: int) -> InitialModel:
    if spec.name in MODELS:
        module = init_weights_(instantiate(spec), torch.Generator().manual_seed(seed))
    else:
        module = _seeded_plugin(spec.name, spec, seed)
    return InitialModel(spec, {k: v.detach().clone() for k, v in module.state_dict().items()})


def model_code(name: str) -> dict[str, Any] | None:
    """What a plugin model's key covers besides the spec: its distribution, version and code
    (an upgrade, or an edit of an editable install, builds other weights). None for ours,
    which the stage's own code fingerprint covers."""
    if name in MODELS:
        return None
    for ep in entry_points(group=MODEL_ENTRY_POINTS, name=name):
        builder = ep.load()
        package = builder.__module__.split(".")[0]
        dist = ep.dist
        return {
            "entry_point": ep.value,
            "distribution": dist.name if dist else None,
            "version": dist.version if dist else None,
            "code": code_fingerprint(builder, packages=(package,)),
        }
    return None  # unknown: initial_model reports it


def model_spec(
    name: str, n_inputs: int, n_outputs: int, hidden: tuple[int, ...], activation: str
) -> ModelSpec:
    if name == "linear":  # unused knobs stay out of the spec, and out of the cache key
        hidden, activation = (), "relu"
    return ModelSpec(name, n_inputs, n_outputs, tuple(hidden), activation)


@stage(name="build-model")
def build_model(
    name: str, n_inputs: int, n_outputs: int, hidden: tuple[int, ...], activation: str, seed: int
) -> InitialModel:
    spec = model_spec(name, n_inputs, n_outputs, hidden, activation)
    entry = cache_entry("build-model", initial_model, spec=spec, seed=seed, plugin=model_code(name))
    return entry.resolve(InitialModel, lambda: initial_model(spec, seed))
