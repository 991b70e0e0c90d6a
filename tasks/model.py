"""build-model: a small registry of models, initialised from an explicit seed."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from prefect import task
from torch import Tensor, nn

from tasks.cache import StageCache, cacheable

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


def instantiate(spec: ModelSpec, state: dict[str, Tensor] | None = None) -> nn.Module:
    """Build the architecture (no RNG use) and load `state` into it, if given."""
    with torch.device("meta"):  # skips PyTorch's own init, which would draw from the global RNG
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


@cacheable
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
    if spec.name not in MODELS:
        raise ValueError(f"unknown model {spec.name!r}; known: {', '.join(MODELS)}")
    module = init_weights_(instantiate(spec), torch.Generator().manual_seed(seed))
    return InitialModel(spec, {k: v.detach().clone() for k, v in module.state_dict().items()})


def model_identity(inputs: dict[str, Any]) -> dict[str, Any]:
    return dataclasses.asdict(_spec(**{k: v for k, v in inputs.items() if k != "seed"})) | {
        "seed": inputs["seed"]
    }


def _spec(
    name: str, n_inputs: int, n_outputs: int, hidden: tuple[int, ...], activation: str
) -> ModelSpec:
    if name != "mlp":  # unused knobs stay out of the spec, and out of the cache key
        hidden, activation = (), "relu"
    return ModelSpec(name, n_inputs, n_outputs, tuple(hidden), activation)


@task(name="build-model", cache_policy=StageCache(identity=model_identity))
def build_model(
    name: str, n_inputs: int, n_outputs: int, hidden: tuple[int, ...], activation: str, seed: int
) -> InitialModel:
    return initial_model(_spec(name, n_inputs, n_outputs, hidden, activation), seed)
