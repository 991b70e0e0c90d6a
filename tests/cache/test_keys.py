"""Cache keys (tasks/cache/keys.py): a key changes exactly when a stage's inputs could change its
output. The code part of a key is tests/cache/test_code_keys.py's."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

from trainflow.tasks.cache import keys
from trainflow.tasks.cache.keys import NoCacheKey, file_digest, fingerprint, stage_key
from trainflow.tasks.cache.store import KEY
from trainflow.tasks.data.splits import split_indices
from trainflow.tasks.engine.models import ModelSpec

# --- input fingerprints and stage keys ----------------------------------------------------

SPLIT_INPUTS = {"n": 100, "val_fraction": 0.2, "seed": 13}


def test_stage_key_format_and_sensitivity():
    key = stage_key("split", split_indices, SPLIT_INPUTS)
    assert KEY.fullmatch(key) and key.startswith("split-")
    assert stage_key("split", split_indices, dict(reversed(SPLIT_INPUTS.items()))) == key
    assert stage_key("split", split_indices, {**SPLIT_INPUTS, "seed": 14}) != key
    assert stage_key("load-tensors", split_indices, SPLIT_INPUTS) != key


def test_equal_tensors_have_equal_fingerprints():
    a = torch.randn(3, 4)
    assert fingerprint(a) == fingerprint(a.clone())
    assert fingerprint(a) == fingerprint(a.t().contiguous().t())  # layout is not identity
    assert json.dumps(fingerprint(a))


@pytest.mark.parametrize(
    "other",
    [lambda a: a + 1, lambda a: a.double(), lambda a: a.reshape(4, 3)],
    ids=["values", "dtype", "shape"],
)
def test_a_tensor_fingerprint_covers_values_dtype_and_shape(other):
    a = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert fingerprint(a) != fingerprint(other(a))


def test_an_upstream_output_is_represented_by_its_key():
    keyed = dataclasses.replace(split_indices(10, 0.3, 13), cache_key="split-" + "a" * 40)
    assert fingerprint(keyed) == {"artifact": "split-" + "a" * 40}
    other = dataclasses.replace(split_indices(10, 0.3, 14), cache_key=keyed.cache_key)
    assert fingerprint(other) == fingerprint(keyed)


def test_a_dataclass_without_a_key_is_fingerprinted_by_its_fields():
    assert fingerprint(split_indices(10, 0.3, 13)) == fingerprint(split_indices(10, 0.3, 13))
    assert fingerprint(split_indices(10, 0.3, 13)) != fingerprint(split_indices(10, 0.3, 14))
    assert fingerprint(ModelSpec("mlp", 3, 2, (4,)))["type"] == "ModelSpec"


def test_dict_order_does_not_matter():
    a, b = fingerprint({"a": 1, "b": [2, 3]}), fingerprint({"b": [2, 3], "a": 1})
    assert json.dumps(a) == json.dumps(b)


@pytest.mark.parametrize("value", [object(), {"x": object()}, [1, lambda: 0]])
def test_an_input_without_a_stable_fingerprint_raises_no_cache_key(value):
    with pytest.raises(NoCacheKey):
        fingerprint(value)


# --- file digests: content, never name, never a stale memo ---------------------------------


def test_a_digest_is_of_the_bytes_not_the_name(tmp_path):
    data = os.urandom(4096)
    (tmp_path / "one.bin").write_bytes(data)
    (tmp_path / "two.bin").write_bytes(data)
    (tmp_path / "three.bin").write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    assert file_digest(tmp_path / "one.bin") == file_digest(tmp_path / "two.bin")
    assert file_digest(tmp_path / "three.bin") != file_digest(tmp_path / "one.bin")


def _same_size_same_mtime_edit(path: Path, new: bytes) -> None:
    """Rewrite `path` in place, keeping its size and putting its mtime back: what a careless
    tool, or a second edit inside one timestamp tick, leaves behind."""
    before = path.stat()
    assert len(new) == before.st_size
    with open(path, "r+b") as f:
        f.write(new)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def test_a_same_size_same_mtime_edit_of_a_settled_file_changes_the_digest(tmp_path, monkeypatch):
    path = tmp_path / "data.csv"
    path.write_bytes(b"a,b\n1,2\n")
    later = keys.time.time() + 10 * keys.SETTLE_S  # the clock says the file has settled
    monkeypatch.setattr(keys.time, "time", lambda: later)
    first = file_digest(path)
    assert first in keys._digests.values()  # memoised: the edit below must get past the memo
    _same_size_same_mtime_edit(path, b"a,b\n1,3\n")
    assert file_digest(path) != first


def test_a_file_edited_within_the_settle_window_is_never_memoised(tmp_path, monkeypatch):
    # A fresh file's ctime is now: two edits inside one tick could leave (size, mtime, ctime)
    # equal, so its digest must be recomputed on every call.
    path = tmp_path / "data.csv"
    path.write_bytes(b"a,b\n1,2\n")
    first = file_digest(path)
    frozen = path.stat()
    monkeypatch.setattr(os, "stat", lambda p, **kw: frozen)  # every field as before the edit
    with open(path, "r+b") as f:
        f.write(b"a,b\n1,3\n")
    assert file_digest(path) != first
