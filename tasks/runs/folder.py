"""A run: its folder (the documented contract), its cache settings and its stage log.

`open_run` is entered once by the flow. It resolves the run folder without creating it (bad
input must leave nothing behind), refuses a folder that holds a run of another config, sets
the cache location and mode for every stage called inside, and keeps `stages.json`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import xxhash
from prefect.context import FlowRunContext

from trainflow.tasks.cache.stage import CacheMode, cache_mode, recording_stages, using_cache
from trainflow.tasks.cache.store import CacheStore
from trainflow.tasks.engine.checkpoint import CheckpointSettings
from trainflow.tasks.errors import InputError, writing
from trainflow.tasks.files import write_json
from trainflow.tasks.names import SYNTHETIC
from trainflow.tasks.rules import safe_run_name

# What a run folder holds, by name (export-graph writes most; predict reads them).
CONFIG, STAGES = "config.json", "stages.json"
MODEL, PROGRAM, SPLIT = "model.safetensors", "model.pt2", "split.safetensors"
METRICS = "metrics.json"
COLUMNS = "columns.json"  # the model's input and output columns, by name, for predict
# The architecture (a ModelSpec): with model.safetensors, all predict rebuilds the model from.
# Predict never loads model.pt2: torch.export.load runs code an archive can carry.
SPEC = "spec.json"
SOURCE = "source"  # a copy of the project's own code the run used (its model, loss, …)
# The Prefect artifact that records where a train flow run's folder is, absolute, so that
# `--model prefect.flow-run.<id>` names that folder whatever the caller's working directory;
# with the digest of the model the run exported there (`model_digest`), so that the id never
# names another model a later run wrote into that folder, and the run's cache, absolute.
RUN_FOLDER_ARTIFACT = "run-folder"
# TensorBoard reads every file with "tfevents" in its name; fixed names mean a re-run into the
# same folder replaces the graph and the hparams record instead of adding a second one.
GRAPH_EVENTS, HPARAMS_EVENTS = "events.out.tfevents.0.graph", "events.out.tfevents.0.hparams"
# config.json keeps the config as given (relative paths included); this file says what its
# data and cache_dir named from the folder training ran in, so that predict's defaults are
# the run's own whatever predict's working folder.
LOCATIONS = "locations.json"
# Settings that change how a run goes, not what it computes: a run folder may be reused with
# other values of these (a resumed run with --refresh-cache, another checkpoint cadence…).
RESULT_NEUTRAL = frozenset(
    {
        "refresh_cache",
        "no_cache",
        "cache_dir",
        "runs_dir",
        "checkpoint_every_epochs",
        "checkpoint_every_seconds",
        "keep_checkpoints",
        "num_workers",
    }
)


def model_digest(
    weights_digest: str, spec: dict[str, Any], columns: dict[str, Any], loss: str
) -> str:
    """One digest of what decides a run's scores: the xxh3-128 of model.safetensors' bytes,
    the architecture, the columns and the loss. Of the JSON as parsed, not as formatted, so
    that the files export-graph writes and the files predict reads give the same digest."""
    record = {"weights": weights_digest, "spec": spec, "columns": columns, "loss": loss}
    return xxhash.xxh3_128_hexdigest(json.dumps(record, sort_keys=True).encode())


def generate_run_name() -> str:
    """Unique, sortable; inside a flow run, named after it, so a retried or re-run flow run
    (a crash automation re-runs the same one) keeps writing the same run folder."""
    context = FlowRunContext.get()
    if context is not None and context.flow_run is not None:
        run = context.flow_run
        created = run.created or datetime.now()
        return f"{created:%Y%m%d-%H%M%S}-{safe_run_name(run.name)}-{str(run.id)[:8]}"
    return f"{datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def stage_table(stages: list[dict[str, Any]]) -> str:
    """The terminal's table of a run's stages (as stages.json holds them)."""
    lines = [f"{'stage':<14} {'state':<10} {'seconds':>8}  key"]
    for s in stages:
        key = s["key"] or "-"
        lines.append(f"{s['name']:<14} {s['state']:<10} {s['seconds']:>8.3f}  {key}")
    return "\n".join(lines)


@dataclass(frozen=True)
class StageRecord:
    name: str
    state: str  # Prefect's final state name: Completed or Cached
    seconds: float
    key: str | None


@dataclass
class Run:
    path: Path
    config: dict[str, Any]  # the resolved TrainConfig, as JSON
    cache_url: str
    cache_mode: CacheMode = "use"
    stages: list[StageRecord] = field(default_factory=list)

    def create(self) -> Path:
        """The run folder, with config.json and locations.json, once input is valid; returns
        its path."""
        check_inside(self.path, self.path.name)  # again: a link may be planted meanwhile
        with writing(f"the run folder {str(self.path)!r}"):
            self.path.mkdir(parents=True, exist_ok=True)
            write_json(self.path / CONFIG, self.config)
            data = _comparable("data", self.config["data"])
            write_json(self.path / LOCATIONS, {"data": data, "cache": self.cache_url})
            self._write_stages()
        return self.path

    def record(self, name: str, state: str, seconds: float, key: str | None) -> None:
        self.stages.append(StageRecord(name, state, round(seconds, 4), key))
        if (self.path / CONFIG).exists():
            with writing(f"{self.path / STAGES}"):
                self._write_stages()

    def _write_stages(self) -> None:
        write_json(self.path / STAGES, [dataclasses.asdict(s) for s in self.stages])

    def checkpointing(self) -> CheckpointSettings | None:
        """Checkpoints live in the cache: none with --no-cache, no resume with --refresh-cache."""
        if self.cache_mode == "off":
            return None
        return CheckpointSettings(
            self.cache_url,
            every_epochs=self.config["checkpoint_every_epochs"],
            every_seconds=self.config["checkpoint_every_seconds"],
            keep=self.config["keep_checkpoints"],
            resume=self.cache_mode == "use",
        )

    def summary(self) -> RunSummary:
        metrics = json.loads((self.path / METRICS).read_text())
        return RunSummary(
            run_dir=str(self.path),
            epochs=metrics["epochs"],
            epochs_trained=metrics["epochs_trained"],
            resumed_from=metrics["resumed_from"],
            final_train_loss=metrics["final_train_loss"],
            final_val_loss=metrics["final_val_loss"],
            stages=[dataclasses.asdict(s) for s in self.stages],
        )


@dataclass(frozen=True)
class RunSummary:
    run_dir: str
    epochs: int
    epochs_trained: int
    resumed_from: dict[str, int] | None
    final_train_loss: float
    final_val_loss: float
    stages: list[dict[str, Any]]

    def stage_table(self) -> str:
        return stage_table(self.stages)


def config_conflict(folder: Path, config: dict[str, Any], defaults: dict[str, Any]) -> str | None:
    """How the run already in `folder` differs from `config`, if it does in what it computes.

    A setting its config.json lacks was added after that run was written: it reads as the
    setting's default (`defaults`), which is what the version that wrote it computed."""
    try:
        existing = json.loads((folder / CONFIG).read_text())
    except (FileNotFoundError, NotADirectoryError):  # no run there (yet)
        return None
    except (OSError, ValueError):
        return "its config.json is unreadable"
    if not isinstance(existing, dict):
        return "its config.json is unreadable"
    existing = {**defaults, **existing}
    changed = [
        f"{name}: {existing.get(name)!r} → {value!r}"
        for name, value in config.items()
        if name not in RESULT_NEUTRAL
        and _comparable(name, existing.get(name)) != _comparable(name, value)
    ]
    return ", ".join(changed) or None


def _comparable(name: str, value: Any) -> Any:
    """Two spellings of one local data file (`d.csv`, `./d.csv`, its absolute path) are one
    config; a URL (or 'synthetic', a recipe) is compared as written."""
    if name == "data" and isinstance(value, str) and "://" not in value and value != SYNTHETIC:
        return os.path.abspath(value)
    return value


def check_inside(path: Path, name: str) -> None:
    """A run folder is a folder of its own inside --runs-dir: a link planted under that name
    (to a folder anywhere else) is refused, not followed."""
    if path.is_symlink() or (path.exists() and path.resolve().parent != path.parent.resolve()):
        raise InputError(
            f"--run-name {name}: {path} is a link to {path.resolve()}; a run folder must be a "
            "folder of its own inside --runs-dir: remove the link or choose another --run-name"
        )


@contextmanager
def open_run(config: dict[str, Any], defaults: dict[str, Any]) -> Iterator[Run]:
    """The run of a resolved TrainConfig (as JSON; `defaults`, the default config's): its
    folder is named and checked, not made."""
    name = config.get("run_name") or generate_run_name()
    path = Path(config["runs_dir"]).absolute() / name
    check_inside(path, name)
    if conflict := config_conflict(path, {**config, "run_name": name}, defaults):
        raise InputError(
            f"--run-name {name}: {path} holds a run of another config ({conflict}); "
            "choose another --run-name or remove that folder"
        )
    mode = cache_mode(config["no_cache"], config["refresh_cache"])
    run = Run(path, {**config, "run_name": name}, CacheStore(config["cache_dir"]).url, mode)
    with using_cache(run.cache_url, mode), recording_stages(run.record):
        yield run
