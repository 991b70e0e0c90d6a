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
import fcntl
import glob
import io
import json
import os
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import xxhash
from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from torch import Tensor, nn

from trainflow.tasks import files
from trainflow.tasks.cache.stage import (
    cache_enabled,
    cache_entry,
    cache_mode,
    recording_stages,
    stage,
    using_cache,
)
from trainflow.tasks.cache.store import CacheStore
from trainflow.tasks.data.sources import DataFile, Identity, suffix_of
from trainflow.tasks.data.tables import TABLE_FORMATS
from trainflow.tasks.data.tensors import check_format, read_file, synthetic, table_row_blocks
from trainflow.tasks.device import resolve_device
from trainflow.tasks.engine.losses import make_loss
from trainflow.tasks.engine.metrics import ValMetrics
from trainflow.tasks.engine.models import ModelSpec, instantiate, model_code, spec_from_json
from trainflow.tasks.errors import InputError, writing
from trainflow.tasks.export_graph import model_digest
from trainflow.tasks.names import SYNTHETIC
from trainflow.tasks.rules import DEFAULT_CACHE_DIR
from trainflow.tasks.runs.folder import (
    COLUMNS,
    CONFIG,
    LOCATIONS,
    METRICS,
    MODEL,
    PROGRAM,
    RUN_FOLDER_ARTIFACT,
    SPEC,
    StageRecord,
    stage_table,
)

FLOW_RUN = "prefect.flow-run."


@dataclass(frozen=True)
class ModelRun:
    """A finished training run, as scoring sees it."""

    folder: str
    features: tuple[str, ...]
    targets: tuple[str, ...]
    config: dict[str, Any]  # the training run's TrainConfig, as JSON
    spec: ModelSpec  # the architecture (spec.json)
    weights_digest: str  # of model.safetensors' bytes: what the cache keys the weights by
    # Per categorical feature, the training rows' vocabulary: a value's id is 1 + its index.
    categories: dict[str, tuple[str, ...]] = field(default_factory=dict, hash=False)
    model_digest: str = ""  # of the weights, spec, columns and loss (export.model_digest)
    # Predict's defaults: the data the run was trained on and its stage cache, as the run
    # resolved them (locations.json); a run trained before that file was written has only
    # config.json's, which may be relative to a folder predict can't know.
    data: str = SYNTHETIC
    cache: str = DEFAULT_CACHE_DIR

    @property
    def loss(self) -> str:
        return self.config["loss"]

    @property
    def schema(self) -> dict[str, Any]:
        """What besides the weights' bytes decides the scores: the architecture, which columns
        go in, in which order, how text becomes ids, and the loss the metrics are computed
        with."""
        schema = {"features": self.features, "targets": self.targets, "loss": self.loss}
        schema["spec"] = dataclasses.asdict(self.spec)
        return schema | ({"categories": self.categories} if self.categories else {})


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


# --- which model ------------------------------------------------------------------------------


def is_complete(folder: Path) -> bool:
    # export-graph writes metrics.json last: a folder without it is a run still going or failed.
    return all((folder / name).is_file() for name in (PROGRAM, CONFIG, COLUMNS, METRICS))


def latest_run(runs_dir: Path) -> Path:
    runs = (
        [f for f in runs_dir.iterdir() if f.is_dir() and is_complete(f)]
        if runs_dir.is_dir()
        else []
    )
    if not runs:
        raise InputError(f"--model latest: no completed run under {str(runs_dir)!r}")
    return max(runs, key=lambda f: ((f / METRICS).stat().st_mtime_ns, f.name))


@dataclass(frozen=True)
class Recorded:
    """What a `train` flow run recorded in its `run-folder` artifact."""

    folder: Path  # absolute
    model: str | None  # export.model_digest of what it exported there; None before recorded
    cache: str | None  # its stage cache, absolute


def flow_run_record(run_id: str) -> Recorded:
    """The run folder a `train` flow run wrote, as that run recorded it (absolute, in its
    `run-folder` artifact), asked of the Prefect server that ran it. Never resolved against
    this process's working directory: a relative `runs_dir` there names another folder."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
    )
    from prefect.client.schemas.sorting import ArtifactSort

    try:
        flow_run_id = uuid.UUID(run_id)
    except ValueError:
        raise InputError(f"--model {FLOW_RUN}{run_id}: not a flow run id") from None
    with get_client(sync_client=True) as client:
        try:
            flow_run = client.read_flow_run(flow_run_id)
        except Exception as exc:  # ObjectNotFound, or the server's own error
            raise InputError(f"--model {FLOW_RUN}{run_id}: no such flow run ({exc})") from None
        state = flow_run.state.type.value if flow_run.state else "unknown"
        if state != "COMPLETED":
            raise InputError(
                f"--model {FLOW_RUN}{run_id}: that training run is {state}, not COMPLETED"
            )
        # The newest: a retried flow run records its folder again, as the attempt that
        # completed saw it.
        records = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
                key=ArtifactFilterKey(any_=[RUN_FOLDER_ARTIFACT]),
            ),
            sort=ArtifactSort.CREATED_DESC,
            limit=1,
        )
    recorded = _recorded(records[0].data) if records else None
    if recorded is None:
        raise InputError(
            f"--model {FLOW_RUN}{run_id}: that run recorded no run folder (trained before "
            "trainflow recorded one); pass its folder as --model"
        )
    if not recorded.folder.is_dir():
        raise InputError(
            f"--model {FLOW_RUN}{run_id}: its run folder {str(recorded.folder)!r} is gone"
        )
    return recorded


def _recorded(data: Any) -> Recorded | None:
    """A `run-folder` artifact's table (JSON text, as the server keeps it), if it names an
    absolute folder."""
    try:
        rows = json.loads(data) if isinstance(data, str) else data
        row = rows[0]
        folder = Path(row["run_folder"])
        model, cache = row.get("model"), row.get("cache")
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None
    if not folder.is_absolute():
        return None
    return Recorded(
        folder,
        model if isinstance(model, str) else None,
        cache if isinstance(cache, str) else None,
    )


def recorded_run(run_id: str) -> ModelRun:
    """The model a `train` flow run exported, read from the folder it recorded, or refused if
    that folder now holds another (a later run of another config under the same name, or
    other files): an id names that run's model, never whatever the folder holds now. A
    cached or same-config re-run into the folder writes the same bytes, so it still
    resolves."""
    recorded = flow_run_record(run_id)
    named = f"--model {FLOW_RUN}{run_id}: its run folder {str(recorded.folder)!r}"
    if recorded.model is None:
        raise InputError(
            f"{named} has no recorded model digest (trained before trainflow recorded one); "
            "pass the folder as --model to score what it holds"
        )
    run = read_run(recorded.folder)
    if run.model_digest != recorded.model:
        raise InputError(
            f"{named} now holds another model than that run exported (trained again or "
            "changed since); pass the folder as --model to score what it holds"
        )
    # That run's own cache: a later same-config run into the folder may have named another.
    return dataclasses.replace(run, cache=recorded.cache or run.cache)


def flow_run_id(model: str) -> str | None:
    """The flow run id `--model` gives (`prefect.flow-run.<id>` or a bare UUID), if any."""
    run_id = model.removeprefix(FLOW_RUN)
    return run_id if model.startswith(FLOW_RUN) or _is_uuid(run_id) else None


def find_run(model: str, runs_dir: str) -> Path:
    """The run folder `--model` names: a folder, its model.pt2, or 'latest'."""
    if model == "latest":
        return latest_run(Path(runs_dir))
    path = Path(model)
    folder = path.parent if path.name == PROGRAM else path
    if not folder.is_dir():
        raise InputError(f"--model {model}: no such run folder")
    return folder


def _is_uuid(text: str) -> bool:
    try:
        return str(uuid.UUID(text)) == text.lower()
    except ValueError:
        return False


def read_run(folder: Path) -> ModelRun:
    """The run, checked: its JSON read, its model rebuilt once (so that a spec and weights
    that don't fit are refused here, before anything is scored or written)."""
    needed = (MODEL, SPEC, CONFIG, COLUMNS)
    missing = [name for name in needed if not (folder / name).is_file()]
    if missing == [SPEC]:
        raise InputError(
            f"--model {folder}: no {SPEC} (trained before trainflow wrote one); train the same "
            "config again to add it"
        )
    if missing:
        raise InputError(
            f"--model {folder}: not a finished training run (missing {', '.join(missing)})"
        )
    try:
        config = json.loads((folder / CONFIG).read_text())
        columns = json.loads((folder / COLUMNS).read_text())
        features, targets = tuple(columns["features"]), tuple(columns["targets"])
        categories = {
            name: tuple(str(value) for value in values)
            for name, values in columns.get("categories", {}).items()
        }
        if not isinstance(config.get("loss"), str):  # how outputs become predictions
            raise ValueError(f"{CONFIG} names no loss")
        spec_json = json.loads((folder / SPEC).read_text())
        spec = spec_from_json(spec_json)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InputError(
            f"--model {folder}: unreadable {CONFIG}, {COLUMNS} or {SPEC} ({exc})"
        ) from None
    data, cache = _locations(folder, config)
    weights = _read_weights(folder)
    weights_digest = xxhash.xxh3_128_hexdigest(weights)
    run = ModelRun(
        str(folder.absolute()),
        features,
        targets,
        config,
        spec,
        weights_digest,
        categories,
        model_digest(weights_digest, spec_json, columns, config["loss"]),
        data,
        cache,
    )
    rebuilt_model(run, weights)
    return run


def _locations(folder: Path, config: dict[str, Any]) -> tuple[str, str]:
    """The run's training data and stage cache as it resolved them (locations.json); a run
    trained before that file has config.json's, relative to predict's working folder."""
    try:
        text = (folder / LOCATIONS).read_text()
    except FileNotFoundError:
        return config.get("data", SYNTHETIC), config.get("cache_dir", DEFAULT_CACHE_DIR)
    except OSError as exc:
        raise InputError(f"--model {folder}: unreadable {LOCATIONS} ({exc.strerror})") from None
    try:
        locations = json.loads(text)
        data, cache = locations["data"], locations["cache"]
        if not (isinstance(data, str) and isinstance(cache, str) and data and cache):
            raise ValueError("data and cache must be non-empty strings")
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"--model {folder}: unreadable {LOCATIONS} ({exc})") from None
    return data, cache


def _read_weights(folder: Path) -> bytes:
    try:
        return (folder / MODEL).read_bytes()
    except OSError as exc:
        raise InputError(f"--model {folder}: unreadable {MODEL} ({exc.strerror})") from None


def rebuilt_model(run: ModelRun, weights: bytes | None = None) -> nn.Module:
    """The run's model from data alone: its architecture built by trainflow's own code (or an
    installed plugin's, by name, as in training) and its weights loaded from safetensors,
    which holds tensors and nothing that runs. In eval mode, as export-graph exported it.

    `weights` are model.safetensors' bytes as `run` was read with; read again, they must be
    the same bytes, or the cache would key one model's scores by another's digest."""
    folder = Path(run.folder)
    weights = _read_weights(folder) if weights is None else weights
    if xxhash.xxh3_128_hexdigest(weights) != run.weights_digest:
        raise InputError(f"--model {folder}: {MODEL} changed while predict was running")
    try:
        state = safetensors_load(weights)
    except SafetensorError as exc:
        raise InputError(f"--model {folder}: unreadable {MODEL} ({_one_line(exc)})") from None
    try:
        return instantiate(run.spec, state).eval()
    except InputError as exc:  # a model name no installed package provides
        raise InputError(f"--model {folder}: {SPEC}: {exc}") from None
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise InputError(
            f"--model {folder}: {MODEL} does not fit {SPEC} ({_one_line(exc)})"
        ) from None


def _one_line(exc: Exception, limit: int = 300) -> str:
    """An exception's message on one line (load_state_dict lists its mismatches a line each)."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    text = text or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


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
    metrics (tasks/metrics.py) under their plain names: accuracy, f1, auroc or mae, r2."""
    chosen = ValMetrics(loss, y, outputs.shape[1])
    named = chosen.finish(chosen.raw(outputs).cpu().numpy())
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
    """Training refuses a NaN or Inf cell (tasks/data.py), so predict does too, by the column
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


def write_blocks(f: BinaryIO, blocks: Iterable[dict[str, np.ndarray]], suffix: str) -> None:
    """The output file, block by block. CSV and Parquet by Arrow's C++ writers (`np.savetxt`
    formats a row at a time in Python and took ten times as long as scoring a 10⁶-row file);
    .npz is a zip of whole arrays, so it is built in memory."""
    blocks = iter(blocks)
    if suffix == ".npz":
        parts = list(blocks)
        np.savez(f, **{name: np.concatenate([p[name] for p in parts]) for name in parts[0]})
        return
    import pyarrow as pa  # only where a table is written: a cached training run never loads it

    first = pa.table(next(blocks))
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        writer: Any = pq.ParquetWriter(f, first.schema)
    else:
        import pyarrow.csv as pa_csv

        # Floats as the shortest text that reads back to the same float64 (what %.17g promised,
        # shorter); the header unquoted unless a name needs quotes, as a spreadsheet writes it.
        plain = all(not set(name) & set(',"\r\n') for name in first.column_names)
        options = pa_csv.WriteOptions(quoting_header="none" if plain else "needed")
        writer = pa_csv.CSVWriter(f, first.schema, write_options=options)
    with writer:
        writer.write_table(first)
        for block in blocks:
            writer.write_table(pa.table(block))


def output_bytes(columns: dict[str, np.ndarray], suffix: str) -> bytes:
    """One block's output file, in memory."""
    buffer = io.BytesIO()
    write_blocks(buffer, [columns], suffix)
    return buffer.getvalue()


def output_location(url: str) -> tuple[Any, str]:
    """`--out`'s filesystem and path, refused (before anything is scored) where the file could
    not be kept: a filesystem that lives in this process's memory is gone when predict exits."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url)
    except (ValueError, ImportError) as exc:  # an unknown protocol, or its package missing
        raise InputError(f"--out {url}: {exc}") from None
    if _in_process(fs):
        raise InputError(
            f"--out {url}: that filesystem keeps its files in this process's memory, gone when "
            "predict exits; write to a local path or a store that outlives the process"
        )
    return fs, path


def _in_process(fs: Any) -> bool:
    from fsspec.implementations.memory import MemoryFileSystem

    while fs is not None:  # a caching or folder wrapper keeps its files where its target does
        if isinstance(fs, MemoryFileSystem):
            return True
        fs = getattr(fs, "fs", None)
    return False


def _is_local(fs: Any) -> bool:
    return fs.protocol in ("file", "local") or "file" in fs.protocol


def write_output(url: str, blocks: Iterable[dict[str, np.ndarray]]) -> None:
    """Whole or not at all: a local file by atomic rename; an object store by one upload of a
    finished local file."""
    suffix = suffix_of(url)
    fs, path = output_location(url)
    with writing(f"the output {url!r}"):
        if _is_local(fs):
            files.make_dirs(Path(path).parent)
            remove_leftovers(Path(path))
            with held_temporary(Path(path)) as f:
                write_blocks(f, blocks, suffix)
        else:
            with tempfile.TemporaryDirectory() as scratch:
                local = Path(scratch) / f"predictions{suffix}"
                with local.open("wb") as f:
                    write_blocks(f, blocks, suffix)
                fs.put_file(str(local), path)


# A temporary output file, named `.<output>.<random>.predict.tmp` beside the output, is held
# under an advisory lock (flock) by its writer from creation to rename. The kernel drops the
# lock when the writer dies, however it dies (SIGKILL too), so a temporary file nobody holds is
# a dead writer's leftover, never a live one's, whatever its age and however many predicts
# write that output at once.
LEFTOVER_SUFFIX = ".predict.tmp"


@contextmanager
def held_temporary(path: Path) -> Iterator[BinaryIO]:
    """A file for `path`'s new bytes, renamed over `path` when the block ends (fsynced, then
    the folder too); an error removes it. Held under its lock until renamed."""
    while True:
        fd, name = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.", suffix=LEFTOVER_SUFFIX
        )
        fcntl.flock(fd, fcntl.LOCK_EX)
        # remove_leftovers may have taken it for a dead writer's between mkstemp and flock.
        if _names(name, fd):
            break
        os.close(fd)
    tmp = Path(name)
    try:
        os.fchmod(fd, files.FILE_MODE)
        with open(fd, "wb", closefd=False) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # still held: no sweep can take it before the rename
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    files.fsync_dir(path.parent)


def remove_leftovers(path: Path) -> list[Path]:
    """Remove the temporary files of `path` that no live writer holds: what a predict killed
    while writing `path` left. Returns them."""
    removed = []
    pattern = f".{glob.escape(path.name)}.*{LEFTOVER_SUFFIX}"
    for candidate in path.parent.glob(pattern):
        try:
            fd = os.open(candidate, os.O_RDONLY)
        except OSError:  # gone meanwhile: renamed by its writer, or removed by another sweep
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _names(str(candidate), fd):
                candidate.unlink()
                removed.append(candidate)
        except OSError:  # held: a live writer's (BlockingIOError), or gone meanwhile
            pass
        finally:
            os.close(fd)
    return removed


def _names(name: str, fd: int) -> bool:
    """Whether `name` is still the file open as `fd`."""
    try:
        return os.path.samestat(os.stat(name), os.fstat(fd))
    except FileNotFoundError:
        return False


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
