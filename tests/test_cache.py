"""Unit tests of tasks/cache.py: keys, fingerprints, the serializer, storage, listing, pruning."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import json
import linecache
import os
import pickle
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch

import tasks.cache as cache
from flows import cache_cli
from tasks.cache import (
    KEY_PATTERN,
    ArtifactSerializer,
    CacheStorage,
    CorruptEntry,
    NoCacheKey,
    code_fingerprint,
    content_digest,
    fingerprint,
    list_entries,
    prune,
    stage_key,
)
from tasks.data import Dataset, data_identity, load_tensors
from tasks.export import Exported
from tasks.model import ModelSpec, initial_model
from tasks.split import Split, split_indices
from tasks.train import Trained

from .conftest import REPO

# --- helpers ------------------------------------------------------------------------------


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
    fs, path = fsspec.core.url_to_fs(root)
    return fs, (os.path.abspath(path) if root.startswith("/") else path.rstrip("/"))


def _rewrite(fs: Any, path: str, data: bytes) -> None:
    """Replace a file's bytes; locally, also move its mtime on so no memo can mask the edit."""
    if "memory" in fs.protocol:
        fs.pipe_file(path, data)
        return
    old = os.stat(path).st_mtime_ns
    Path(path).write_bytes(data)
    os.utime(path, ns=(old + 10**9, old + 10**9))


def _only_blob(root: str) -> tuple[Any, str]:
    fs, base = _fs(root)
    blobs = fs.glob(f"{base}/blobs/*.safetensors")
    assert len(blobs) == 1, blobs
    return fs, blobs[0]


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


SPEC = ModelSpec("mlp", 3, 2, (4,))


def _dataset() -> Dataset:
    x = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    return Dataset(x, x.sum(1, keepdim=True), ("a", "b", "c"), ("t",))


def _trained() -> Trained:
    return Trained(SPEC, initial_model(SPEC, 1).state, [1.0, 0.5], [1.5, 0.75], 2)


ARTIFACT_FACTORIES = {
    "Dataset": _dataset,
    "Split": lambda: split_indices(10, 0.3, 13),
    "InitialModel": lambda: initial_model(SPEC, 0),
    "Trained": _trained,
    "Exported": lambda: Exported(b"\x00\x01program\xff" * 7, b"graph-events"),
}


# --- 1. code fingerprints -----------------------------------------------------------------

FAKE_A = """\
import fakeproj.b as b
from fakeproj.b import helper_y


def stage_one(n):
    return b.helper_x(n)


def stage_two(n):
    return helper_y(n)
"""


def _fake_b(deeper: str = "n + 1", const: int = 3) -> str:
    return f"""\
CONST = {const}


def deeper_z(n):
    return {deeper}


def helper_x(n):
    return sum(deeper_z(k) for k in (n,)) * 2  # reached from a nested code object


def helper_y(n):
    return n + CONST
"""


def _forget_fakeproj() -> None:
    for name in [m for m in sys.modules if m == "fakeproj" or m.startswith("fakeproj.")]:
        del sys.modules[name]


@pytest.fixture
def fakeproj(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """load(**b_options) -> fakeproj.a, freshly written and imported."""
    pkg = tmp_path / "fakeproj"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text(FAKE_A)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # no stale .pyc within one second

    def load(**b_options: Any) -> Any:
        (pkg / "b.py").write_text(_fake_b(**b_options))
        _forget_fakeproj()
        importlib.invalidate_caches()
        linecache.clearcache()
        return importlib.import_module("fakeproj.a")

    yield load
    _forget_fakeproj()


def _stage_prints(a: Any, packages: tuple[str, ...] = ("fakeproj",)) -> tuple[str, str]:
    return code_fingerprint(a.stage_one, packages), code_fingerprint(a.stage_two, packages)


def test_editing_a_transitive_helper_changes_only_the_stage_that_reaches_it(fakeproj):
    one, two = _stage_prints(fakeproj())
    assert one != two
    assert fakeproj().stage_one(1) == 4
    one_after, two_after = _stage_prints(fakeproj(deeper="n + 100"))
    assert fakeproj(deeper="n + 100").stage_one(1) == 202  # the edit really was imported
    assert one_after != one
    assert two_after == two


def test_editing_a_module_constant_changes_only_the_stage_that_reads_it(fakeproj):
    one, two = _stage_prints(fakeproj())
    one_after, two_after = _stage_prints(fakeproj(const=4))
    assert one_after == one
    assert two_after != two


def test_code_outside_the_project_packages_is_not_followed(fakeproj):
    before = _stage_prints(fakeproj(), packages=("elsewhere",))
    after = _stage_prints(fakeproj(deeper="n + 100", const=4), packages=("elsewhere",))
    assert after == before


def test_code_fingerprint_of_a_real_task_is_deterministic():
    first = code_fingerprint(load_tensors)
    cache._code_fingerprint.cache_clear()
    assert code_fingerprint(load_tensors) == first
    assert code_fingerprint(load_tensors.fn) == first
    assert re.fullmatch(r"[0-9a-f]{64}", first), first  # a hex digest, not a repr


FRESH_PROCESS = """\
import json
import tasks.data, tasks.export, tasks.model, tasks.split, tasks.train
from tasks.cache import code_fingerprint, stage_key

print(json.dumps({
    "code": {t.name: code_fingerprint(t) for t in (
        tasks.data.load_tensors, tasks.split.split, tasks.model.build_model,
        tasks.train.train_epochs, tasks.export.export_graph)},
    "key": stage_key("split", tasks.split.split.fn,
                     {"n_rows": 100, "val_fraction": 0.2, "seed": 13}),
}))
"""


@pytest.fixture(scope="module")
def fresh_process() -> dict[str, Any]:
    env = {**os.environ, "PYTHONHASHSEED": "4242"}
    done = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_stage_code_fingerprints_are_the_same_in_a_fresh_process(fresh_process):
    import tasks.export
    import tasks.model
    import tasks.split
    import tasks.train

    here = {
        t.name: code_fingerprint(t)
        for t in (
            load_tensors,
            tasks.split.split,
            tasks.model.build_model,
            tasks.train.train_epochs,
            tasks.export.export_graph,
        )
    }
    assert here == fresh_process["code"]
    assert len(set(here.values())) == len(here)


# --- 2. input fingerprints and stage keys -------------------------------------------------


def test_equal_tensors_have_equal_fingerprints():
    a = torch.randn(3, 4)
    assert fingerprint(a) == fingerprint(a.clone())
    assert fingerprint(a) == fingerprint(a.t().contiguous().t())  # layout is not identity
    assert json.dumps(fingerprint(a))


@pytest.mark.parametrize(
    "other",
    [
        pytest.param(lambda a: a + 1, id="values"),
        pytest.param(lambda a: a.double(), id="dtype"),
        pytest.param(lambda a: a.reshape(4, 3), id="shape"),
    ],
)
def test_tensor_fingerprint_covers_values_dtype_and_shape(other):
    a = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert fingerprint(a) != fingerprint(other(a))


def test_an_upstream_output_is_represented_by_its_cache_key():
    split = split_indices(10, 0.3, 13)
    keyed = dataclasses.replace(split, cache_key="split-" + "a" * 40)
    assert fingerprint(keyed) == {"artifact": "split-" + "a" * 40}
    other_values = dataclasses.replace(split_indices(10, 0.3, 14), cache_key=keyed.cache_key)
    assert fingerprint(other_values) == fingerprint(keyed)


def test_a_dataclass_without_cache_key_is_fingerprinted_by_its_fields():
    split = split_indices(10, 0.3, 13)
    assert fingerprint(split) == fingerprint(split_indices(10, 0.3, 13))
    assert fingerprint(split) != fingerprint(split_indices(10, 0.3, 14))
    assert fingerprint(SPEC)["type"] == "ModelSpec"


def test_dict_order_does_not_matter():
    a, b = fingerprint({"a": 1, "b": [2, 3]}), fingerprint({"b": [2, 3], "a": 1})
    assert json.dumps(a) == json.dumps(b)
    assert fingerprint((1, 2)) == fingerprint([1, 2])


@pytest.mark.parametrize("value", [object(), {"x": object()}, [1, lambda: 0]])
def test_an_unsupported_input_raises_no_cache_key(value):
    with pytest.raises(NoCacheKey):
        fingerprint(value)


SPLIT_INPUTS = {"n_rows": 100, "val_fraction": 0.2, "seed": 13}


def test_stage_key_format_and_sensitivity():
    import tasks.split

    key = stage_key("split", tasks.split.split.fn, SPLIT_INPUTS)
    assert KEY_PATTERN.fullmatch(key) and key.startswith("split-")
    assert stage_key("split", tasks.split.split.fn, dict(reversed(SPLIT_INPUTS.items()))) == key
    assert stage_key("split", tasks.split.split.fn, {**SPLIT_INPUTS, "seed": 14}) != key
    assert stage_key("load-tensors", tasks.split.split.fn, SPLIT_INPUTS) != key


def test_stage_key_is_the_same_in_a_fresh_process(fresh_process):
    import tasks.split

    assert stage_key("split", tasks.split.split.fn, SPLIT_INPUTS) == fresh_process["key"]


# --- 3. content digests and data identity ------------------------------------------------


def test_content_digest_is_by_bytes_not_by_name(tmp_path):
    data = os.urandom(4096)
    (tmp_path / "one.bin").write_bytes(data)
    (tmp_path / "two.bin").write_bytes(data)
    (tmp_path / "three.bin").write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    assert content_digest("one.bin") == content_digest(str(tmp_path / "two.bin"))
    assert content_digest("three.bin") != content_digest("one.bin")


def test_content_digest_of_a_memory_url():
    base = f"memory://digest-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    try:
        with fsspec.open(f"{base}/a.csv", "wb") as f:
            f.write(b"x,y\n1,2\n")
        with fsspec.open(f"{base}/b.csv", "wb") as f:
            f.write(b"x,y\n1,2\n")
        with fsspec.open(f"{base}/c.csv", "wb") as f:
            f.write(b"x,y\n1,3\n")
        assert content_digest(f"{base}/a.csv") == content_digest(f"{base}/b.csv")
        assert content_digest(f"{base}/a.csv") != content_digest(f"{base}/c.csv")
        (tmp := Path("local.csv")).write_bytes(b"x,y\n1,2\n")
        assert content_digest(str(tmp)) == content_digest(f"{base}/a.csv")
    finally:
        fs.rm(fsspec.core.url_to_fs(base)[1], recursive=True)


@pytest.mark.parametrize(
    "url",
    ["missing.csv", ".", "memory://nowhere-at-all/missing.csv"],
    ids=["missing", "directory", "memory"],
)
def test_an_unreadable_source_raises_no_cache_key(url):
    with pytest.raises(NoCacheKey):
        content_digest(url)


def _inputs(source: str, **overrides: Any) -> dict[str, Any]:
    base = {"source": source, "target": (), "n_samples": 100, "data_seed": 42, "noise": 0.1}
    return {**base, **overrides}


CSV = "a,b,y\n1,2,3\n4,5,6\n7,8,9\n"


def test_data_identity_follows_a_files_content_not_its_name(tmp_path):
    Path("data.csv").write_text(CSV)
    shutil.copy("data.csv", "renamed.csv")
    Path("edited.csv").write_text(CSV.replace("5", "50"))
    identity = data_identity(_inputs("data.csv"))
    assert data_identity(_inputs(str(tmp_path / "renamed.csv"))) == identity
    assert data_identity(_inputs("edited.csv")) != identity


def test_editing_a_cell_in_place_changes_the_identity():
    path = Path("data.csv")
    path.write_text(CSV)
    before = data_identity(_inputs("data.csv"))
    _rewrite(fsspec.filesystem("file"), str(path.absolute()), CSV.replace("5", "6").encode())
    assert data_identity(_inputs("data.csv")) != before


def test_a_files_identity_ignores_the_synthetic_recipe_but_keeps_the_target():
    Path("data.csv").write_text(CSV)
    identity = data_identity(_inputs("data.csv"))
    assert data_identity(_inputs("data.csv", n_samples=5, data_seed=1, noise=0.5)) == identity
    assert data_identity(_inputs("data.csv", target=("b",))) != identity


def test_synthetic_identity_ignores_the_target_but_keeps_the_recipe():
    identity = data_identity(_inputs("synthetic"))
    assert data_identity(_inputs("synthetic", target=("y",))) == identity
    for change in ({"n_samples": 5}, {"data_seed": 1}, {"noise": 0.5}):
        assert data_identity(_inputs("synthetic", **change)) != identity


def test_data_identity_of_a_missing_file_raises_no_cache_key():
    with pytest.raises(NoCacheKey):
        data_identity(_inputs("absent.csv"))


# --- 4. the artifact serializer -----------------------------------------------------------


@pytest.mark.parametrize("name", ARTIFACT_FACTORIES)
def test_serializer_round_trips_every_stage_output(name, root):
    obj = ARTIFACT_FACTORIES[name]()
    serializer = ArtifactSerializer(root=root)
    data = serializer.dumps(obj)
    manifest = json.loads(data)
    assert manifest["artifact"] == name and manifest["format"] == cache.FORMAT
    assert set(manifest["blob"]) == {"xxh3", "size"}
    _assert_same(ArtifactSerializer(root=root).loads(data), obj)
    _assert_same(serializer.loads(data), obj)  # a second read (Prefect reads twice)


def test_equal_outputs_share_one_blob(root):
    serializer = ArtifactSerializer(root=root)
    first = json.loads(serializer.dumps(split_indices(10, 0.3, 13)))
    second = json.loads(serializer.dumps(split_indices(10, 0.3, 13)))
    third = json.loads(serializer.dumps(split_indices(10, 0.3, 14)))
    assert first["blob"] == second["blob"] != third["blob"]
    fs, base = _fs(root)
    assert len(fs.glob(f"{base}/blobs/*.safetensors")) == 2
    assert not [p for p in fs.ls(f"{base}/blobs") if ".tmp-" in p]


def test_serializer_refuses_an_unregistered_type(tmp_path):
    impostor = dataclasses.make_dataclass("Split", [("train", torch.Tensor), ("val", torch.Tensor)])
    assert impostor.__qualname__ == Split.__qualname__  # same name, not the registered class
    serializer = ArtifactSerializer(root=str(tmp_path / "c"))
    for obj in (impostor(torch.arange(3), torch.arange(2)), {"x": torch.zeros(1)}, 42):
        with pytest.raises(TypeError, match="not a registered"):
            serializer.dumps(obj)


@pytest.mark.parametrize(
    "manifest",
    [
        {"format": 1, "artifact": "Unknown", "meta": {}, "blob": {"xxh3": "0" * 32, "size": 0}},
        {"format": 99, "artifact": "Split", "meta": {}, "blob": {"xxh3": "0" * 32, "size": 0}},
        {"format": 1, "artifact": "Split", "meta": {}, "blob": {"xxh3": "../../etc", "size": 0}},
        {"format": 1, "artifact": "Split", "meta": {}, "blob": {"xxh3": "0" * 32}},
        {},
        [],
        None,
    ],
    ids=["unknown-artifact", "other-format", "bad-blob-name", "no-size", "empty", "list", "null"],
)
def test_serializer_refuses_a_foreign_manifest(manifest, tmp_path):
    assert issubclass(CorruptEntry, ValueError)
    with pytest.raises(CorruptEntry):
        ArtifactSerializer(root=str(tmp_path / "c")).loads(json.dumps(manifest).encode())


def test_serializer_refuses_bytes_that_are_not_json(tmp_path):
    with pytest.raises(CorruptEntry):
        ArtifactSerializer(root=str(tmp_path / "c")).loads(b"\x80\x04garbage")


# --- 5. corrupted blobs -------------------------------------------------------------------


def _dumped_and_loaded_once(root: str) -> tuple[ArtifactSerializer, bytes]:
    serializer = ArtifactSerializer(root=root)
    data = serializer.dumps(initial_model(SPEC, 0))
    serializer.loads(data)  # verified once: the memo must not hide what happens next
    return serializer, data


def test_a_truncated_blob_is_a_corrupt_entry(root):
    serializer, data = _dumped_and_loaded_once(root)
    fs, blob = _only_blob(root)
    _rewrite(fs, blob, fs.cat_file(blob)[:-7])
    with pytest.raises(CorruptEntry, match="truncated"):
        serializer.loads(data)


def test_a_flipped_byte_in_a_blob_is_a_corrupt_entry(root):
    serializer, data = _dumped_and_loaded_once(root)
    fs, blob = _only_blob(root)
    content = bytearray(fs.cat_file(blob))
    content[len(content) // 2] ^= 0x01
    _rewrite(fs, blob, bytes(content))
    with pytest.raises(CorruptEntry):
        serializer.loads(data)


def test_a_missing_blob_is_a_corrupt_entry(root):
    serializer, data = _dumped_and_loaded_once(root)
    fs, blob = _only_blob(root)
    fs.rm_file(blob)
    with pytest.raises(CorruptEntry):
        serializer.loads(data)


def test_a_blob_replaced_by_another_file_is_a_corrupt_entry(tmp_path):
    serializer, data = _dumped_and_loaded_once(str(tmp_path / "c"))
    _, blob = _only_blob(str(tmp_path / "c"))
    original = Path(blob).read_bytes()
    os.remove(blob)
    Path(blob).write_bytes(original[:-1] + bytes([original[-1] ^ 0x20]))  # a new inode
    with pytest.raises(CorruptEntry):
        serializer.loads(data)


# --- 6. cache storage ---------------------------------------------------------------------

KEY = "split-" + "0123456789" * 4


def _record(serializer_type: str = "trainflow-artifact", result: str = "{}") -> bytes:
    record = {"metadata": {"serializer": {"type": serializer_type}}, "result": result}
    return json.dumps(record).encode()


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def test_storage_round_trips_a_trainflow_record(root):
    storage = CacheStorage(root=root)
    record = _record()
    written = storage.write_path(KEY, record)
    assert written.endswith(f"records/{KEY}")
    assert storage.read_path(KEY) == record
    assert storage.read_path(written) == record  # Prefect may pass the full path back
    other = _record(result="[1]")
    assert storage.write_path(f"some/prefix/{KEY}", other) == written  # replaces in place
    assert asyncio.run(storage.aread_path(KEY)) == other
    asyncio.run(storage.awrite_path(KEY, record))
    assert storage.read_path(KEY) == record


def test_write_path_leaves_only_the_final_file(tmp_path):
    storage = CacheStorage(root=str(tmp_path / "c"))
    storage.write_path(KEY, _record())
    storage.write_path(KEY, _record())
    assert os.listdir(tmp_path / "c" / "records") == [KEY]
    assert os.listdir(tmp_path / "c") == ["records"]


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(_record("pickle"), id="pickle-serializer"),
        pytest.param(_record("json"), id="json-serializer"),
        pytest.param(b'{"metadata": {}}', id="no-serializer"),
        pytest.param(b"[1, 2]", id="json-list"),
        pytest.param(b"\x80\x04not json at all", id="garbage"),
        pytest.param(b"", id="empty"),
    ],
)
def test_read_path_refuses_anything_but_a_trainflow_record(content, root):
    storage = CacheStorage(root=root)
    storage.write_path(KEY, content)
    with pytest.raises(CorruptEntry):
        storage.read_path(KEY)


def test_read_path_never_unpickles_a_raw_pickle(root, tmp_path):
    marker = tmp_path / "pwned"
    storage = CacheStorage(root=root)
    storage.write_path(KEY, pickle.dumps(_Exploit(marker)))
    with pytest.raises(CorruptEntry):
        storage.read_path(KEY)
    assert not marker.exists()


def test_read_path_refuses_a_name_that_is_not_a_stage_key(tmp_path):
    storage = CacheStorage(root=str(tmp_path / "c"))
    for name in ("e3b0c44298fc1c149afbf4c8996fb924", "Split-" + "0" * 40, KEY + "0"):
        storage.write_path(name, _record())
        with pytest.raises(CorruptEntry):
            storage.read_path(name)


def test_read_path_of_a_missing_key_is_a_plain_miss(root):
    with pytest.raises(FileNotFoundError):
        CacheStorage(root=root).read_path(KEY)


# --- 7. listing and pruning ---------------------------------------------------------------

DAY = 86400.0


def _put_entry(root: str, key: str, obj: Any, created: float) -> None:
    manifest = json.loads(ArtifactSerializer(root=root).dumps(obj))
    manifest["created"] = created
    CacheStorage(root=root).write_path(key, _record(result=json.dumps(manifest)))


def _key(stage: str, n: int) -> str:
    return f"{stage}-{n:040x}"


@pytest.fixture
def populated(root: str) -> tuple[str, float]:
    """Four entries, 10, 5, 2 and 0.1 days old; the oldest and the newest share a blob."""
    now = cache.time.time()
    _put_entry(root, _key("split", 1), split_indices(10, 0.3, 1), now - 10 * DAY)
    _put_entry(root, _key("build-model", 2), initial_model(SPEC, 0), now - 5 * DAY)
    _put_entry(root, _key("load-tensors", 3), _dataset(), now - 2 * DAY)
    _put_entry(root, _key("split", 4), split_indices(10, 0.3, 1), now - 0.1 * DAY)
    return root, now


def _blob_names(root: str) -> set[str]:
    fs, base = _fs(root)
    return {Path(p).name.removesuffix(".safetensors") for p in fs.glob(f"{base}/blobs/*")}


def test_list_entries_oldest_first_with_sizes(populated):
    root, now = populated
    entries = list_entries(root)
    assert [e.key for e in entries] == [_key("split", 1), _key("build-model", 2),
                                        _key("load-tensors", 3), _key("split", 4)]  # fmt: skip
    assert entries[0].created == pytest.approx(now - 10 * DAY)
    assert entries[0].blob == entries[3].blob != entries[1].blob
    assert {e.blob for e in entries} == _blob_names(root)
    fs, base = _fs(root)
    for e in entries:
        record = fs.size(f"{base}/records/{e.key}")
        assert e.size == record + fs.size(f"{base}/blobs/{e.blob}.safetensors")


def test_list_entries_of_an_empty_or_missing_cache(root):
    assert list_entries(root) == []


def test_list_entries_skips_foreign_names_and_puts_unreadable_records_first(populated):
    root, _ = populated
    storage = CacheStorage(root=root)
    storage.write_path("not-a-key", _record())
    storage.write_path(_key("split", 9), b"garbage")
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
    # The 10-day-old split's blob is shared with the kept newest entry: it stays.
    kept = {before[_key("load-tensors", 3)].blob, before[_key("split", 4)].blob}
    assert _blob_names(root) == kept
    assert prune(root, older_than_s=3 * DAY) == []


def test_a_kept_entry_sharing_a_pruned_entrys_blob_still_loads(populated):
    root, _ = populated
    prune(root, older_than_s=DAY)
    fs, base = _fs(root)
    record = json.loads(fs.cat_file(f"{base}/records/{_key('split', 4)}"))
    loaded = ArtifactSerializer(root=root).loads(record["result"].encode())
    _assert_same(loaded, split_indices(10, 0.3, 1))


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


def test_prune_combines_age_and_size(populated):
    root, _ = populated
    entries = list_entries(root)
    removed = prune(root, older_than_s=7 * DAY, max_bytes=entries[-1].size)
    assert [e.key for e in removed] == [e.key for e in entries[:3]]


# --- 8. flows/cache_cli.py ----------------------------------------------------------------


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
