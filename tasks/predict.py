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
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from torch import Tensor, nn

from trainflow.tasks.cache.stage import (
    StageEntry,
    cache_enabled,
    cache_entry,
    cache_mode,
    recording_stages,
    stage,
    using_cache,
)
from trainflow.tasks.cache.store import CacheStore
from trainflow.tasks.data.sources import DataFile, Identity

if TYPE_CHECKING:
    from trainflow.tasks.data.images import ImageFolder
from trainflow.tasks.data.tables import TABLE_FORMATS
from trainflow.tasks.data.tensors import (
    Dataset,
    check_format,
    is_image_folder,
    read_file,
    synthetic,
    table_row_blocks,
)
from trainflow.tasks.data.writers import output_location, write_output
from trainflow.tasks.device import resolve_device
from trainflow.tasks.engine.losses import ELEMENTWISE, make_loss
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
    files: tuple[str, ...] = ()  # an image folder's, per row: the file each row scores
    cache_key: str = field(default="", compare=False)

    def to_cache(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return {"outputs": self.outputs}, {"metrics": self.metrics, "files": list(self.files)}

    @classmethod
    def from_cache(cls, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Scores:
        return cls(tensors["outputs"], dict(meta["metrics"]), tuple(meta.get("files", ())))

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
    data = read_file(file)  # arrays 'x' and 'y', as in training: whole
    check_samples(data, run, f"data file {file.url!r}")
    yield data.x, data.y


def check_samples(data: Dataset, run: ModelRun, where: str) -> None:
    """The samples must be what the model was trained on: their shape, and their dtype (a
    uint8 image is scaled by 1/255 inside the model, a float one would not be)."""
    shape, dtype = run.spec.sample_shape, run.spec.input_dtype
    if run.spec.input_shape or data.x.ndim > 2:
        if data.input_shape != shape:
            raise InputError(
                f"{where}: x holds samples of shape {data.input_shape}, the model takes {shape}"
            )
    elif data.n_features != len(run.features):
        raise InputError(
            f"{where}: x has {data.n_features} columns, the model takes "
            f"{len(run.features)} ({', '.join(run.features)})"
        )
    if data.input_dtype != dtype and (dtype != "float32" or data.x.ndim > 2):
        raise InputError(f"{where}: x is {data.input_dtype}, the model was trained on {dtype}")


def scoring_folder(root: str, run: ModelRun) -> ImageFolder:
    """The images to score: class folders named as in training (they give targets), or images
    directly in the folder (scored without)."""
    from trainflow.tasks.data import images  # Pillow: for image folders only

    where = f"image folder {root!r}"
    if len(run.spec.sample_shape) != 3 or run.spec.input_dtype != "uint8":
        raise InputError(f"{where}: the model was not trained on images")
    entries = [entry for entry in os.scandir(root) if entry.name[0] != "."]
    flat = sorted(entry.name for entry in entries if entry.is_file())
    if flat and not any(entry.is_dir() for entry in entries):
        return images.ImageFolder(root, (), tuple((name, -1) for name in flat))
    folder = images.scan_image_folder(root)
    unknown = [name for name in folder.classes if name not in class_names(run)]
    if unknown:
        known = ", ".join(class_names(run)) or "none: it predicts values, not classes"
        raise InputError(
            f"{where}: class folder {unknown[0]!r} is not a class the model knows ({known})"
        )
    return folder


def check_class_ids(y: Tensor, n_classes: int, source: str) -> None:
    outside = ((y < 0) | (y >= n_classes)).nonzero()
    if len(outside):
        row = int(outside[0])
        raise InputError(
            f"data file {source!r}: y, row {row} is class {int(y[row])}, but the model knows "
            f"classes 0 to {n_classes - 1}"
        )


def class_names(run: ModelRun) -> tuple[str, ...]:
    """The model's class names: an image folder's, or else the ids themselves ("0", "1", …)."""
    return run.classes or tuple(str(i) for i in range(run.spec.n_classes))


def image_rows(
    folder: ImageFolder, run: ModelRun, digests: Mapping[str, str] | None = None
) -> tuple[Tensor, Tensor | None]:
    """The folder's images decoded as training decoded them, at the size the model takes, and
    their class ids in the model's numbering (None for images without a class folder)."""
    from trainflow.tasks.data import images

    channels, height, width = run.spec.sample_shape
    if channels not in (1, 3):
        raise InputError(f"image folder {folder.root!r}: the model takes {channels} channels")
    # As the model takes them: its size, and its channels (a colour image to luminance for a
    # grayscale model, a gray one repeated into R, G and B for a colour one).
    x, _ = images.decode_images(folder, (height, width), None, digests, channels)
    if not folder.classes:
        return x, None
    names = class_names(run)
    ids = [names.index(folder.classes[c]) for _, c in folder.files]
    return x, torch.tensor(ids, dtype=torch.int64)


def apply_model(
    module: nn.Module, blocks: Iterable[Tensor], batch_size: int, device: str
) -> Tensor:
    """The model on every row of the blocks, in calls of exactly `batch_size` rows (the last
    one fewer) whatever the blocks' sizes: the batches, and so the rounding, of one whole
    tensor. Outputs on the CPU."""
    target = resolve_device(device)
    module = module.to(target)
    outputs, pending = [], None
    with torch.no_grad():
        for block in blocks:
            # Rows left from the last block, in the block's own dtype (uint8 stays uint8).
            x = torch.cat([pending, block]) if pending is not None and len(pending) else block
            whole = len(x) - len(x) % batch_size
            for start in range(0, whole, batch_size):
                outputs.append(module(x[start : start + batch_size].to(target)).cpu())
            pending = x[whole:]
        if pending is not None and len(pending):
            outputs.append(module(pending.to(target)).cpu())
    return torch.cat(outputs)


def metrics(outputs: Tensor, y: Tensor, loss: str) -> dict[str, float]:
    """How well the outputs fit the targets: the training loss, and training's validation
    metrics (tasks/engine/metrics.py) under their plain names: accuracy, f1, auroc or mae, r2."""
    chosen = ValMetrics(loss, y, outputs.shape[1])
    named = chosen.measure(outputs)
    return {
        "loss": float(make_loss(loss, y.dtype)(outputs, y)),
        **{name.removeprefix("val_"): value for name, value in named.items()},
    }


def score_rows(
    run: ModelRun,
    file: DataFile | None,
    batch_size: int,
    device: str,
    rows_per_block: int = ROWS_PER_BLOCK,
    folder: ImageFolder | None = None,
    digests: Mapping[str, str] | None = None,
) -> Scores:
    """Outputs for every row; what stays in memory is the outputs and the targets, not the
    features (README: "Batch prediction", its limit). `folder`: an image folder instead."""
    targets: list[Tensor] = []
    source = file.url if file is not None else folder.root if folder else SYNTHETIC
    files: tuple[str, ...] = ()
    if folder is not None:
        blocks: Iterable[tuple[Tensor, Tensor | None]] = [image_rows(folder, run, digests)]
        files = tuple(relative for relative, _ in folder.files)
    else:
        blocks = row_blocks(file, run, rows_per_block)

    def features() -> Iterator[Tensor]:
        first_row = 0
        for x, y in blocks:
            check_finite(x, y, run, source, first_row)
            if y is not None:
                targets.append(y)
            first_row += len(x)
            yield x

    outputs = apply_model(rebuilt_model(run), features(), batch_size, device)
    y = torch.cat(targets) if targets else None
    if y is not None and y.dtype == torch.int64 and run.spec.n_classes:
        check_class_ids(y, run.spec.n_classes, source)
    return Scores(outputs, metrics(outputs, y, run.loss) if y is not None else {}, files)


def check_finite(x: Tensor, y: Tensor | None, run: ModelRun, source: str, first_row: int) -> None:
    """Training refuses a NaN or Inf cell (tasks/data/tensors.py), so predict does too, by the
    column
    and row (from 0, as the output's `row`): the model never saw one, and a `nan` prediction
    would be written and cached as if it were a score. A category id is never one: a missing
    or unseen text is id 0, unknown."""
    categorical = {i for i, name in enumerate(run.features) if name in run.categories}
    for values, names, skip in ((x, run.features, categorical), (y, run.targets, set())):
        if values is None or not values.is_floating_point():  # integers hold no NaN
            continue
        if values.dtype == torch.bfloat16:  # numpy has no bfloat16
            values = values.float()
        bad = ~np.isfinite(values.reshape(len(values), -1).numpy())
        if skip:
            bad[:, sorted(skip)] = False
        if bad.any():
            row, column = (int(i) for i in np.argwhere(bad)[0])
            where = f"column {names[column]!r}" if values.ndim <= 2 else f"element {column}"
            raise InputError(
                f"data file {source!r}: a NaN/Inf value in {where}, "
                f"row {first_row + row} (from 0); training refuses these too"
            )


def prediction_columns(scores: Scores, run: ModelRun, first_row: int = 0) -> dict[str, np.ndarray]:
    """`row`, then `prediction` (one per target, `prediction_<target>`, when several), then
    for classification `prob_<class>` per class. `scores` may be a block of rows starting at
    input row `first_row`."""
    out = scores.outputs.double()
    n = out.shape[0]
    columns: dict[str, np.ndarray] = {"row": np.arange(first_row, first_row + n, dtype=np.int64)}
    if scores.files:
        columns["file"] = np.array(scores.files[first_row : first_row + n], dtype=object)
    if run.loss == "cross_entropy" or (run.spec.n_classes and run.loss not in ELEMENTWISE):
        probs = torch.softmax(out, dim=1)
        predicted = probs.argmax(1).numpy()
        columns[_name("prediction", run.targets, 0)] = predicted
        if run.classes:  # the class names, as the image folder's folders named them
            columns["class"] = np.array(run.classes, dtype=object)[predicted]
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
        block = Scores(scores.outputs[start : start + rows_per_block], {}, scores.files)
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

    def entry(data: object) -> StageEntry:
        return cache_entry(
            "score",
            score_rows,
            weights=run.weights_digest,
            model=run.schema,
            plugin=model_code(run.spec.name),
            data=data,
            batch_size=batch_size,
            device=device_type,
        )

    if source == SYNTHETIC:
        recipe = {k: run.config[k] for k in ("n_samples", "data_seed", "noise")}
        return entry(recipe).resolve(Scores, lambda: score_rows(run, None, batch_size, device))
    if is_image_folder(source):
        from trainflow.tasks.data import images  # Pillow: for image folders only

        folder = scoring_folder(source, run)
        layout = images.folder_identity(folder) if cache_enabled() else None
        # Decoded from the bytes the key was made of, or refused (a file rewritten meanwhile).
        digests = {relative: digest for relative, _, digest in layout["files"]} if layout else None
        return entry(layout).resolve(
            Scores,
            lambda: score_rows(run, None, batch_size, device, folder=folder, digests=digests),
        )
    check_format(source, ())
    with DataFile(source) as file:  # a remote file is fetched once, for the key and the rows
        data = file.identity(identity) if cache_enabled() else None
        return entry(data).resolve(Scores, lambda: score_rows(run, file, batch_size, device))


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
