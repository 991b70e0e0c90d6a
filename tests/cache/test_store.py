"""The cache's bytes (tasks/cache/store.py), listing and pruning (tasks/cache/prune.py), the cache
CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch

from trainflow.flows import cache_cli
from trainflow.tasks.cache import prune as prune_module
from trainflow.tasks.cache.keys import FORMAT
from trainflow.tasks.cache.prune import list_entries, prune
from trainflow.tasks.cache.store import LEFTOVER_AGE_S, CacheStore, CorruptEntry
from trainflow.tasks.data.splits import Split, split_indices
from trainflow.tasks.data.tensors import Dataset
from trainflow.tasks.engine.fit import Trained
from trainflow.tasks.engine.models import InitialModel, ModelSpec, initial_model
from trainflow.tasks.export_graph import Exported

from ..conftest import REPO

SPEC = ModelSpec("mlp", 3, 2, (4,))


@pytest.fixture(params=["local", "memory"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """A cache root on the local disk or on fsspec's in-memory filesystem."""
    if request.param == "local":
        yield str(tmp_path / "c")
        return
    url = f"memory://trainflow-test-{uuid.uuid4().hex}"
    yield url
    fs, path = fsspec.core.url_to_fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def _fs(root: str) -> tuple[Any, str]:
    store = CacheStore(root)
    return store.fs, store.root


def _dataset() -> Dataset:
    x = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    return Dataset(x, x.sum(1, keepdim=True), ("a", "b", "c"), ("t",))


ARTIFACTS = {
    Dataset: _dataset,
    Split: lambda: split_indices(10, 0.3, 13),
    InitialModel: lambda: initial_model(SPEC, 0),
    Trained: lambda: Trained(SPEC, initial_model(SPEC, 1).state, [1.0, 0.5], [1.5, 0.75], 2),
    Exported: lambda: Exported(b"\x00\x01program\xff" * 7, b"graph-events"),
}


def _assert_same(a: Any, b: Any) -> None:
    assert type(a) is type(b)
    for f in dataclasses.fields(a):
        if f.name == "cache_key":
            continue
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and torch.equal(x, y), f.name
        elif isinstance(x, dict) and any(isinstance(v, torch.Tensor) for v in x.values()):
            assert x.keys() == y.keys(), f.name
            for k in x:
                assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), f"{f.name}[{k}]"
        else:
            assert x == y, f.name


def _key(stage: str, n: int) -> str:
    return f"{stage}-{n:040x}"


# --- entries --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ARTIFACTS, ids=lambda k: k.__name__)
def test_every_stage_output_round_trips(kind, root):
    value = ARTIFACTS[kind]()
    store = CacheStore(root)
    store.put(_key("stage", 1), value)
    _assert_same(store.get(_key("stage", 1), kind), value)
    fs, base = _fs(root)
    record = json.loads(fs.cat_file(f"{base}/records/{_key('stage', 1)}.json"))
    assert record["artifact"] == kind.__qualname__ and record["format"] == FORMAT
    assert set(record["blob"]) == {"xxh3", "size"}
    assert base not in json.dumps(record)  # no path: the folder can move


def test_a_missing_entry_is_a_plain_miss(root):
    assert CacheStore(root).get(_key("split", 1), Split) is None


def test_an_entry_is_read_as_the_kind_the_stage_expects_only(root):
    store = CacheStore(root)
    store.put(_key("split", 1), split_indices(10, 0.3, 13))
    with pytest.raises(CorruptEntry, match="not a Dataset"):
        store.get(_key("split", 1), Dataset)


def test_equal_outputs_share_one_blob_and_no_temporary_file_is_left(root):
    store = CacheStore(root)
    store.put(_key("split", 1), split_indices(10, 0.3, 13))
    store.put(_key("split", 2), split_indices(10, 0.3, 13))
    store.put(_key("split", 3), split_indices(10, 0.3, 14))
    fs, base = _fs(root)
    assert len(fs.glob(f"{base}/blobs/*.safetensors")) == 2
    assert not [p for p in fs.find(base) if ".tmp" in p]


def test_a_moved_or_copied_cache_reads_from_where_it_is_now(tmp_path):
    CacheStore(str(tmp_path / "old")).put(_key("split", 1), split_indices(10, 0.3, 13))
    shutil.copytree(tmp_path / "old", tmp_path / "copy")
    os.rename(tmp_path / "old", tmp_path / "moved")
    for folder in ("moved", "copy"):
        _assert_same(
            CacheStore(str(tmp_path / folder)).get(_key("split", 1), Split),
            split_indices(10, 0.3, 13),
        )
    # The copy is independent: damage to the moved one doesn't show through it.
    shutil.rmtree(tmp_path / "moved" / "blobs")
    assert CacheStore(str(tmp_path / "copy")).get(_key("split", 1), Split) is not None


@pytest.mark.parametrize(
    "record",
    [
        {
            "format": FORMAT,
            "artifact": "Split",
            "meta": {},
            "blob": {"xxh3": "../../etc", "size": 0},
        },
        {"format": FORMAT, "artifact": "Split", "meta": {}, "blob": {"xxh3": "0" * 32}},
        {"format": FORMAT + 1, "artifact": "Split", "meta": {}, "blob": {}},
        {"format": FORMAT, "artifact": "Split", "meta": {}, "blob": {"xxh3": "0" * 32, "size": 1}},
        {},
        [],
        None,
    ],
    ids=["path-as-blob-name", "no-size", "other-format", "missing-blob", "empty", "list", "null"],
)
def test_a_foreign_record_is_a_corrupt_entry(record, root):
    store = CacheStore(root)
    store.write(store.path("records", f"{_key('split', 1)}.json"), json.dumps(record).encode())
    with pytest.raises(CorruptEntry):
        store.get(_key("split", 1), Split)


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def test_a_planted_pickle_is_never_unpickled(root, tmp_path):
    marker = tmp_path / "pwned"
    store = CacheStore(root)
    store.write(store.path("records", f"{_key('split', 1)}.json"), pickle.dumps(_Exploit(marker)))
    with pytest.raises(CorruptEntry):
        store.get(_key("split", 1), Split)
    assert not marker.exists()


def _stored_once(root: str) -> tuple[CacheStore, str]:
    store = CacheStore(root)
    store.put(_key("build-model", 1), initial_model(SPEC, 0))
    store.get(_key("build-model", 1), InitialModel)  # read once: no memo may hide what follows
    fs, base = _fs(root)
    (blob,) = fs.glob(f"{base}/blobs/*.safetensors")
    return store, blob


@pytest.mark.parametrize("damage", ["truncate", "flip", "remove", "replace"])
def test_a_damaged_blob_is_a_corrupt_entry(root, damage):
    store, blob = _stored_once(root)
    data = bytearray(store.fs.cat_file(blob))
    if damage == "truncate":
        store.fs.pipe_file(blob, bytes(data[:-7]))
    elif damage == "flip":
        data[len(data) // 2] ^= 0x01
        store.fs.pipe_file(blob, bytes(data))
    elif damage == "remove":
        store.fs.rm_file(blob)
    else:  # same size, another inode, mtime put back
        stat = store.fs.info(blob)
        store.fs.rm_file(blob)
        data[-1] ^= 0x20
        store.fs.pipe_file(blob, bytes(data))
        if store.local:
            os.utime(blob, ns=(int(stat["mtime"] * 1e9),) * 2)
    with pytest.raises(CorruptEntry):
        store.get(_key("build-model", 1), InitialModel)


# --- listing and pruning ---------------------------------------------------------------------

DAY = 86400.0


def _put(root: str, key: str, value: Any, created: float) -> None:
    store = CacheStore(root)
    store.put(key, value)
    path = store.path("records", f"{key}.json")
    record = json.loads(store.read(path))
    store.write(path, json.dumps({**record, "created": created}).encode())


@pytest.fixture
def populated(root: str) -> tuple[str, float]:
    """Four entries, 10, 5, 2 and 0.1 days old; the oldest and the newest share a blob."""
    import time

    now = time.time()
    _put(root, _key("split", 1), split_indices(10, 0.3, 1), now - 10 * DAY)
    _put(root, _key("build-model", 2), initial_model(SPEC, 0), now - 5 * DAY)
    _put(root, _key("load-tensors", 3), _dataset(), now - 2 * DAY)
    _put(root, _key("split", 4), split_indices(10, 0.3, 1), now - 0.1 * DAY)
    return root, now


def _blob_names(root: str) -> set[str]:
    fs, base = _fs(root)
    return {Path(p).name.removesuffix(".safetensors") for p in fs.glob(f"{base}/blobs/*")}


def test_list_entries_oldest_first_with_sizes(populated):
    root, now = populated
    entries = list_entries(root)
    expected = [_key("split", 1), _key("build-model", 2), _key("load-tensors", 3), _key("split", 4)]
    assert [e.key for e in entries] == expected
    assert entries[0].created == pytest.approx(now - 10 * DAY)
    assert entries[0].blob == entries[3].blob != entries[1].blob
    assert {e.blob for e in entries} == _blob_names(root)
    fs, base = _fs(root)
    for e in entries:
        record = fs.size(f"{base}/records/{e.key}.json")
        assert e.size == record + fs.size(f"{base}/blobs/{e.blob}.safetensors")


def test_list_entries_of_an_empty_or_missing_cache(root):
    assert list_entries(root) == []


def test_list_entries_skips_foreign_names_and_puts_unreadable_records_first(populated):
    root, _ = populated
    store = CacheStore(root)
    store.write(store.path("records", "not-a-key.json"), b"{}")
    store.write(store.path("records", f"{_key('split', 9)}.json"), b"garbage")
    entries = list_entries(root)
    assert "not-a-key" not in [e.key for e in entries]
    assert entries[0].key == _key("split", 9)
    assert entries[0].created == 0.0 and entries[0].blob is None


def test_prune_older_than_removes_old_entries_and_unshared_blobs(populated):
    root, _ = populated
    before = {e.key: e for e in list_entries(root)}
    removed = prune(root, older_than_s=3 * DAY)
    assert [e.key for e in removed] == [_key("split", 1), _key("build-model", 2)]
    assert [e.key for e in list_entries(root)] == [_key("load-tensors", 3), _key("split", 4)]
    # The 10-day-old split's blob is shared with the kept newest entry: it stays, and loads.
    kept = {before[_key("load-tensors", 3)].blob, before[_key("split", 4)].blob}
    assert _blob_names(root) == kept
    _assert_same(CacheStore(root).get(_key("split", 4), Split), split_indices(10, 0.3, 1))
    assert prune(root, older_than_s=3 * DAY) == []


def test_prune_max_bytes_removes_oldest_until_under_the_limit(populated):
    root, _ = populated
    entries = list_entries(root)
    total = sum(e.size for e in entries)
    removed = prune(root, max_bytes=total - entries[0].size - entries[1].size + 1)
    assert [e.key for e in removed] == [entries[0].key, entries[1].key]
    assert sum(e.size for e in list_entries(root)) <= total - entries[0].size - entries[1].size
    assert prune(root, max_bytes=10**12) == []
    assert len(prune(root, max_bytes=0)) == 2
    assert list_entries(root) == [] and _blob_names(root) == set()


def test_two_prunes_at_once_do_not_trip_over_each_other(populated):
    root, _ = populated
    entries = list_entries(root)
    store = CacheStore(root)
    for entry in entries:  # another prune removed everything first
        store.remove(entry)
        if entry.blob:
            store.remove_blob(entry.blob)
    for entry in entries:  # this one's deletes now find nothing: harmless
        store.remove(entry)
        if entry.blob:
            store.remove_blob(entry.blob)
    assert list_entries(root) == []


# --- leftovers: what a killed writer leaves ---------------------------------------------------

TEMPORARY, UNNAMED = "a killed writer's temporary file", "a blob no record names"

# A put SIGKILLed at the rename of its blob or of its record: a crash, from outside the store.
KILLED_PUT = """
import os, signal, sys
from trainflow.tasks.data.splits import split_indices
from trainflow.tasks.cache.store import CacheStore

root, at, key = sys.argv[1:]
real_replace = os.replace

def replace(src, dst, *args, **kwargs):
    if os.path.basename(os.fspath(dst)).endswith({"blob": ".safetensors", "record": ".json"}[at]):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *args, **kwargs)

os.replace = replace
CacheStore(root).put(key, split_indices(10, 0.3, 5))
"""


def _age(root: str, relative: str, seconds: float) -> None:
    """Make a file under the root `seconds` older, as time passing would."""
    fs, base = _fs(root)
    path = f"{base}/{relative}"
    if CacheStore(root).local:
        when = os.stat(path).st_mtime - seconds
        os.utime(path, (when, when))
    else:
        fs.store[path].modified -= timedelta(seconds=seconds)


def _leftovers(root: str) -> list[tuple[str, str]]:
    return sorted((e.key, e.leftover) for e in list_entries(root) if e.leftover)


@pytest.mark.system  # a child process of its own
@pytest.mark.parametrize("killed_at", ["blob", "record"])
def test_a_writer_killed_mid_put_leaves_leftovers_that_list_shows_and_prune_removes(
    tmp_path, killed_at, capsys
):
    root = str(tmp_path / "c")
    kept = split_indices(10, 0.3, 1)
    _put(root, _key("split", 1), kept, time.time() - DAY)
    child = subprocess.run(
        [sys.executable, "-c", KILLED_PUT, root, killed_at, _key("split", 2)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    found = _leftovers(root)
    if killed_at == "blob":  # its temporary blob, never renamed
        [(key, why)] = found
        assert key.startswith("blobs/.tmp-") and why == TEMPORARY
    else:  # its blob, renamed, and its record's temporary file
        [(blob, blob_why), (record, record_why)] = found
        assert re.fullmatch(r"blobs/[0-9a-f]{32}\.safetensors", blob) and blob_why == UNNAMED
        assert record.startswith(f"records/.{_key('split', 2)}.json.") and record.endswith(".tmp")
        assert record_why == TEMPORARY
    assert cache_cli.main(["--cache-dir", root, "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum(
        line.endswith(f"({TEMPORARY})") or line.endswith(f"({UNNAMED})") for line in lines
    ) == len(found)
    assert f"; {len(found)} of them leftovers (" in lines[-1]

    # Young, a leftover may be a writer's at work: no prune touches it, whatever its limits.
    entries = [e for e in list_entries(root) if not e.leftover]
    assert prune(root, max_bytes=0) == entries
    assert _leftovers(root) == found
    _put(root, _key("split", 1), kept, time.time() - DAY)
    for key, _ in found:
        _age(root, key, LEFTOVER_AGE_S + 60)
    # Old, it is of no use to any run: the gentlest prune removes it, and only it.
    removed = prune(root, older_than_s=30 * DAY)
    assert sorted(e.key for e in removed) == [key for key, _ in found]
    assert _leftovers(root) == [] and [e.key for e in list_entries(root)] == [_key("split", 1)]
    _assert_same(CacheStore(root).get(_key("split", 1), Split), kept)
    fs, base = _fs(root)
    assert all(not Path(p).name.startswith(".") for p in fs.find(base))
    # The killed put, again: the leftovers were never what it trusts.
    CacheStore(root).put(_key("split", 2), split_indices(10, 0.3, 5))
    _assert_same(CacheStore(root).get(_key("split", 2), Split), split_indices(10, 0.3, 5))


def _an_old_unnamed_blob(root: str) -> tuple[Split, str]:
    """A value's blob, hours old, whose record was pruned: a leftover of an equal output."""
    value = split_indices(10, 0.3, 7)
    store = CacheStore(root)
    store.put(_key("split", 1), value)
    [entry] = list_entries(root)
    store.remove(entry)
    _age(root, f"blobs/{entry.blob}.safetensors", LEFTOVER_AGE_S + 60)
    return value, entry.blob


def test_a_prune_between_a_blob_and_its_record_keeps_the_blob(root, monkeypatch):
    """Another process prunes at the worst moment of a put: its blob is renamed, its record
    not yet written. The blob was already there for hours (an equal output, whose record was
    pruned), so only the fresh mtime the put's rewrite gives it keeps it."""
    value, blob = _an_old_unnamed_blob(root)
    store = CacheStore(root)
    assert _leftovers(root) == [(f"blobs/{blob}.safetensors", UNNAMED)]

    pruned: list = []
    real_write = CacheStore.write

    def write(self, path, data):
        if "/records/" in path:
            pruned.extend(prune(root, max_bytes=10**12))
        return real_write(self, path, data)

    monkeypatch.setattr(CacheStore, "write", write)
    store.put(_key("split", 2), value)
    assert pruned == []
    _assert_same(CacheStore(root).get(_key("split", 2), Split), value)


def test_a_put_landing_between_a_prunes_listing_and_its_delete_keeps_its_blob(root, monkeypatch):
    """The same blob, old and unnamed when a prune lists it, is written again by an equal
    output before the prune gets to delete it: the prune sees the new file and keeps it."""
    value, _ = _an_old_unnamed_blob(root)
    real_list = prune_module.list_entries

    def list_then_put(url):
        listed = real_list(url)
        assert [e.leftover for e in listed] == [UNNAMED]
        CacheStore(root).put(_key("split", 2), value)  # another process's put, right now
        return listed

    monkeypatch.setattr(prune_module, "list_entries", list_then_put)
    assert prune(root, max_bytes=10**12) == []
    _assert_same(CacheStore(root).get(_key("split", 2), Split), value)


def test_old_leftovers_go_before_any_entry_under_max_size(populated):
    root, _ = populated
    entries = list_entries(root)
    unique_blobs = {e.blob: e.blob_size for e in entries}  # a shared blob counts once
    total = sum(e.record_size for e in entries) + sum(unique_blobs.values())
    fs, base = _fs(root)
    fs.pipe_file(f"{base}/blobs/{'ab' * 16}.safetensors", b"\0" * 5000)
    _age(root, f"blobs/{'ab' * 16}.safetensors", LEFTOVER_AGE_S + 60)
    foreign = f"{base}/blobs/README"  # not a name trainflow writes: never listed, never removed
    fs.pipe_file(foreign, b"mine")
    removed = prune(root, max_bytes=total)
    assert [(e.key, e.leftover) for e in removed] == [(f"blobs/{'ab' * 16}.safetensors", UNNAMED)]
    assert list_entries(root) == entries and fs.exists(foreign)


# --- flows/cache_cli.py -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [("10GB", 10**10), ("500mb", 500 * 10**6), ("1.5k", 1500), ("42", 42), (" 2 TB ", 2 * 10**12)],
)
def test_parse_size(text, size):
    assert cache_cli.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GB", "ten", "10XB", "-1GB", "1e9"])
def test_parse_size_rejects_bad_sizes(text):
    with pytest.raises(cache_cli.argparse.ArgumentTypeError):
        cache_cli.parse_size(text)


@pytest.mark.parametrize(
    ("text", "seconds"), [("7d", 7 * 86400), ("12h", 43200), ("2w", 1209600), ("90s", 90)]
)
def test_parse_age(text, seconds):
    assert cache_cli.parse_age(text) == seconds


@pytest.mark.parametrize("text", ["7", "7y", "d", "-1d"])
def test_parse_age_rejects_bad_ages(text):
    with pytest.raises(cache_cli.argparse.ArgumentTypeError):
        cache_cli.parse_age(text)


def test_cli_list_prints_one_line_per_entry_and_a_summary(populated, capsys):
    root, _ = populated
    assert cache_cli.main(["--cache-dir", root, "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5
    assert lines[0].endswith(_key("split", 1))
    assert lines[-1].startswith("4 entries, ") and lines[-1].endswith(f" in {root}")


def test_cli_list_of_an_empty_cache(capsys):
    assert cache_cli.main(["--cache-dir", "nothing-here", "list"]) == 0
    assert capsys.readouterr().out.strip() == "0 entries, 0 B in nothing-here"


def test_cli_prune_needs_an_option(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cache_cli.main(["--cache-dir", str(tmp_path), "prune"])
    assert exit_info.value.code == 2
    assert "--older-than" in capsys.readouterr().err


def test_cli_prune_removes_old_entries(populated, capsys):
    root, _ = populated
    assert cache_cli.main(["--cache-dir", root, "prune", "--older-than", "3d"]) == 0
    assert capsys.readouterr().out.startswith("removed 2 entries, ")
    assert len(list_entries(root)) == 2
