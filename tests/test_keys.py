"""Cache keys (tasks/keys.py): a key changes exactly when a stage's output could change."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import json
import linecache
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from tasks import keys
from tasks.keys import NoCacheKey, code_fingerprint, file_digest, fingerprint, stage_key
from tasks.model import ModelSpec
from tasks.split import split_indices
from tasks.store import KEY

from .conftest import REPO

# --- code fingerprints: a throwaway project, edited and re-imported ------------------------

HELPERS = '''\
"""Helpers of the fake project."""
import torch.nn as nn

CONST = 3
LOSSES = {"mse": nn.MSELoss, "l1": nn.L1Loss}


class Base:
    scale = 2

    def shape(self, n):
        return n * self.scale


class Model(Base):
    def run(self, n):
        return self.shape(n) + 1


def deeper(n):
    return n + 1


def helper_x(n):
    return sum(deeper(k) for k in (n,)) * 2  # reached from a nested code object


def helper_y(n):
    return n + CONST
'''

STAGES = """\
import fakeproj.helpers as helpers
from fakeproj.helpers import LOSSES, Model, helper_y


def stage_one(n):
    return helpers.helper_x(n)


def stage_two(n):
    return helper_y(n)


def stage_loss(name):
    return LOSSES[name]


def stage_model(n):
    return Model().run(n)
"""


@pytest.fixture
def fakeproj(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """load(helpers_source) -> {stage name: fingerprint}, freshly written and imported."""
    package = tmp_path / "fakeproj"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "stages.py").write_text(STAGES)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # no stale .pyc within one second

    def load(helpers: str = HELPERS) -> dict[str, str]:
        (package / "helpers.py").write_text(helpers)
        for name in [m for m in sys.modules if m.split(".")[0] == "fakeproj"]:
            del sys.modules[name]
        importlib.invalidate_caches()
        linecache.clearcache()
        stages = importlib.import_module("fakeproj.stages")
        names = ("stage_one", "stage_two", "stage_loss", "stage_model")
        return {n: code_fingerprint(getattr(stages, n), ("fakeproj",)) for n in names}

    yield load
    for name in [m for m in sys.modules if m.split(".")[0] == "fakeproj"]:
        del sys.modules[name]


def _changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {name for name in before if before[name] != after[name]}


@pytest.mark.parametrize(
    ("edit", "affected"),
    [
        (("return n + 1", "return n + 100"), {"stage_one"}),
        (("CONST = 3", "CONST = 4"), {"stage_two"}),
        # A table of library classes: swapping what a name maps to is a code change.
        (('"l1": nn.L1Loss', '"l1": nn.SmoothL1Loss'), {"stage_loss"}),
        (
            ('{"mse": nn.MSELoss, "l1": nn.L1Loss}', '{"mse": nn.L1Loss, "l1": nn.MSELoss}'),
            {"stage_loss"},
        ),
        # A base class's attribute and method belong to every subclass.
        (("    scale = 2", "    scale = 3"), {"stage_model"}),
        (("return n * self.scale", "return n * self.scale * 1.0"), {"stage_model"}),
    ],
    ids=["helper", "constant", "table-entry", "table-swap", "base-attribute", "base-method"],
)
def test_an_edit_changes_exactly_the_stages_that_reach_it(fakeproj, edit, affected):
    before = fakeproj()
    old, new = edit
    assert old in HELPERS
    assert _changed(before, fakeproj(HELPERS.replace(old, new))) == affected


@pytest.mark.parametrize(
    "edit",
    [
        ("return n + 1", "return n + 1  # one more, for the off-by-one"),
        ('"""Helpers of the fake project."""', '"""Other words for the same helpers."""'),
        (
            "def deeper(n):\n    return n + 1",
            'def deeper(n):\n    """Add one."""\n    return n + 1',
        ),
        (
            "return sum(deeper(k) for k in (n,)) * 2",
            "return sum(\n        deeper(k) for k in (n,)\n    ) * 2",
        ),
        (
            '{"mse": nn.MSELoss, "l1": nn.L1Loss}',
            '{\n    "mse": nn.MSELoss,\n    "l1": nn.L1Loss,\n}',
        ),
    ],
    ids=["comment", "module-docstring", "function-docstring", "reflow", "trailing-comma"],
)
def test_comments_docstrings_and_formatting_change_no_key(fakeproj, edit):
    before = fakeproj()
    old, new = edit
    assert old in HELPERS
    assert fakeproj(HELPERS.replace(old, new)) == before


@pytest.fixture
def memos(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """An empty folder of parsed-source memos (keys.MEMO_DIR); no parse memoised in memory."""
    monkeypatch.setattr(keys, "MEMO_DIR", tmp_path / "memos")
    keys._definitions.cache_clear()
    yield tmp_path / "memos"
    keys._definitions.cache_clear()


def _rewrite_memos(folder: Path, change: Any) -> None:
    for path in folder.glob("*.json"):
        path.write_text(change(path.read_text()))
    keys._definitions.cache_clear()  # as a new process: read the memos from disk


def test_a_memoised_parse_gives_the_keys_a_parse_gives_and_follows_every_edit(fakeproj, memos):
    fresh = fakeproj()
    assert len(list(memos.glob("*.json"))) == 2  # stages.py and helpers.py
    keys._definitions.cache_clear()
    assert fakeproj() == fresh  # from the memos
    edited = HELPERS.replace("return n + 1", "return n + 2")  # same size
    keys._definitions.cache_clear()
    after = fakeproj(edited)
    assert _changed(fresh, after) == {"stage_one"}
    for path in memos.glob("*.json"):
        path.unlink()
    keys._definitions.cache_clear()
    assert fakeproj(edited) == after  # as parsed afresh


@pytest.mark.parametrize("made_by", ["another Python", "another normalizer", "damaged"])
def test_a_memo_of_another_python_or_normalizer_or_a_damaged_one_is_not_used(
    fakeproj, memos, monkeypatch, made_by
):
    fresh = fakeproj()

    # Memos that would change every key if they were used: every definition replaced.
    def tampered(text: str) -> str:
        memo = json.loads(text)
        found = memo["definitions"]
        memo["definitions"] = {name: [[line, "x"] for line, _ in v] for name, v in found.items()}
        return json.dumps(memo)

    _rewrite_memos(memos, tampered)
    assert fakeproj() != fresh  # the check sees a memo that is used
    if made_by == "another Python":
        monkeypatch.setattr(sys, "version", sys.version + " (another build)")
    elif made_by == "another normalizer":
        monkeypatch.setattr(keys, "_NORMALIZER", keys._NORMALIZER + "# an edit of keys.py")
    else:
        _rewrite_memos(memos, lambda text: text[: len(text) // 2])
    keys._definitions.cache_clear()
    assert fakeproj() == fresh


def test_code_outside_the_given_packages_is_named_not_read(fakeproj):
    before = fakeproj()
    # torch.nn is not in ("fakeproj",): its classes count by name, so a torch upgrade is
    # covered by the torch version in the key, not by reading torch's source.
    assert "torch" not in json.dumps(before)
    assert len(set(before.values())) == len(before)


def test_the_project_stage_functions_have_distinct_stable_fingerprints():
    import tasks.data
    import tasks.export
    import tasks.model
    import tasks.split
    import tasks.train

    functions = (
        tasks.data.read_file,
        tasks.split.split_indices,
        tasks.model.initial_model,
        tasks.train.train_model,
        tasks.export.export_model,
    )
    first = [code_fingerprint(f) for f in functions]
    keys._code_fingerprint.cache_clear()
    assert [code_fingerprint(f) for f in functions] == first
    assert len(set(first)) == len(first)
    assert code_fingerprint(tasks.split.split) == code_fingerprint(tasks.split.split.fn)


FRESH_PROCESS = """\
import json
import tasks.data, tasks.export, tasks.model, tasks.split, tasks.train
from tasks.keys import code_fingerprint, stage_key

functions = (tasks.data.read_file, tasks.split.split_indices, tasks.model.initial_model,
             tasks.train.train_model, tasks.export.export_model)
print(json.dumps({
    "code": [code_fingerprint(f) for f in functions],
    "key": stage_key("split", tasks.split.split_indices,
                     {"n": 100, "val_fraction": 0.2, "seed": 13}),
}))
"""


def test_fingerprints_and_keys_are_the_same_in_a_fresh_process():
    import tasks.data
    import tasks.export
    import tasks.model
    import tasks.train

    done = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS],
        cwd=REPO,
        env={**os.environ, "PYTHONHASHSEED": "4242"},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    there = json.loads(done.stdout.strip().splitlines()[-1])
    functions = (
        tasks.data.read_file,
        split_indices,
        tasks.model.initial_model,
        tasks.train.train_model,
        tasks.export.export_model,
    )
    assert [code_fingerprint(f) for f in functions] == there["code"]
    assert stage_key("split", split_indices, SPLIT_INPUTS) == there["key"]


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


def test_sources_read_from_the_parsed_file_are_the_ones_inspect_getsource_gives():
    # normalized_source parses each file once; keys must stay what inspect.getsource gave.
    import tasks.export
    import tasks.loop
    import tasks.train

    defined = [
        obj
        for module in (tasks.export, tasks.loop, tasks.train, keys)
        for obj in vars(module).values()
        if (inspect.isfunction(obj) or inspect.isclass(obj)) and obj.__module__ == module.__name__
    ]
    methods = [m for c in defined if inspect.isclass(c) for m in keys._functions_of(c)]
    checked = 0
    for obj in defined + methods:
        source = keys._definition(obj)
        if source is not None:
            tree = ast.parse(textwrap.dedent(inspect.getsource(obj)))
            assert source == ast.dump(keys._DropDocstrings().visit(tree), annotate_fields=False)
            checked += 1
    assert checked > 50


def test_the_memo_folder_is_chosen_by_the_environment(tmp_path, monkeypatch):
    # The suite's own memos are in its session folder (conftest), never the user's ~/.cache.
    assert Path(os.environ["TRAINFLOW_CODE_MEMO_DIR"]) == keys.MEMO_DIR
    monkeypatch.setenv("TRAINFLOW_CODE_MEMO_DIR", str(tmp_path / "m"))
    assert keys._memo_dir() == tmp_path / "m"
    monkeypatch.delenv("TRAINFLOW_CODE_MEMO_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert keys._memo_dir() == tmp_path / "xdg" / "trainflow" / "code"
