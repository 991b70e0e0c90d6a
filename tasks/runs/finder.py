"""Finding a trained run's model: by run folder, by name under --runs-dir, by "latest", or by
a Prefect flow-run id (whose artifact names its folder and the digest of the model it wrote);
and rebuilding the model from its weights and spec, as data.

`model.pt2` is never loaded here: `torch.export.load` unpickles parts of an archive and hands
its shape expressions to sympy's `eval`, so whoever can write a run folder or the cache could
make it run code. The rebuilt model computes what a genuine `model.pt2` does, from files that
can change the numbers but run nothing.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from torch import nn

from trainflow.tasks.engine.models import ModelSpec, instantiate, spec_from_json
from trainflow.tasks.errors import InputError
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
    model_digest,
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
    classes: tuple[str, ...] = ()  # the names of the class ids (an image folder's folders)

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
        schema |= {"categories": self.categories} if self.categories else {}
        return schema | ({"classes": self.classes} if self.classes else {})


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
        classes = columns.get("classes", [])
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise ValueError("classes must be a list of names")
        classes = tuple(classes)
        if not isinstance(config.get("loss"), str):  # how outputs become predictions
            raise ValueError(f"{CONFIG} names no loss")
        spec_json = json.loads((folder / SPEC).read_text())
        spec = spec_from_json(spec_json)
        if classes and len(classes) != spec.n_classes:
            raise ValueError(f"{len(classes)} class names for {spec.n_classes} classes")
        if len(set(classes)) != len(classes):
            raise ValueError("a class name appears twice")
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
        classes,
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
