"""Stages (tasks/cache/stage.py) on a real Prefect server: Cached states, values, commits.

These also stand guard over the Prefect behaviour the design relies on — a task may return a
state, a transaction runs its tasks' commit hooks only when it succeeds, and a hook can run
without logging — so a Prefect release that changes any of it fails here, loudly.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.transactions import transaction

from trainflow.tasks.cache.stage import cache_entry, stage, using_cache
from trainflow.tasks.cache.store import CacheStore
from trainflow.tasks.data.splits import Split, split_indices
from trainflow.tasks.errors import InputError
from trainflow.tasks.split import split

pytestmark = pytest.mark.usefixtures("prefect_api")


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@stage(name="reject")
def reject(n_rows: int) -> None:
    raise InputError(f"{n_rows} rows are too few")


def test_a_hit_is_a_cached_task_run_and_the_caller_gets_the_value(tmp_path):
    @flow
    def twice() -> tuple[Split, Split, list[str]]:
        with using_cache(str(tmp_path), "use"):
            first = split(n_rows=20, val_fraction=0.25, seed=3, return_state=True)
            second = split(n_rows=20, val_fraction=0.25, seed=3, return_state=True)
            plain = split(n_rows=20, val_fraction=0.25, seed=3)
        return first.result(), plain, [first.name, second.name]

    first, plain, names = twice()
    assert names == ["Completed", "Cached"]
    assert isinstance(plain, Split) and torch.equal(plain.train, first.train)
    assert torch.equal(first.train, split_indices(20, 0.25, 3).train)
    assert plain.cache_key == first.cache_key and plain.cache_key.startswith("split-")


def test_the_server_records_a_hit_as_cached(tmp_path):
    @flow
    def hit() -> str:
        with using_cache(str(tmp_path), "use"):
            split(n_rows=20, val_fraction=0.25, seed=3)
            state = split(n_rows=20, val_fraction=0.25, seed=3, return_state=True)
        return str(state.state_details.task_run_id)

    task_run_id = hit()
    with get_client(sync_client=True) as client:
        assert client.read_task_run(task_run_id).state.name == "Cached"


def test_inside_a_transaction_a_later_rejection_leaves_the_cache_byte_identical(tmp_path):
    cache = tmp_path / "cache"
    CacheStore(str(cache)).put("split-" + "0" * 40, split_indices(5, 0.2, 1))  # unrelated
    before = _files(cache)

    @flow
    def rejected() -> None:
        with using_cache(str(cache), "use"), transaction():
            split(n_rows=20, val_fraction=0.25, seed=3)
            reject(n_rows=20)

    with pytest.raises(InputError):
        rejected()
    assert _files(cache) == before


def test_outside_a_transaction_an_entry_is_written_when_its_stage_ends(tmp_path):
    seen: list[bool] = []

    @stage(name="look")
    def look(key: str) -> None:
        seen.append((tmp_path / "records" / f"{key}.json").exists())

    @flow
    def in_order() -> None:
        with using_cache(str(tmp_path), "use"):
            parts = split(n_rows=20, val_fraction=0.25, seed=3)
            look(key=parts.cache_key)

    in_order()
    assert seen == [True]


def test_committing_logs_nothing(tmp_path, caplog):
    @flow
    def quiet() -> None:
        with using_cache(str(tmp_path), "use"), transaction():
            split(n_rows=20, val_fraction=0.25, seed=3)

    with caplog.at_level(logging.DEBUG, logger="prefect"):
        quiet()
    assert (tmp_path / "records").exists()
    assert not [r for r in caplog.records if "hook" in r.getMessage()]


def test_an_unwritable_cache_costs_the_entry_not_the_run(tmp_path, caplog):
    (tmp_path / "a-file").write_text("the cache's parent is not a folder: every write fails")

    @flow
    def unwritable() -> Split:
        with using_cache(str(tmp_path / "a-file" / "cache"), "use"):
            return split(n_rows=20, val_fraction=0.25, seed=3)

    assert torch.equal(unwritable().train, split_indices(20, 0.25, 3).train)
    assert "the run goes on without this entry" in caplog.text


def test_with_options_keeps_a_stage_a_stage(tmp_path):
    retried = split.with_options(retries=1)

    @flow
    def configured() -> list[str]:
        with using_cache(str(tmp_path), "use"):
            retried(n_rows=20, val_fraction=0.25, seed=3)
            value = retried(n_rows=20, val_fraction=0.25, seed=3)
            state = retried(n_rows=20, val_fraction=0.25, seed=3, return_state=True)
        return [type(value).__name__, state.name]

    assert configured() == ["Split", "Cached"]


def test_with_the_cache_off_nothing_is_hashed_or_written(tmp_path, monkeypatch):
    import trainflow.tasks.cache.stage

    def no_hashing(*args, **kwargs):
        raise AssertionError("a key was computed with the cache off")

    monkeypatch.setattr(trainflow.tasks.cache.stage, "keyed", no_hashing)

    @flow
    def off() -> str:
        with using_cache(str(tmp_path / "cache"), "off"):
            split(n_rows=20, val_fraction=0.25, seed=3)
            return split(n_rows=20, val_fraction=0.25, seed=3, return_state=True).name

    assert off() == "Completed"
    assert not (tmp_path / "cache").exists()
    with using_cache(str(tmp_path / "cache"), "off"):
        assert cache_entry("split", split_indices, n=1).key is None
