"""build-model: the initial model, from its spec and an explicit seed (tasks/engine/models.py)."""

from __future__ import annotations

from trainflow.tasks.cache.stage import cache_entry, stage
from trainflow.tasks.data.splits import Split
from trainflow.tasks.data.tensors import Dataset
from trainflow.tasks.engine.models import InitialModel, initial_model, model_code, model_spec


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
) -> InitialModel:
    """`data` and `parts` matter only with `standardize` (its statistics come from the
    training rows), and only then are they part of the key. `categories`: the data's
    categorical columns (Dataset.category_slots), one-hot encoded inside the model."""
    spec = model_spec(name, n_inputs, n_outputs, hidden, activation, standardize, categories)
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
