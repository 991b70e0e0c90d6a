"""Stages: Prefect tasks that answer from the stage cache when they can.

A stage's body says what its output depends on and what it does on a hit:

    entry = cache_entry("split", split_indices, n=n_rows, val_fraction=val_fraction, seed=seed)
    if (hit := entry.load(Split)) is not None:
        return entry.cached(hit)          # a `Cached` state in the UI; callers get the value
    return entry.keep(split_indices(n_rows, val_fraction, seed))

`keep` writes the entry when the task's Prefect transaction commits: right after the task,
or, inside a flow's `with transaction():` block, once the whole block has succeeded — so input
that a later stage of the block rejects leaves the cache as it was.

Where the cache is and whether to use it are settings of the run, not of each call:
`using_cache(url, mode)` sets them for everything called inside it.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal, TypeVar

from prefect import Task, get_run_logger
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from prefect.exceptions import MissingContextError
from prefect.states import Completed, State
from prefect.transactions import Transaction, get_transaction

from trainflow.tasks.cache.code_keys import CodeKey, loaded_outside, plugin_loaded, stale_sources
from trainflow.tasks.cache.imported import loaded_count
from trainflow.tasks.cache.keys import NoCacheKey, keyed
from trainflow.tasks.cache.store import CacheStore, CorruptEntry
from trainflow.tasks.errors import StorageError, writing

log = logging.getLogger("trainflow.cache")

CacheMode = Literal["use", "refresh", "off"]
T = TypeVar("T")
KEPT = "trainflow.kept-entry"  # the transaction value that holds an entry waiting for commit


@dataclass(frozen=True)
class CacheSettings:
    url: str = ""
    mode: CacheMode = "off"


OFF = CacheSettings()
_settings: ContextVar[CacheSettings] = ContextVar("trainflow_cache", default=OFF)
# Called after each stage with (name, final state name, seconds, key): the run's stages.json.
_recorder: ContextVar[Callable[[str, str, float, str | None], None] | None] = ContextVar(
    "trainflow_stage_recorder", default=None
)


def cache_mode(no_cache: bool, refresh_cache: bool) -> CacheMode:
    """What --no-cache and --refresh-cache mean together: off wins."""
    if no_cache:
        return "off"
    return "refresh" if refresh_cache else "use"


@contextmanager
def using_cache(url: str, mode: CacheMode) -> Iterator[None]:
    """Stages called inside read and write the cache at `url` ('off': neither)."""
    token = _settings.set(CacheSettings(url, mode))
    try:
        yield
    finally:
        _settings.reset(token)


@contextmanager
def recording_stages(record: Callable[[str, str, float, str | None], None]) -> Iterator[None]:
    token = _recorder.set(record)
    try:
        yield
    finally:
        _recorder.reset(token)


def warn(message: str) -> None:
    """To the task run's log (the terminal and the Prefect UI) when there is one."""
    try:
        get_run_logger().warning(message)
    except MissingContextError:
        log.warning(message)


def with_key(value: T, key: str | None) -> T:
    if key and dataclasses.is_dataclass(value) and hasattr(value, "cache_key"):
        return dataclasses.replace(value, cache_key=key)  # type: ignore[type-var]
    return value


class StageEntry:
    """One stage output's place in the cache (or no place: cache off, or no stable key)."""

    def __init__(
        self,
        key: str | None = None,
        store: CacheStore | None = None,
        mode: CacheMode = "off",
        code: CodeKey | None = None,
    ):
        self.key, self.store, self.mode, self.code = key, store, mode, code
        self.computed_by = (
            0  # trainflow.tasks.cache.imported.loaded_count() when the output was kept
        )

    def load(self, kind: type[T]) -> T | None:
        """The stored output, or None: a miss, --refresh-cache, or an entry that can't be
        trusted (it is recomputed and replaced)."""
        if self.store is None or self.key is None or self.mode != "use":
            return None
        try:
            value = self.store.get(self.key, kind)  # type: ignore[type-var]
        except CorruptEntry as exc:
            warn(f"unusable cache entry {self.key}, recomputing it: {exc}")
            return None
        except OSError as exc:  # e.g. permission denied: the run goes on without the cache
            warn(f"cannot read the cache at {self.store.url!r} ({exc}); recomputing {self.key}")
            return None
        return with_key(value, self.key)

    def cached(self, value: T) -> State[T]:
        """What a stage returns on a hit: Prefect shows the task run as Cached."""
        return Completed(data=value, name="Cached", message=f"from the stage cache: {self.key}")

    def keep(self, value: T) -> T:
        """Store `value` when the task's transaction commits; return it with its key."""
        value = with_key(value, self.key)
        if self.store is None or self.key is None:
            return value
        self.computed_by = loaded_count()
        if self.code is not None:
            # Code the computation imported unseen by its key: never stored under this key
            # (write() refuses it), and part of every later key, which may run it again.
            for module in loaded_outside(self.code, self.computed_by):
                plugin_loaded(module)
        transaction = get_transaction()
        if transaction is None:  # called outside Prefect (a test, a notebook): write now
            self.write(value)
        else:
            transaction.set(KEPT, _Kept(self, value))
        return value

    def resolve(self, kind: type[T], compute: Callable[[], T]) -> T | State[T]:
        """The stored output as a hit, or `compute()`'s, kept: for a stage that does nothing
        else on a hit."""
        hit = self.load(kind)
        return self.cached(hit) if hit is not None else self.keep(compute())

    def write(self, value: Any) -> None:
        """Best effort: a full or read-only cache costs this entry, never the run."""
        assert self.store is not None and self.key is not None
        if self.code is not None and (stale := stale_sources(self.code, self.computed_by)):
            # The output may be the old code's, and the key says the new: never stored.
            warn(
                f"not caching {self.key}: {stale}; restart this process (the worker) "
                "to cache what the code computes now"
            )
            return
        try:
            with writing(f"the cache at {self.store.url!r}"):
                self.store.put(self.key, value)
        except StorageError as exc:
            warn(f"{exc}; the run goes on without this entry")


def cache_enabled() -> bool:
    return _settings.get().mode != "off"


def _running_stage_module() -> tuple[ModuleType, ...]:
    """The module of the stage whose task run this is (none outside a task run)."""
    context = TaskRunContext.get()
    fn = getattr(context.task, "fn", None) if context is not None else None
    module = sys.modules.get(getattr(fn, "__module__", "") or "")
    return () if module is None else (module,)


def cache_entry(stage: str, fn: Callable[..., Any], **inputs: Any) -> StageEntry:
    """The entry for `fn(**inputs)`'s output as stage `stage`; nothing is hashed with the
    cache off."""
    settings = _settings.get()
    if settings.mode == "off":
        return StageEntry()
    try:
        # The stage's module as well as `fn`: the body may run code `fn` never reaches (the
        # DDP launcher, a hit's curves), and an edit of it must miss all the same.
        key, code = keyed(stage, fn, inputs, *_running_stage_module())
    except NoCacheKey as exc:
        log.info("%s: not cached (%s)", stage, exc)
        return StageEntry()
    return StageEntry(key, CacheStore(settings.url), settings.mode, code)


@dataclass(frozen=True)
class _Kept:
    """An entry and the value it waits to store. Prefect's `Transaction.get` deep-copies what
    it returns; a stage's value is never changed after it is returned, and a copy of a large
    data set's tensors at commit would double the memory it takes (or, for a memory-mapped
    one, try to copy a file handle)."""

    entry: StageEntry
    value: Any

    def __deepcopy__(self, memo: dict[int, Any]) -> _Kept:
        return self


def _write_kept_entry(transaction: Transaction) -> None:
    kept = transaction.get(KEPT, None)
    if kept is not None:
        kept.entry.write(kept.value)


class _QuietKeptEntryHook(logging.Filter):
    """Prefect logs two lines each time a commit hook runs ("Running commit hook …", "…
    finished running successfully"); this hook runs after every stage and says nothing a
    user acts on. Prefect has no public switch for a hook's lines, so this standard logging
    filter drops those that name it below WARNING (an error it meets still shows).
    tests/cache/test_stage.py notices if they come back."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or (
            _write_kept_entry.__name__ not in record.getMessage()
        )


# A hook's lines go to the task run's logger (outside a run, to Prefect's transactions
# logger). A logger's filter outlives Prefect's logging set-up, which replaces handlers only.
for _logger in ("prefect.task_runs", "prefect.transactions"):
    logging.getLogger(_logger).addFilter(_QuietKeptEntryHook())


class Stage(Task):
    """A Prefect task whose body may return `entry.cached(value)`; its callers get the value
    either way, as from any task, and the run's stages.json gets a line."""

    def __call__(self, *args: Any, return_state: bool = False, **kwargs: Any) -> Any:
        start = time.perf_counter()
        state = super().__call__(*args, return_state=True, **kwargs)
        if return_state:
            return state
        value = state.result()  # raises the stage's exception if it failed
        if (record := _recorder.get()) is not None:
            key = getattr(value, "cache_key", None) or None
            record(self.name, state.name or "", time.perf_counter() - start, key)
        return value

    def with_options(self, **options: Any) -> Stage:
        configured = super().with_options(**options)
        configured.__class__ = Stage  # Task.with_options builds a plain Task
        return configured


def stage(name: str, **options: Any) -> Callable[[Callable[..., T]], Stage]:
    """Decorate a stage body. Prefect's own cache and result persistence are off: the body
    decides about the cache, and the value stays in memory for the next stage."""

    def decorate(fn: Callable[..., T]) -> Stage:
        task = Stage(fn=fn, name=name, cache_policy=NO_CACHE, persist_result=False, **options)
        task.on_commit(_write_kept_entry)
        return task

    return decorate
