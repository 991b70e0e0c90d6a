"""Data larger than memory: the memory-mapped path, forced with TRAINFLOW_IN_MEMORY_BYTES=0.

A run on the mapped path must equal the in-memory run bit for bit (weights, every epoch's
losses and metrics), on CSV and Parquet, after a resume too; a bad cell or a kill during the
conversion must leave nothing in the cache that a later run would trust.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors import safe_open

from trainflow.flows.config import TrainConfig
from trainflow.flows.train_flow import train_flow
from trainflow.tasks.cache.prune import list_entries, prune
from trainflow.tasks.cache.stage import using_cache
from trainflow.tasks.cache.store import LEFTOVER_AGE_S
from trainflow.tasks.data import stream
from trainflow.tasks.data.mapped import ENV_LIMIT, MappedTable, MappedWriter, Scratch
from trainflow.tasks.data.sources import DataFile
from trainflow.tasks.data.tensors import load_dataset
from trainflow.tasks.errors import InputError

from ..conftest import REPO
from ..flows.test_resume_flow import Result, _child_env, _events, _run

COLUMNS = ["a", "b", "c", "d", "target"]


def _table(rows: int = 240, seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)  # numpy's seeded generator: the file's contents only
    x = rng.standard_normal((rows, 4))
    y = x @ np.array([1.5, -2.0, 0.5, 0.0]) + 0.1 * rng.standard_normal(rows)
    return np.column_stack([x, y])


def _write_csv(path: Path, table: np.ndarray, bad: tuple[int, int] | None = None) -> Path:
    lines = [",".join(COLUMNS)]
    for i, row in enumerate(table):
        cells = [repr(float(v)) for v in row]
        if bad is not None and i == bad[0]:
            cells[bad[1]] = "oops"
        lines.append(",".join(cells))
    path.write_text("\n".join(lines) + "\n")
    return path


def _write_parquet(path: Path, table: np.ndarray) -> Path:
    arrays = {name: pa.array(table[:, i]) for i, name in enumerate(COLUMNS)}
    pq.write_table(pa.table(arrays), path, row_group_size=50)  # several row groups
    return path


def _write_feather(path: Path, table: np.ndarray) -> Path:
    import pyarrow.feather as feather

    arrays = {name: pa.array(table[:, i]) for i, name in enumerate(COLUMNS)}
    feather.write_feather(pa.table(arrays), path, chunksize=50)  # several record batches
    return path


WRITERS = {"csv": _write_csv, "parquet": _write_parquet, "feather": _write_feather}


def _records(cache: Path) -> list[dict]:
    folder = cache / "records"
    return [json.loads(p.read_text()) for p in folder.glob("*.json")] if folder.exists() else []


def _leftovers(cache: Path) -> list[str]:
    blobs = cache / "blobs"
    return (
        sorted(p.name for p in blobs.iterdir() if p.name.startswith(".")) if blobs.exists() else []
    )


def _mapped_temp_dirs() -> set[str]:
    return {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("trainflow-mapped-")}


# --- the file and its map -------------------------------------------------------------------


def test_the_mapped_file_is_plain_safetensors_and_gathers_rows_exactly(tmp_path, monkeypatch):
    source = _write_csv(tmp_path / "t.csv", _table())
    expected = load_dataset(str(source))
    append, chunks = MappedWriter.append, []

    def counting(self, x, y):
        chunks.append(len(x))
        append(self, x, y)

    monkeypatch.setattr(MappedWriter, "append", counting)
    with DataFile(str(source)) as file:
        data = stream.convert_to_map(file, ".csv", (), (), Scratch(None))
    assert len(chunks) > 8, chunks  # even a small table is read in chunks, then joined
    with safe_open(data.table.path, framework="pt") as f:
        assert torch.equal(f.get_tensor("x"), expected.x)
        assert torch.equal(f.get_tensor("y"), expected.y)
    rows = torch.randperm(len(expected), generator=torch.Generator().manual_seed(0))[:50]
    x, y = data.table.gather(rows)
    assert torch.equal(x, expected.x[rows]) and torch.equal(y, expected.y[rows])
    assert torch.equal(data.y, expected.y)
    assert data.feature_names == expected.feature_names == ("a", "b", "c", "d")


def test_no_map_of_the_file_outlives_a_gather(tmp_path):
    """Touched pages of a map count in RSS while it lives (the 4 GB benchmark's premise): a
    gather maps one window at a time and leaves nothing mapped behind."""
    path = str(tmp_path / "m.safetensors")
    writer = MappedWriter(path, 32, 1)
    rows = torch.arange(1 << 18, dtype=torch.float32)
    block = rows.unsqueeze(1).expand(-1, 32).numpy()  # row r holds r in every column
    writer.append(block, block[:, :1] * 2)
    writer.finish()
    table = MappedTable(path)
    order = torch.randperm(len(table), generator=torch.Generator().manual_seed(1))
    for start in range(0, len(table), 50_000):  # a shuffled epoch touches every window
        x, y = table.gather(order[start : start + 50_000])
        assert torch.equal(x[:, 5], order[start : start + 50_000].float())
        assert torch.equal(y[:, 0], 2 * order[start : start + 50_000].float())
        assert _resident_kib(path) == 0 and path not in Path("/proc/self/maps").read_text()
    assert torch.equal(table.targets()[:, 0], 2 * rows)


def _resident_kib(path: str) -> int:
    """This process's resident KiB of the mapping of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if line and line[0] in "0123456789abcdef" and "-" in line.split()[0]:
            inside = line.endswith(path)
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def test_a_bad_cell_after_the_first_chunk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_LIMIT, "0")
    source = _write_csv(tmp_path / "bad.csv", _table(), bad=(200, 2))  # line 202, column 'c'
    cache, before = tmp_path / "cache", _mapped_temp_dirs()
    for url in (str(cache), None):  # into the cache; and with --no-cache, a temporary folder
        with pytest.raises(InputError) as caught, using_cache(url or "", "use" if url else "off"):
            from trainflow.tasks.load_tensors import load_tensors

            load_tensors.fn(str(source), (), 100, 42, 0.1)
        message = str(caught.value)
        assert message == f"data file {str(source)!r}: line 202, column 'c': 'oops' is not a number"
        assert "\n" not in message
    assert _records(cache) == [] and _leftovers(cache) == []
    assert _mapped_temp_dirs() == before


def test_nan_deep_in_the_file_is_reported_like_the_in_memory_path(tmp_path, monkeypatch):
    table = _table()
    table[150, 1] = table[230, 3] = np.nan
    source = _write_csv(tmp_path / "nan.csv", table)
    with pytest.raises(InputError) as in_memory:
        load_dataset(str(source))
    monkeypatch.setenv(ENV_LIMIT, "0")
    with pytest.raises(InputError) as mapped, using_cache(str(tmp_path / "cache"), "use"):
        from trainflow.tasks.load_tensors import load_tensors

        load_tensors.fn(str(source), (), 100, 42, 0.1)
    assert str(mapped.value) == str(in_memory.value)
    assert "2 NaN/Inf value(s) in x, first at row 150, column 'b'" in str(mapped.value)
    assert _leftovers(tmp_path / "cache") == []


# --- whole runs: mapped == in memory ------------------------------------------------------


def _config(root: Path, data: Path, name: str, cache: str, **overrides) -> TrainConfig:
    return TrainConfig(
        data=str(data),
        epochs=6,
        batch_size=16,
        model="mlp",
        hidden=(8,),
        lr=0.05,
        lr_schedule="cosine",
        checkpoint_every_epochs=2,
        checkpoint_every_seconds=0,
        runs_dir=str(root / "runs"),
        run_name=name,
        cache_dir=str(root / cache),
        **overrides,
    )


def _mapped_records(cache: Path) -> list[dict]:
    return [r for r in _records(cache) if r["artifact"] == "MappedDataset"]


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_the_mapped_path_equals_the_in_memory_path_bit_for_bit(
    tmp_path, monkeypatch, prefect_api, kind
):
    data = WRITERS[kind](tmp_path / f"table.{kind}", _table())
    reference = train_flow(_config(tmp_path, data, "in-memory", "cache-memory"))
    assert _mapped_records(tmp_path / "cache-memory") == []

    monkeypatch.setenv(ENV_LIMIT, "0")
    mapped = train_flow(_config(tmp_path, data, "mapped", "cache-mapped"))
    assert len(_mapped_records(tmp_path / "cache-mapped")) == 1
    expected, got = Result.of(reference.run_dir), Result.of(mapped.run_dir)
    assert got.same_run_as(expected)
    for key in ("val_mae", "val_r2", "lr", "best_epoch"):
        assert got.metrics[key] == expected.metrics[key], key

    # A moved cache still hits (records name blobs by checksum, not by path).
    shutil.move(tmp_path / "cache-mapped", tmp_path / "moved")
    again = train_flow(_config(tmp_path, data, "again", "moved"))
    states = {s["name"]: s["state"] for s in again.stages}
    assert states["load-tensors"] == states["train-epochs"] == "Cached"
    assert Result.of(again.run_dir).same_run_as(expected)


def test_no_cache_maps_into_a_temporary_folder_removed_afterwards(
    tmp_path, monkeypatch, prefect_api
):
    data = _write_csv(tmp_path / "table.csv", _table())
    reference = train_flow(_config(tmp_path, data, "in-memory", "cache", no_cache=True))
    monkeypatch.setenv(ENV_LIMIT, "0")
    before = _mapped_temp_dirs()
    mapped = train_flow(_config(tmp_path, data, "mapped", "cache", no_cache=True))
    assert Result.of(mapped.run_dir).same_run_as(Result.of(reference.run_dir))
    import gc

    gc.collect()  # the run's tables are gone: so is their folder
    assert _mapped_temp_dirs() == before
    assert not (tmp_path / "cache").exists()


# --- kills: during the conversion, and mid-training --------------------------------------

# The child converts into the cache and dies where KILL_AT says; the wrapping is the test's,
# from outside trainflow's code, and logs its strike before it strikes.
CHILD = """
import os, sys, signal, json
from trainflow.tasks.data import mapped
from trainflow.tasks.data import stream
from trainflow.tasks.data.sources import DataFile
from trainflow.tasks.cache.stage import using_cache

source, cache, kill_at, log = sys.argv[1:5]

def strike(where):
    with open(log, "a") as f:
        f.write(json.dumps({"strike": where}) + "\\n")
    os.kill(os.getpid(), signal.SIGKILL)

append, replace, appended = mapped.MappedWriter.append, os.replace, [0]

def counting_append(self, x, y):
    append(self, x, y)
    appended[0] += 1
    if kill_at == "mid-conversion" and appended[0] == 3:
        strike(kill_at)

def watched_replace(src, dst, *args, **kwargs):
    adopting = ".tmp-mapped-" in os.fspath(src)
    if adopting and kill_at == "before-rename":
        strike(kill_at)
    result = replace(src, dst, *args, **kwargs)
    if adopting and kill_at == "after-rename":
        strike(kill_at)
    return result

mapped.MappedWriter.append, os.replace = counting_append, watched_replace
with using_cache(cache, "use"), DataFile(source) as file:
    stream.load_mapped(file, ".csv", (), (), {"content": "x"})
print("finished without a strike")
"""


@pytest.mark.system  # a child process of its own
@pytest.mark.parametrize("kill_at", ["mid-conversion", "before-rename", "after-rename"])
def test_a_kill_during_the_conversion_leaves_no_entry_a_rerun_trusts(tmp_path, kill_at):
    source = _write_csv(tmp_path / "t.csv", _table())
    cache, log = tmp_path / "cache", tmp_path / "strikes.jsonl"
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(source), str(cache), kill_at, str(log)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == -signal.SIGKILL, child.stdout + child.stderr
    assert log.read_text().splitlines() == [json.dumps({"strike": kill_at})]
    assert _records(cache) == []  # nothing names what the child wrote
    # What it left is listed as a leftover: a temporary file, or a blob no record names.
    left = (
        "a blob no record names"
        if kill_at == "after-rename"
        else "a killed writer's temporary file"
    )
    assert [e.leftover for e in list_entries(str(cache))] == [left]

    expected = load_dataset(str(source))
    with using_cache(str(cache), "use"), DataFile(str(source)) as file:
        fresh = stream.load_mapped(file, ".csv", (), (), {"content": "x"})
    assert not hasattr(fresh, "is_completed"), "a re-run must convert, not hit"
    assert torch.equal(fresh.table.gather(torch.arange(len(expected)))[0], expected.x)
    assert len(_mapped_records(cache)) == 1
    with using_cache(str(cache), "use"), DataFile(str(source)) as file:
        hit = stream.load_mapped(file, ".csv", (), (), {"content": "x"})
    assert hit.name == "Cached" and torch.equal(hit.data.y, expected.y)
    # Only the kill's own scratch file may be left (its `.tmp-` name is never trusted).
    assert len(_leftovers(cache)) == (1 if kill_at in ("mid-conversion", "before-rename") else 0)
    # An hour later any prune removes it, and only it: the entry still hits.
    for entry in list_entries(str(cache)):
        if entry.leftover:
            when = (cache / entry.key).stat().st_mtime - LEFTOVER_AGE_S - 60
            os.utime(cache / entry.key, (when, when))
    assert all(e.leftover for e in prune(str(cache), older_than_s=30 * 86400))
    assert _leftovers(cache) == [] and len(_mapped_records(cache)) == 1
    with using_cache(str(cache), "use"), DataFile(str(source)) as file:
        assert stream.load_mapped(file, ".csv", (), (), {"content": "x"}).name == "Cached"


def test_a_killed_run_on_the_mapped_path_resumes_bit_identical(
    tmp_path, monkeypatch, prefect_api, subprocess_env
):
    data = _write_csv(tmp_path / "table.csv", _table())
    reference = Result.of(train_flow(_config(tmp_path, data, "in-memory", "cache-memory")).run_dir)
    # 192 training rows: 12 steps an epoch; checkpoints after epochs 2 and 4; killed in epoch 5.
    config = _config(tmp_path, data, "run", "cache")
    env = _child_env({**subprocess_env, ENV_LIMIT: "0"}, "signal:KILL:step:57", tmp_path / "f.log")
    code, output = _run(config, env, tmp_path / "first.txt")
    assert code == -signal.SIGKILL, output[-3000:]
    assert [e["step"] for e in _events(tmp_path / "f.log") if e["event"] == "strike"] == [57]
    assert len(_mapped_records(tmp_path / "cache")) == 1

    monkeypatch.setenv(ENV_LIMIT, "0")
    rerun = train_flow(config)  # the same command again: same run folder, same cache
    assert rerun.resumed_from == {"epoch": 4, "batch": 0}
    states = {s["name"]: s["state"] for s in rerun.stages}
    assert states["load-tensors"] == "Cached"
    assert Result.of(rerun.run_dir).same_run_as(reference)


@pytest.mark.parametrize("kind", ["parquet", "feather"])
def test_a_text_column_on_the_mapped_path_is_one_line_and_leaves_nothing(
    tmp_path, monkeypatch, kind
):
    arrays = {"color": pa.array(["red", "blue"] * 50), "a": pa.array(np.arange(100.0))}
    arrays["y"] = pa.array(np.arange(100.0) * 2)
    path = tmp_path / f"t.{kind}"
    if kind == "parquet":
        pq.write_table(pa.table(arrays), path)
    else:
        import pyarrow.feather as feather

        feather.write_feather(pa.table(arrays), path)
    monkeypatch.setenv(ENV_LIMIT, "0")
    from trainflow.tasks.load_tensors import load_tensors

    with using_cache(str(tmp_path / "cache"), "use"), pytest.raises(InputError) as error:
        load_tensors.fn(str(path), (), 100, 42, 0.1)
    assert str(error.value) == (
        f"data file {str(path)!r}: column 'color' is text (categorical); a table too big for "
        "memory takes numeric columns only (README, 'Data larger than memory')"
    )
    assert _leftovers(tmp_path / "cache") == []
