"""build-model: the initial model, from its spec and an explicit seed (tasks/engine/models.py)."""

from __future__ import annotations

from trainflow.tasks.cache.stage import cache_entry, stage
from trainflow.tasks.data.splits import Split
from trainflow.tasks.data.tensors import Dataset
from trainflow.tasks.engine.models import InitialModel, initial_model, model_code, model_spec
from trainflow.tasks.errors import InputError


@stage(name="build-model")
def build_model(
    name: str,
    n_inputs: int,
    n_outputs: int,
    hidden: tuple[int, ...],
    activation: str,
    seed: int,
    standardize: bool = False,
    data: Dataset | None = None,
    parts: Split | None = None,
    categories: tuple[tuple[int, int], ...] = (),
    input_shape: tuple[int, ...] = (),
    input_dtype: str = "float32",
    n_classes: int = 0,
) -> InitialModel:
    """`data` and `parts` matter only with `standardize` (its statistics come from the
    training rows), and only then are they part of the key. `categories`: the data's
    categorical columns (Dataset.category_slots), one-hot encoded inside the model.
    `input_shape`, `input_dtype`: one sample as stored; `n_classes`: of int64 class ids."""
    spec = model_spec(
        name,
        n_inputs,
        n_outputs,
        hidden,
        activation,
        standardize,
        categories,
        input_shape,
        input_dtype,
        n_classes,
    )
    if spec.builtin and data is not None and data.unfit_for_float32:
        raise InputError(
            f"{data.unfit_for_float32}; the built-in models compute in float32 (a model of "
            "your own may take the integers as they are)"
        )
    rows = (data, parts) if standardize else None
    entry = cache_entry(
        "build-model", initial_model, spec=spec, seed=seed, plugin=model_code(name), rows=rows
    )

    def build() -> InitialModel:
        if not standardize:
            return initial_model(spec, seed)
        if data is None or parts is None:
            raise ValueError("standardize needs the data and its split")
        return initial_model(spec, seed, data.x[parts.train])

    return entry.resolve(InitialModel, build)
