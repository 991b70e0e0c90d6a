"""predict: a trained run's model applied to a table, batch by batch, cached like a stage.

A training run's folder holds everything scoring needs, as data: the weights
(`model.safetensors`) and architecture (`spec.json`) the model is rebuilt from by trainflow's
own code, the config it was trained with (`config.json`: the loss says how outputs become
predictions, the data recipe says what 'synthetic' means) and its column schema
(`columns.json`: which columns, in which order, the model takes, and which are targets).

`model.pt2` is never loaded here: `torch.export.load` unpickles parts of an archive and hands
its shape expressions to sympy's `eval`, so whoever can write a run folder or the cache (whose
export-graph entry becomes `model.pt2`) could make it run code. The rebuilt model computes
what a genuine `model.pt2` does, from files that can change the numbers but run nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from torch import Tensor, nn

from trainflow.tasks.cache.stage import (
    cache_enabled,
    cache_entry,
    cache_mode,
    recording_stages,
    stage,
    using_cache,
)
from trainflow.tasks.cache.store import CacheStore
from trainflow.tasks.data.sources import DataFile, Identity
from trainflow.tasks.data.tables import TABLE_FORMATS
from trainflow.tasks.data.tensors import check_format, read_file, synthetic, table_row_blocks
from trainflow.tasks.data.writers import output_location, write_output
from trainflow.tasks.device import resolve_device
from trainflow.tasks.engine.losses import make_loss
from trainflow.tasks.engine.metrics import ValMetrics
from trainflow.tasks.engine.models import model_code
from trainflow.tasks.errors import InputError
from trainflow.tasks.names import SYNTHETIC
from trainflow.tasks.runs.finder import (
    ModelRun,
    find_run,
    flow_run_id,
    read_run,
    rebuilt_model,
    recorded_run,
)
from trainflow.tasks.runs.folder import (
    StageRecord,
    stage_table,
)


@dataclass(frozen=True)
class Scores:
    """The program's raw outputs for every input row, and the metrics if targets were given."""

    outputs: Tensor
    metrics: dict[str, float]
    cache_key: str = field(default="", compare=False)

    def to_cache(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return {"outputs": self.outputs}, {"metrics": self.metrics}

    @classmethod
    def from_cache(cls, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Scores:
        return cls(tensors["outputs"], dict(meta["metrics"]))

    def __len__(self) -> int:
        return self.outputs.shape[0]


# --- scoring ----------------------------------------------------------------------------------


ROWS_PER_BLOCK = 1 << 18  # rows read at a time: a table larger than memory streams through


def row_blocks(
    file: DataFile | None, run: ModelRun, rows_per_block: int = ROWS_PER_BLOCK
) -> Iterator[tuple[Tensor, Tensor | None]]:
    """The feature columns the model takes, in its order, and the targets if the data has them,
    a block of rows at a time: a table (CSV, Parquet, Feather) is never read whole.

    `file` None means 'synthetic', by the recipe the run was trained with."""
    if file is None:
        cfg = run.config
        data = synthetic(cfg["n_samples"], cfg["data_seed"], cfg["noise"])
        if data.feature_names != run.features:
            raise InputError(
                f"--data synthetic: the model takes {', '.join(run.features)}, "
                f"synthetic data has {', '.join(data.feature_names)}"
            )
        yield data.x, data.y
        return
    if check_format(file.url, ()) in TABLE_FORMATS:
        with file.open() as f:
            # By name, text through the training vocabulary: an unseen value is UNKNOWN.
            yield from table_row_blocks(
                f, file.url, run.features, run.targets, run.categories, rows_per_block
            )
        return
    data = read_file(file)  # .npz and .pt hold arrays 'x' and 'y', as in training: whole
    if data.n_features != len(run.features):
        raise InputError(
            f"data file {file.url!r}: x has {data.n_features} columns, the model takes "
            f"{len(run.features)} ({', '.join(run.features)})"
        )
    yield data.x, data.y


def apply_model(
    module: nn.Module, blocks: Iterable[Tensor], batch_size: int, device: str
) -> Tensor:
    """The model on every row of the blocks, in calls of exactly `batch_size` rows (the last
    one fewer) whatever the blocks' sizes: the batches, and so the rounding, of one whole
    tensor. Outputs on the CPU."""
    target = resolve_device(device)
    module = module.to(target)
    outputs, pending = [], torch.empty(0)
    with torch.no_grad():
        for block in blocks:
            x = torch.cat([pending, block]) if len(pending) else block
            whole = len(x) - len(x) % batch_size
            for start in range(0, whole, batch_size):
                outputs.append(module(x[start : start + batch_size].to(target)).cpu())
            pending = x[whole:]
        if len(pending):
            outputs.append(module(pending.to(target)).cpu())
    return torch.cat(outputs)


def metrics(outputs: Tensor, y: Tensor, loss: str) -> dict[str, float]:
    """How well the outputs fit the targets: the training loss, and training's validation
    metrics (tasks/engine/metrics.py) under their plain names: accuracy, f1, auroc or mae, r2."""
    chosen = ValMetrics(loss, y, outputs.shape[1])
    named = chosen.measure(outputs)
    return {
        "loss": float(make_loss(loss)(outputs, y)),
        **{name.removeprefix("val_"): value for name, value in named.items()},
    }


def score_rows(
    run: ModelRun,
    file: DataFile | None,
    batch_size: int,
    device: str,
    rows_per_block: int = ROWS_PER_BLOCK,
) -> Scores:
    """Outputs for every row; what stays in memory is the outputs and the targets, not the
    features (README: "Batch prediction", its limit)."""
    targets: list[Tensor] = []
    source = file.url if file is not None else SYNTHETIC

    def features() -> Iterator[Tensor]:
        first_row = 0
        for x, y in row_blocks(file, run, rows_per_block):
            check_finite(x, y, run, source, first_row)
            if y is not None:
                targets.append(y)
            first_row += len(x)
            yield x

    outputs = apply_model(rebuilt_model(run), features(), batch_size, device)
    y = torch.cat(targets) if targets else None
    return Scores(outputs, metrics(outputs, y, run.loss) if y is not None else {})


def check_finite(x: Tensor, y: Tensor | None, run: ModelRun, source: str, first_row: int) -> None:
    """Training refuses a NaN or Inf cell (tasks/data/tensors.py), so predict does too, by the
    column
    and row (from 0, as the output's `row`): the model never saw one, and a `nan` prediction
    would be written and cached as if it were a score. A category id is never one: a missing
    or unseen text is id 0, unknown."""
    categorical = {i for i, name in enumerate(run.features) if name in run.categories}
    for values, names, skip in ((x, run.features, categorical), (y, run.targets, set())):
        if values is None:
            continue
        bad = ~np.isfinite(values.numpy())
        if skip:
            bad[:, sorted(skip)] = False
        if bad.any():
            row, column = (int(i) for i in np.argwhere(bad)[0])
            raise InputError(
                f"data file {source!r}: a NaN/Inf value in column {names[column]!r}, "
                f"row {first_row + row} (from 0); training refuses these too"
            )


def prediction_columns(scores: Scores, run: ModelRun, first_row: int = 0) -> dict[str, np.ndarray]:
    """`row`, then `prediction` (one per target, `prediction_<target>`, when several), then
    for classification `prob_<class>` per class. `scores` may be a block of rows starting at
    input row `first_row`."""
    out = scores.outputs.double()
    n = out.shape[0]
    columns: dict[str, np.ndarray] = {"row": np.arange(first_row, first_row + n, dtype=np.int64)}
    if run.loss == "cross_entropy":
        probs = torch.softmax(out, dim=1)
        columns[_name("prediction", run.targets, 0)] = probs.argmax(1).numpy()
        columns |= {f"prob_{c}": probs[:, c].numpy() for c in range(probs.shape[1])}
    elif run.loss == "bce_with_logits":
        p = torch.sigmoid(out)
        for i, target in enumerate(run.targets):
            columns[_name("prediction", run.targets, i)] = (p[:, i] > 0.5).long().numpy()
            if len(run.targets) == 1:
                columns |= {"prob_0": (1 - p[:, 0]).numpy(), "prob_1": p[:, 0].numpy()}
            else:
                columns[f"prob_{target}"] = p[:, i].numpy()
    else:
        for i in range(out.shape[1]):
            columns[_name("prediction", run.targets, i)] = out[:, i].numpy()
    return columns


def _name(prefix: str, targets: tuple[str, ...], i: int) -> str:
    return prefix if len(targets) <= 1 else f"{prefix}_{targets[i]}"


def prediction_blocks(
    scores: Scores, run: ModelRun, rows_per_block: int = ROWS_PER_BLOCK
) -> Iterator[dict[str, np.ndarray]]:
    """The output's columns a block of rows at a time: the float64 columns of a whole large
    output never sit in memory at once."""
    for start in range(0, len(scores), rows_per_block):
        block = Scores(scores.outputs[start : start + rows_per_block], {})
        yield prediction_columns(block, run, first_row=start)


# --- Prefect tasks ----------------------------------------------------------------------------


@task(name="find-model")
def find_model(model: str, runs_dir: str) -> ModelRun:
    run_id = flow_run_id(model)
    return recorded_run(run_id) if run_id is not None else read_run(find_run(model, runs_dir))


@stage(name="score")
def score(
    run: ModelRun, source: str | None, identity: Identity, batch_size: int, device: str
) -> Scores:
    """Keyed by the weights' bytes, the architecture and the data's content: the same model on
    the same data never scores twice. `batch_size` is in the key: a matmul may round
    differently per batch.

    `source` None: the data the run was trained on."""
    source = source or run.data
    device_type = resolve_device(device).type
    if source == SYNTHETIC:
        recipe = {k: run.config[k] for k in ("n_samples", "data_seed", "noise")}
        entry = cache_entry(
            "score",
            score_rows,
            weights=run.weights_digest,
            model=run.schema,
            plugin=model_code(run.spec.name),
            data=recipe,
            batch_size=batch_size,
            device=device_type,
        )
        return entry.resolve(Scores, lambda: score_rows(run, None, batch_size, device))
    check_format(source, ())
    with DataFile(source) as file:  # a remote file is fetched once, for the key and the rows
        data = file.identity(identity) if cache_enabled() else None
        entry = cache_entry(
            "score",
            score_rows,
            weights=run.weights_digest,
            model=run.schema,
            plugin=model_code(run.spec.name),
            data=data,
            batch_size=batch_size,
            device=device_type,
        )
        return entry.resolve(Scores, lambda: score_rows(run, file, batch_size, device))


@task(name="write-predictions")
def write_predictions(scores: Scores, run: ModelRun, out: str) -> str:
    write_output(out, prediction_blocks(scores, run))
    return out


def output_url(run: ModelRun, out: str | None) -> str:
    """Where the predictions go (default: the run folder's predictions.csv), checked before
    anything is scored: a place that can't keep the file is refused."""
    url = out or str(Path(run.folder) / "predictions.csv")
    output_location(url)
    return url


def publish(scores: Scores, run: ModelRun, out: str, seconds: float) -> None:
    lines = [
        "## Batch prediction\n",
        "| | |",
        "|---|---|",
        f"| rows scored | {len(scores):,} |",
        f"| seconds | {seconds:.2f} |",
        f"| model run | `{run.folder}` |",
        f"| output | `{out}` |",
        *(f"| {name} | {value:.6g} |" for name, value in scores.metrics.items()),
    ]
    create_markdown_artifact(
        key="predict-summary",
        markdown="\n".join(lines),
        description="What was scored, and how well",
    )
    link = out if "://" in out else Path(out).absolute().as_uri()
    create_link_artifact(key="predict-output", link=link, link_text=out)


@dataclass
class PredictSummary:
    rows: int
    run_dir: str
    out: str
    metrics: dict[str, float]
    seconds: float
    stages: list[StageRecord] = field(default_factory=list)

    def stage_table(self) -> str:
        return stage_table([dataclasses.asdict(record) for record in self.stages])


@contextmanager
def stage_log() -> Iterator[list[StageRecord]]:
    """The stages a predict run ran, for the terminal's table."""
    stages: list[StageRecord] = []
    with recording_stages(lambda *record: stages.append(StageRecord(*record))):
        yield stages


@contextmanager
def scoring_cache(
    cache_dir: str | None, run: ModelRun, no_cache: bool, refresh_cache: bool
) -> Iterator[None]:
    """The cache a predict run reads and writes: `--cache-dir`, else the training run's own."""
    mode = cache_mode(no_cache, refresh_cache)
    url = CacheStore(cache_dir or run.cache).url
    with using_cache(url if mode != "off" else "", mode):
        yield
