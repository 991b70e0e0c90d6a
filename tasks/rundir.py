"""A run: its folder (the documented contract), its cache settings, and how stages are called.

Every stage goes through `Run.call`, which applies the cache settings to the Prefect task,
records the stage's final state for `stages.json`, and re-creates a cached stage's side
effects in this run's folder (a hit skips the task body, so it can't write them itself).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from prefect import Task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext

from tasks.cache import (
    ArtifactSerializer,
    CacheStorage,
    CacheStore,
    KnownKey,
    NoCacheKey,
    StageCache,
    stage_key,
    with_key,
)
from tasks.checkpoint import Checkpointing
from tasks.errors import writing
from tasks.files import write_json
from tasks.rules import safe_run_name

CONFIG, METRICS, STAGES = "config.json", "metrics.json", "stages.json"
MODEL, PROGRAM, SPLIT = "model.safetensors", "model.pt2", "split.safetensors"

CacheMode = Literal["use", "refresh", "off"]


def generate_run_name() -> str:
    """Unique, sortable; inside a flow run, named after it, so a retried or re-run flow run
    (a crash automation re-runs the same one) keeps writing the same run folder."""
    context = FlowRunContext.get()
    if context is not None and context.flow_run is not None:
        run = context.flow_run
        created = run.created or datetime.now()
        return f"{created:%Y%m%d-%H%M%S}-{safe_run_name(run.name)}-{str(run.id)[:8]}"
    return f"{datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


# What a stage must redo in the run folder when Prefect serves it from the cache:
# task name → hook(value, **the call's inputs) → value.
ON_CACHE_HIT: dict[str, Callable[..., Any]] = {}


def on_cache_hit(task: Task[..., Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def register(hook: Callable[..., Any]) -> Callable[..., Any]:
        ON_CACHE_HIT[task.name] = hook
        return hook

    return register


@dataclass(frozen=True)
class StageRecord:
    name: str
    state: str  # Prefect's final state name: Completed, Cached, Failed…
    seconds: float
    key: str | None


@dataclass
class Run:
    path: Path
    config: dict[str, Any]  # the resolved TrainConfig, as JSON
    cache_root: str
    cache_mode: CacheMode = "use"
    stages: list[StageRecord] = field(default_factory=list)

    def create(self) -> None:
        """Called once input is validated, so bad input never leaves a run folder behind."""
        if not (self.path / CONFIG).exists():
            with writing(f"the run folder {str(self.path)!r}"):
                self.path.mkdir(parents=True, exist_ok=True)
                write_json(self.path / CONFIG, self.config)

    def _task_for_this_run(self, task: Task[..., Any], key: str | None) -> Task[..., Any]:
        cached = isinstance(task.cache_policy, StageCache) and key is not None
        if self.cache_mode == "off" or not cached:
            return task.with_options(cache_policy=NO_CACHE, persist_result=False)
        configured = task.with_options(
            cache_policy=KnownKey(key=key),  # the StageCache key, computed once in `call`
            result_serializer=ArtifactSerializer(root=self.cache_root),
            refresh_cache=self.cache_mode == "refresh",
            cache_result_in_memory=False,  # the flow holds the value; no second copy
        )
        # Prefect accepts only saved blocks as task options; an unsaved one works as the
        # attribute, and keeps the cache location a plain run-time setting.
        configured.result_storage = CacheStorage(root=self.cache_root)
        return configured

    def key_for(self, task: Task[..., Any], inputs: dict[str, Any]) -> str | None:
        if isinstance(task.cache_policy, StageCache):
            return task.cache_policy.key_for(task, inputs)
        try:  # an uncached stage still gets a key, so the stages after it can name it
            return stage_key(task.name, task.fn, inputs)
        except NoCacheKey:
            return None

    def call(self, task: Task[..., Any], *args: Any, **kwargs: Any) -> Any:
        bound = inspect.signature(task.fn).bind(*args, **kwargs)
        bound.apply_defaults()
        inputs = bound.arguments
        if "run_dir" in inputs:
            self.create()
        key = self.key_for(task, inputs)
        start = time.perf_counter()
        state = self._task_for_this_run(task, key)(*args, return_state=True, **kwargs)
        seconds = time.perf_counter() - start
        value = state.result()  # re-raises the task's exception if it failed
        if state.name == "Cached" and task.name in ON_CACHE_HIT:
            value = ON_CACHE_HIT[task.name](value, **inputs)
        self.stages.append(StageRecord(task.name, state.name or "", round(seconds, 4), key))
        if self.path.exists():
            with writing(f"{self.path / STAGES}"):
                write_json(self.path / STAGES, [dataclasses.asdict(s) for s in self.stages])
        return with_key(value, key)

    def checkpointing(
        self, every_epochs: int, every_seconds: float, keep: int
    ) -> Checkpointing | None:
        """Checkpoints live in the cache: none with --no-cache, no resume with --refresh-cache."""
        if self.cache_mode == "off":
            return None
        return Checkpointing(self.cache_root, every_epochs, every_seconds, keep,
                             resume=self.cache_mode == "use")  # fmt: skip

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
        lines = [f"{'stage':<14} {'state':<10} {'seconds':>8}  key"]
        for s in self.stages:
            key = s["key"] or "-"
            lines.append(f"{s['name']:<14} {s['state']:<10} {s['seconds']:>8.3f}  {key}")
        return "\n".join(lines)


def start_run(
    runs_dir: str,
    run_name: str | None,
    config: dict[str, Any],
    cache_dir: str,
    refresh_cache: bool = False,
    no_cache: bool = False,
) -> Run:
    """Resolve the run's folder (a generated, unique name by default) without creating it."""
    name = run_name or generate_run_name()
    mode: CacheMode = "off" if no_cache else "refresh" if refresh_cache else "use"
    return Run(
        Path(runs_dir).absolute() / name,
        {**config, "run_name": name},
        CacheStore(cache_dir).url,
        mode,
    )
