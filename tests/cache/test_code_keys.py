"""The code part of a cache key (tasks/cache/code_keys.py, tasks/cache/imported.py): every
module a stage can reach, through imports, instances and plugins, as the process imported it."""

from __future__ import annotations

import importlib
import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

import trainflow.tasks.train_epochs
from trainflow.tasks.cache import code_keys
from trainflow.tasks.cache.keys import stage_key
from trainflow.tasks.cache.stage import cache_entry, using_cache
from trainflow.tasks.cache.store import CacheStore
from trainflow.tasks.data.splits import split_indices

from ..conftest import REPO

# --- a throwaway project, edited and re-imported -------------------------------------------

HELPERS = '''\
"""Helpers of the fake project."""
import torch.nn as nn

CONST = 3
LOSSES = {"mse": nn.MSELoss, "l1": nn.L1Loss}


def deeper(n):
    return n + 1


def helper_x(n):
    return sum(deeper(k) for k in (n,)) * CONST  # reached from a nested code object
'''

RUNNER = """\
from dataclasses import dataclass


@dataclass(frozen=True)
class Runner:
    scale: int

    def go(self, n):
        return n * self.scale
"""

MODULES = {
    "__init__.py": "",
    "other.py": "def other(n):\n    return n - 1\n",
    "one.py": (
        "import fakeproj.helpers as helpers\n\n\ndef stage(n):\n    return helpers.helper_x(n)\n"
    ),
    "two.py": "from fakeproj.other import other\n\n\ndef stage(n):\n    return other(n)\n",
    # The runner's module is imported only where it is used, inside the function.
    "deferred.py": (
        "def stage(n):\n    from fakeproj.runner import Runner\n\n    return Runner(2).go(n)\n"
    ),
    # No import of the runner at all: its code runs through the instance the stage is given.
    "instance.py": "def stage(runner, n):\n    return runner.go(n)\n",
}
STAGES = ("one", "two", "deferred", "instance")


@pytest.fixture
def fakeproj(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """load(helpers=…, runner=…) -> {stage module: its stage key}, written and imported anew."""
    package = tmp_path / "fakeproj"
    package.mkdir()
    for name, text in MODULES.items():
        (package / name).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # should another loader import it

    def load(helpers: str = HELPERS, runner: str = RUNNER) -> dict[str, str]:
        (package / "helpers.py").write_text(helpers)
        (package / "runner.py").write_text(runner)
        _forget("fakeproj")
        keys = {}
        for name in STAGES:
            stage = importlib.import_module(f"fakeproj.{name}").stage
            inputs: dict[str, Any] = {"n": 1}
            if name == "instance":
                inputs["runner"] = importlib.import_module("fakeproj.runner").Runner(2)
            keys[name] = stage_key("s", stage, inputs)
        return keys

    load.package = package
    yield load
    _forget("fakeproj")


def _forget(package: str) -> None:
    for name in [m for m in sys.modules if m.split(".")[0] == package]:
        del sys.modules[name]
    importlib.invalidate_caches()


def _changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {name for name in before if before[name] != after[name]}


@pytest.mark.parametrize(
    ("edit", "affected"),
    [
        (("helpers", "return n + 1", "return n + 100"), {"one"}),
        (("helpers", "CONST = 3", "CONST = 4"), {"one"}),
        # A table of library classes: swapping what a name maps to is a code change.
        (("helpers", '"l1": nn.L1Loss', '"l1": nn.SmoothL1Loss'), {"one"}),
        # Reached only through a function-local import, or only through an instance.
        (
            ("runner", "return n * self.scale", "return n * self.scale + 1"),
            {"deferred", "instance"},
        ),
    ],
    ids=["helper", "constant", "table-entry", "instance-method"],
)
def test_an_edit_changes_exactly_the_stages_whose_code_reaches_its_module(fakeproj, edit, affected):
    before = fakeproj()
    module, old, new = edit
    texts = {"helpers": HELPERS, "runner": RUNNER}
    assert old in texts[module]
    texts[module] = texts[module].replace(old, new)
    assert _changed(before, fakeproj(**texts)) == affected


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
            "return sum(deeper(k) for k in (n,)) * CONST",
            "return sum(\n        deeper(k) for k in (n,)\n    ) * CONST",
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


def test_the_key_is_of_the_code_imported_and_an_edit_since_is_never_stored(
    fakeproj, tmp_path, caplog
):
    """A long-lived process (a Dask worker, a served deployment) imported the module; the file
    is edited since. The key stays the imported code's, and its output is not stored."""
    before = fakeproj()
    one = importlib.import_module("fakeproj.one")
    edited = HELPERS.replace("CONST = 3", "CONST = 4")
    (fakeproj.package / "helpers.py").write_text(edited)  # on disk only: not imported
    assert stage_key("s", one.stage, {"n": 1}) == before["one"]
    cache = tmp_path / "cache"
    with using_cache(str(cache), "use"), caplog.at_level(logging.WARNING):
        entry = cache_entry("s", one.stage, n=1)
        entry.keep(split_indices(10, 0.2, 13))  # outside a Prefect run: written now, or refused
    assert entry.key == before["one"]
    assert not cache.exists() or not CacheStore(str(cache)).entries()
    [line] = [r.getMessage() for r in caplog.records if "not caching" in r.getMessage()]
    assert "helpers.py changed since this process imported it" in line
    assert "restart" in line


def test_a_module_imported_after_the_key_was_made_with_other_code_is_never_stored(
    fakeproj, tmp_path
):
    fakeproj()
    _forget("fakeproj")
    deferred = importlib.import_module("fakeproj.deferred")  # runner.py not imported yet
    assert "fakeproj.runner" not in sys.modules
    code = code_keys.code_key(deferred.stage)
    (fakeproj.package / "runner.py").write_text(RUNNER.replace("* self.scale", "* self.scale * 3"))
    assert deferred.stage(1) == 6  # the import inside the stage compiles the edited text
    assert "was imported with other code" in (code_keys.stale_sources(code) or "")


def test_an_import_module_of_a_literal_name_is_followed_like_an_import_statement(fakeproj):
    (fakeproj.package / "literal.py").write_text(
        "import importlib\n\n\ndef stage(n):\n"
        "    return importlib.import_module('fakeproj.other').other(n)\n"
    )
    _forget("fakeproj")
    literal = importlib.import_module("fakeproj.literal")
    before = code_keys.code_key(literal.stage)
    assert "fakeproj.other" in {s.module for s in before.sources}
    (fakeproj.package / "other.py").write_text("def other(n):\n    return n - 2\n")
    assert code_keys.code_key(literal.stage).digest != before.digest  # not imported yet


COMPUTED_NAME = """\
import importlib, json
import trainflow.tasks
from trainflow.tasks.cache import code_keys
computed = importlib.import_module("fakeproj.computed")
importlib.import_module("fakeproj.other")  # loaded, though nothing imports it by name
code = code_keys.code_key(computed.stage)
before = code_keys.stale_sources(code)
value = computed.stage("runner", 1)  # imports fakeproj.runner, which no key covers
print(json.dumps({"modules": [s.module for s in code.sources], "before": before,
                  "value": value, "after": code_keys.stale_sources(code)}))
"""


def test_an_import_by_a_computed_name_counts_every_module_loaded_and_stores_no_new_one(fakeproj):
    fakeproj()
    (fakeproj.package / "computed.py").write_text(
        "import importlib\n\n\ndef stage(name, n):\n"
        "    return importlib.import_module('fakeproj.' + name).Runner(2).go(n)\n"
    )
    done = subprocess.run(  # a process of its own: no test module among the modules it loaded
        [sys.executable, "-c", COMPUTED_NAME],
        env={**os.environ, "PYTHONPATH": f"{fakeproj.package.parent}:{REPO}"},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"fakeproj.computed", "fakeproj.other"} <= set(seen["modules"])
    assert seen["before"] is None and seen["value"] == 2
    assert seen["after"].startswith("module fakeproj.runner was imported while it was computed")


def test_a_compiled_extension_counts_by_its_bytes(tmp_path, monkeypatch):
    import xxhash._xxhash as compiled  # any extension: copied, it is an editable one

    package = tmp_path / "fakeext"
    package.mkdir()
    (package / "__init__.py").write_text("")
    extension = package / Path(compiled.__file__).name
    extension.write_bytes(Path(compiled.__file__).read_bytes())
    (tmp_path / "uses_ext.py").write_text("def stage():\n    import fakeext._xxhash\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        stage = importlib.import_module("uses_ext").stage
        before = code_keys.code_key(stage)
        assert str(extension) in {s.path for s in before.sources}
        with extension.open("ab") as f:  # another build of it
            f.write(b"\0")
        assert code_keys.code_key(stage).digest != before.digest  # not loaded: read from disk
        importlib.import_module("fakeext._xxhash")  # loaded: the key keeps the bytes it loaded
        loaded = code_keys.code_key(stage)
        with extension.open("ab") as f:
            f.write(b"\0")
        assert code_keys.code_key(stage).digest == loaded.digest
        assert "changed since this process imported it" in code_keys.stale_sources(loaded)
    finally:
        _forget("fakeext")
        _forget("uses_ext")


def test_a_rank_whose_code_is_not_the_keys_refuses_to_start(monkeypatch):
    """A DDP rank imports the code at its own start: if that is not the code the launcher's
    key covers, it must not compute (its checkpoints would be filed under that key)."""
    import dataclasses

    from trainflow.tasks.engine.launch import Job, run_rank
    from trainflow.tasks.errors import InputError

    code = code_keys.code_key(trainflow.tasks.engine.fit.train_model)
    assert code_keys.differs_from_imported(code) is None
    loop = next(s for s in code.sources if s.module == "trainflow.tasks.engine.loop")
    edited = dataclasses.replace(loop, digest="0" * 64)  # the key made from other bytes
    tampered = dataclasses.replace(
        code, sources=tuple(edited if s is loop else s for s in code.sources)
    )
    job = Job({}, 1, "cpu", None, None, "", "", 1, 10.0, code=tampered)
    monkeypatch.setattr("trainflow.tasks.engine.launch._die_with_the_launcher", lambda pid: None)
    with pytest.raises(InputError, match=r"loop\.py was imported with other code"):
        run_rank(job)


def test_a_plugins_helper_package_is_read_and_an_installed_library_counts_by_its_version(
    tmp_path, monkeypatch
):
    (tmp_path / "helperlib").mkdir()
    (tmp_path / "helperlib" / "__init__.py").write_text("SCALE = 1.0\n")
    (tmp_path / "plugin.py").write_text(
        "import torch.nn as nn\nimport helperlib\n\n\n"
        "def build(spec):\n    return nn.Linear(1, 1, bias=helperlib.SCALE > 0)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    fingerprints = []
    for scale in ("1.0", "0.0"):
        (tmp_path / "helperlib" / "__init__.py").write_text(f"SCALE = {scale}\n")
        _forget("helperlib")
        _forget("plugin")
        key = code_keys.code_key(importlib.import_module("plugin").build)
        fingerprints.append(key.digest)
        assert {s.module for s in key.sources} == {"plugin", "helperlib"}
    _forget("helperlib")
    _forget("plugin")
    assert fingerprints[0] != fingerprints[1]
    walk = code_keys._Walk()
    walk.root(trainflow.tasks.engine.fit.train_model)
    assert any(pin.startswith("torch==") for pin in walk.libraries)
    assert not any(
        "site-packages" in s.path for s in code_keys.code_key(trainflow.tasks.train_epochs).sources
    )


def test_the_train_stage_covers_every_module_its_body_reaches():
    """The DDP launcher and the curves run in train-epochs' body, not in train_model: the
    stage's key covers its own module too (tasks/cache/stage.py), so an edit of theirs must
    change the key all the same."""
    from trainflow.tasks.cache.keys import keyed

    _, code = keyed(
        "train-epochs", trainflow.tasks.engine.fit.train_model, {}, trainflow.tasks.train_epochs
    )
    reached = {s.module for s in code.sources}
    assert {
        "trainflow.tasks.train_epochs",
        "trainflow.tasks.engine.launch",
        "trainflow.tasks.engine.ranks",
        "trainflow.tasks.engine.loop",
        "trainflow.tasks.engine.step",
        "trainflow.tasks.runs.curves",
        "trainflow.tasks.runs.fence",
    } <= reached
    assert "trainflow.flows.train_flow" not in reached


def test_a_module_that_cannot_be_found_is_part_of_the_key(fakeproj):
    optional = HELPERS + "\ntry:\n    import nosuchmod\nexcept ImportError:\n    pass\n"
    absent = fakeproj(optional)
    (fakeproj.package.parent / "nosuchmod.py").write_text("X = 1\n")
    try:
        installed = fakeproj(optional)
    finally:
        _forget("nosuchmod")
    assert installed["one"] != absent["one"]  # installing the missing module changes the key


# --- the same keys everywhere ------------------------------------------------------------------

FRESH_PROCESS = """\
import json
import trainflow.tasks.load_tensors, trainflow.tasks.export_graph, trainflow.tasks.build_model
import trainflow.tasks.split, trainflow.tasks.train_epochs
from trainflow.tasks.cache.code_keys import code_fingerprint
from trainflow.tasks.cache.keys import stage_key
from trainflow.tasks.data.splits import split_indices

functions = (trainflow.tasks.data.tensors.read_file, trainflow.tasks.data.splits.split_indices,
             trainflow.tasks.engine.models.initial_model, trainflow.tasks.engine.fit.train_model,
             trainflow.tasks.export_graph.export_model)
print(json.dumps({
    "code": [code_fingerprint(f) for f in functions],
    "key": stage_key("split", trainflow.tasks.data.splits.split_indices,
                     {"n": 100, "val_fraction": 0.2, "seed": 13}),
}))
"""


@pytest.mark.system  # a child process of its own
def test_fingerprints_and_keys_are_the_same_in_a_fresh_process_and_a_moved_project(tmp_path):
    import trainflow.tasks.build_model
    import trainflow.tasks.export_graph
    import trainflow.tasks.load_tensors
    import trainflow.tasks.split

    functions = (
        trainflow.tasks.data.tensors.read_file,
        trainflow.tasks.data.splits.split_indices,
        trainflow.tasks.engine.models.initial_model,
        trainflow.tasks.engine.fit.train_model,
        trainflow.tasks.export_graph.export_model,
    )
    here = {
        "code": [code_keys.code_fingerprint(f) for f in functions],
        "key": stage_key(
            "split",
            trainflow.tasks.data.splits.split_indices,
            {"n": 100, "val_fraction": 0.2, "seed": 13},
        ),
    }
    assert len(set(here["code"])) == len(functions)
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    for package in ("tasks", "flows"):
        subprocess.run(["cp", "-r", str(REPO / package), str(moved)], check=True)
    for root in (REPO, moved):  # the same code elsewhere has the same keys
        done = subprocess.run(
            [sys.executable, "-c", FRESH_PROCESS],
            cwd=root,
            env={**os.environ, "PYTHONHASHSEED": "4242", "PYTHONPATH": str(root)},
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        assert json.loads(done.stdout.strip().splitlines()[-1]) == here, root


# --- the parse memo ----------------------------------------------------------------------------


@pytest.fixture
def memos(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """An empty folder of parse memos (code_keys.MEMO_DIR); nothing memoised in memory."""
    monkeypatch.setattr(code_keys, "MEMO_DIR", tmp_path / "memos")
    code_keys._parses.clear()
    yield tmp_path / "memos"
    code_keys._parses.clear()


def _rewrite_memos(folder: Path, change: Any) -> None:
    for path in folder.glob("*.json"):
        path.write_text(change(path.read_text()))
    code_keys._parses.clear()  # as a new process: read the memos from disk


def test_a_memoised_parse_gives_the_keys_a_parse_gives_and_follows_every_edit(fakeproj, memos):
    fresh = fakeproj()
    assert len(list(memos.glob("*.json"))) >= len(MODULES) + 1
    code_keys._parses.clear()
    assert fakeproj() == fresh  # from the memos
    edited = HELPERS.replace("return n + 1", "return n + 2")  # same size
    code_keys._parses.clear()
    after = fakeproj(edited)
    assert _changed(fresh, after) == {"one"}
    for path in memos.glob("*.json"):
        path.unlink()
    code_keys._parses.clear()
    assert fakeproj(edited) == after  # as parsed afresh


@pytest.mark.parametrize("made_by", ["another Python", "another normalizer", "damaged"])
def test_a_memo_of_another_python_or_normalizer_or_a_damaged_one_is_not_used(
    fakeproj, memos, monkeypatch, made_by
):
    fresh = fakeproj()

    def tampered(text: str) -> str:  # memos that would change every key if they were used
        memo = json.loads(text)
        memo["ast"] = "x" * 64
        return json.dumps(memo)

    _rewrite_memos(memos, tampered)
    assert fakeproj() != fresh  # the check sees a memo that is used
    if made_by == "another Python":
        monkeypatch.setattr(sys, "version", sys.version + " (another build)")
    elif made_by == "another normalizer":
        monkeypatch.setattr(code_keys, "_NORMALIZER", code_keys._NORMALIZER + "# an edit")
    else:
        _rewrite_memos(memos, lambda text: text[: len(text) // 2])
    code_keys._parses.clear()
    assert fakeproj() == fresh


def test_the_memo_folder_is_chosen_by_the_environment(tmp_path, monkeypatch):
    # The suite's own memos are in its session folder (conftest), never the user's ~/.cache.
    assert Path(os.environ["TRAINFLOW_CODE_MEMO_DIR"]) == code_keys.MEMO_DIR
    monkeypatch.setenv("TRAINFLOW_CODE_MEMO_DIR", str(tmp_path / "m"))
    assert code_keys._memo_dir() == tmp_path / "m"
    monkeypatch.delenv("TRAINFLOW_CODE_MEMO_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert code_keys._memo_dir() == tmp_path / "xdg" / "trainflow" / "code"


def test_parsing_finds_every_import_wherever_it_is_written():
    text = textwrap.dedent(
        """\
        import a.b, c
        from .d import e
        from typing import TYPE_CHECKING
        if TYPE_CHECKING:
            from f import g
        def h():
            from ..i import j as k
        """
    ).encode()
    _, imports, dynamic = code_keys.parse_module(text)
    assert not dynamic
    assert set(imports) == {
        (0, "a.b", ()),
        (0, "c", ()),
        (1, "d", ("e",)),
        (0, "typing", ("TYPE_CHECKING",)),
        (0, "f", ("g",)),
        (2, "i", ("j",)),
    }


def test_no_trainflow_module_makes_its_keys_count_every_loaded_module():
    """An import by a computed name anywhere in trainflow would make every key depend on what
    the process happens to have loaded: no two processes would share an entry."""
    import trainflow.tasks.export_graph
    import trainflow.tasks.load_tensors
    import trainflow.tasks.predict

    walk = code_keys._Walk()
    for stage in (
        trainflow.tasks.load_tensors.load_tensors,
        trainflow.tasks.train_epochs.train_epochs,
        trainflow.tasks.predict.score,
    ):
        walk.root(stage)
    assert walk.dynamic == set()
    assert {
        "trainflow.tasks.cache.imported",
        "trainflow.tasks.cache.code_keys",
        "trainflow.tasks.train_epochs",
    } <= walk.seen


@pytest.mark.parametrize(
    ("text", "imports", "dynamic"),
    [
        (
            "import pkgutil\nX = pkgutil.resolve_name('helper:SCALE')\n",
            {"pkgutil", "helper"},
            False,
        ),
        ("import pkgutil\nX = pkgutil.resolve_name(name)\n", {"pkgutil"}, True),
        ("from pkgutil import resolve_name\nX = resolve_name('a:b')\n", {"pkgutil"}, True),
        ("from importlib import import_module as imp\nimp('x')\n", {"importlib"}, True),
        ("import importlib\nf = getattr(importlib, 'import_module')\n", {"importlib"}, True),
        ("import importlib\nf = importlib.import_module\n", {"importlib"}, True),
        (
            "import importlib.util\nimportlib.util.resolve_name('.a', 'b')\n",
            {"importlib.util"},
            False,
        ),
        ("import runpy\nrunpy.run_path(p)\n", {"runpy"}, True),
        ("exec('x = 1')\nmodel.eval()\n", set(), False),
        ("exec(text)\n", set(), True),
    ],
    ids=[
        "resolve-name-literal",
        "resolve-name-computed",
        "resolve-name-bare",
        "aliased-import-module",
        "getattr-of-importlib",
        "import-module-passed-on",
        "importlib-util-resolve-name",
        "run-path",
        "exec-literal-and-a-method-named-eval",
        "exec-text",
    ],
)
def test_every_route_to_code_by_a_name_is_followed_or_makes_the_key_count_all(
    text, imports, dynamic
):
    _, found, is_dynamic = code_keys.parse_module(text.encode())
    assert {module for _, module, _ in found} == imports
    assert is_dynamic == dynamic


def test_code_in_a_zip_or_any_unreadable_place_makes_the_stage_uncached(tmp_path, monkeypatch):
    import zipfile

    from trainflow.tasks.cache.keys import NoCacheKey

    with zipfile.ZipFile(tmp_path / "helpers.zip", "w") as archive:
        archive.writestr("ziphelper.py", "SCALE = 1.0\n")
    (tmp_path / "uses_zip.py").write_text(
        "from ziphelper import SCALE\n\n\ndef stage():\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "helpers.zip"))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        stage = importlib.import_module("uses_zip").stage
        with pytest.raises(code_keys.UnreadableCode, match="module ziphelper"):
            code_keys.code_key(stage)
        with pytest.raises(NoCacheKey, match="module ziphelper"):
            stage_key("s", stage, {})
    finally:
        _forget("uses_zip")
        _forget("ziphelper")


def test_a_loaded_plugin_is_in_every_key_made_after(fakeproj, monkeypatch):
    """A plugin's import may patch what any stage computes (torch, a registry of trainflow's),
    also in another sweep trial of the same process: every later key covers it."""
    monkeypatch.setattr(code_keys, "_plugins", set())
    fakeproj()
    before = code_keys.code_key(trainflow.tasks.engine.fit.train_model)
    code_keys.plugin_loaded("fakeproj.helpers")
    after = code_keys.code_key(trainflow.tasks.engine.fit.train_model)
    assert after.digest != before.digest
    assert "fakeproj.helpers" in {s.module for s in after.sources}  # so a DDP rank checks it


def test_what_a_later_stage_imports_does_not_stop_an_earlier_stages_entry(
    fakeproj, tmp_path, monkeypatch
):
    """The data stages commit together after build-model, which may import a plugin: only
    what a stage imported while it computed counts against its entry."""
    fakeproj()
    _forget("fakeproj")
    one = importlib.import_module("fakeproj.one")
    kept: dict[str, Any] = {}

    class Transaction:  # the flow's `with transaction():`, committing later
        def set(self, name: str, value: Any) -> None:
            kept[name] = value

    monkeypatch.setattr("trainflow.tasks.cache.stage.get_transaction", lambda: Transaction())
    cache = tmp_path / "cache"
    with using_cache(str(cache), "use"):
        entry = cache_entry("s", one.stage, n=1)
        entry.keep(split_indices(10, 0.2, 13))
        importlib.import_module("fakeproj.runner")  # a later stage's import, before the commit
        entry.write(split_indices(10, 0.2, 13))
    assert [e.key for e in CacheStore(str(cache)).entries()] == [entry.key]


def test_a_module_loaded_by_another_librarys_loader_is_recorded(fakeproj, monkeypatch):
    """A library may install a path hook whose loader subclasses the standard one (beartype's
    import hook does, once a package of Prefect's dependencies is imported): what it loads is
    still recorded as imported, and compiled without a bytecode cache."""
    import psutil  # noqa: F401 (what the hook below could not load: an extension)

    from trainflow.tasks.cache import imported

    class OtherLibrarysLoader(importlib.machinery.SourceFileLoader):
        pass

    hook = importlib.machinery.FileFinder.path_hook(
        (OtherLibrarysLoader, importlib.machinery.SOURCE_SUFFIXES)
    )
    monkeypatch.setattr(sys, "path_hooks", [hook, *sys.path_hooks])
    monkeypatch.setattr(sys, "path_importer_cache", {})
    fakeproj()
    one = sys.modules["fakeproj.one"]
    assert isinstance(one.__spec__.loader, OtherLibrarysLoader)
    record = imported.source_of(one)
    assert record is not None and record.vouched and record.module() is one
    assert record.text == (fakeproj.package / "one.py").read_bytes()


def test_trainflows_own_modules_count_by_their_text_when_installed_as_a_library(monkeypatch):
    """A wheel or `pip install .` puts trainflow in site-packages, at one version for every
    commit: its modules still count by what they hold, never by `trainflow==<version>`."""
    from trainflow.tasks.cache import imported

    # trainflow's folder inside a library root, as a wheel installs it.
    monkeypatch.setattr(imported, "LIBRARY_ROOTS", (*imported.LIBRARY_ROOTS, f"{REPO}/"))
    monkeypatch.setattr(sys.modules["trainflow"], "__path__", [str(REPO / "tasks")])
    code_keys._is_library.cache_clear()
    try:
        code = code_keys.code_key(trainflow.tasks.engine.fit.train_model)
    finally:
        code_keys._is_library.cache_clear()
    modules = {s.module for s in code.sources}
    assert {"trainflow.tasks.engine.step", "trainflow.tasks.engine.loop"} <= modules


def test_code_a_stage_loaded_outside_its_key_is_in_every_later_key(fakeproj, monkeypatch, tmp_path):
    """A plugin that loads a helper through entry points (`EntryPoint.load()`) imports by a
    name no walk sees. The stage that loaded it is not stored; every key made after it, in
    this process, covers the helper, since later stages run it too (train-epochs rebuilds
    the model that build-model first built)."""
    from trainflow.tasks.cache.stage import StageEntry
    from trainflow.tasks.cache.store import CacheStore

    monkeypatch.setattr(code_keys, "_plugins", set())  # this test's plugins only
    fakeproj()
    (fakeproj.package / "hidden.py").write_text("def act(n):\n    return n + 7\n")
    (fakeproj.package / "built.py").write_text(
        "from importlib.metadata import EntryPoint\n\n\n"
        "def build(n):\n"
        "    ep = EntryPoint(name='a', value='fakeproj.hidden:act', group='g')\n"
        "    return ep.load()(n)\n"
    )
    built = importlib.import_module("fakeproj.built")
    code = code_keys.code_key(built.build)
    assert "fakeproj.hidden" not in {s.module for s in code.sources}  # the walk can't see it
    entry = StageEntry("s-key", CacheStore(str(tmp_path / "cache")), "use", code)
    entry.keep(built.build(1))  # computed: imports fakeproj.hidden; not stored
    assert "outside the key" in (code_keys.stale_sources(code, entry.computed_by) or "")
    assert not list((tmp_path / "cache").rglob("s-key*"))
    later = code_keys.code_key(built.build)
    assert "fakeproj.hidden" in {s.module for s in later.sources}


def test_a_script_written_just_before_its_process_starts_is_vouched_for(tmp_path):
    """Code imported before the recorder counts if its file is older than the process: a
    script generated and run at once (a Makefile, a CI step) must count. The start is known
    to the clock tick (10 ms), not to the second; a file written within a tick of the start
    may still read as changed after it (refused: the safe side)."""
    script = tmp_path / "fresh.py"
    check = (
        "import sys\nfrom trainflow.tasks.cache.imported import source_of\n"
        "print(source_of(sys.modules['__main__']).vouched)\n"
    )
    seen = []
    for _ in range(5):
        script.write_text(check)
        time.sleep(0.05)
        done = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, timeout=120
        )
        seen.append(done.stdout.strip() or done.stderr[-2000:])
    assert seen == ["True"] * 5


def test_a_forked_child_does_not_vouch_for_a_script_edited_before_the_fork(tmp_path):
    """A child forked after its parent's script was edited runs the parent's code: the edit
    is after the start that counts, the parent's, not the child's."""
    script = tmp_path / "forks.py"
    script.write_text(
        "import os, sys, time\nfrom trainflow.tasks.cache.imported import source_of\n"
        "time.sleep(0.05)\n"
        "with open(sys.argv[0], 'a') as f:\n    f.write('# edited after the start\\n')\n"
        "time.sleep(0.1)\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    print(source_of(sys.modules['__main__']).vouched, flush=True)\n"
        "    os._exit(0)\n"
        "os.waitpid(pid, 0)\n"
    )
    time.sleep(0.05)
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120
    )
    assert done.stdout.strip() == "False", done.stderr[-2000:]


def test_a_file_edited_while_it_is_read_is_not_vouched_for(tmp_path):
    """The file's age is checked before and after the read: an edit between the two (its old
    times seen first, its new bytes read) must not count as the code that ran."""
    module = tmp_path / "old_module.py"
    module.write_text("X = 1\n")
    script = tmp_path / "race.py"
    script.write_text(
        "import os, sys, types\nfrom trainflow.tasks.cache import imported\n"
        f"path = {str(module)!r}\n"
        "module = types.ModuleType('old_module')\nmodule.__file__ = path\n"
        "stat = os.stat\n"
        "def stat_then_edit(target, *args, **kwargs):\n"
        "    result = stat(target, *args, **kwargs)\n"
        "    if str(target) == path and open(path).read() == 'X = 1\\n':\n"
        "        open(path, 'w').write('X = 2\\n')\n"
        "    return result\n"
        "imported.os.stat = stat_then_edit\n"
        "print(imported.source_of(module).vouched)\n"
    )
    time.sleep(0.05)  # both files older than the process
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120
    )
    assert done.stdout.strip() == "False", done.stderr[-2000:]


def test_a_library_class_among_the_inputs_counts_by_version_whatever_else_is_loaded(tmp_path):
    """A value of torch's class among a stage's inputs (a dtype in a dataclass) counts by
    torch's version. Read as source, torch's __init__ imports by computed names, which made
    the key count every editable module loaded: the same config keyed apart in a `trainflow`
    process, a `python flows/train_flow.py` one and one under a sitecustomize."""
    script = textwrap.dedent(
        """
        import importlib, json, sys
        import torch
        import trainflow.tasks.engine.fit as fit
        from trainflow.tasks.cache.keys import keyed
        from value_module import Value

        if sys.argv[1] == "more":  # an editable module, loaded but reached by nothing
            importlib.import_module("extra_" + "module")
        key, code = keyed("s", fit.train_model, {"value": Value(torch.int64)})
        print(json.dumps([key, [s.module for s in code.sources]]))
        """
    )
    (tmp_path / "value_module.py").write_text(
        "import dataclasses\nimport torch\n\n\n@dataclasses.dataclass\nclass Value:\n"
        "    dtype: torch.dtype\n    cache_key: str = 'fixed'\n"
    )
    (tmp_path / "extra_module.py").write_text("VALUE = 1\n")
    (tmp_path / "check.py").write_text(script)
    runs = [
        json.loads(
            subprocess.run(
                [sys.executable, "check.py", which],
                cwd=tmp_path,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        for which in ("plain", "more")
    ]
    (plain_key, plain_modules), (more_key, more_modules) = runs
    assert "value_module" in plain_modules and "torch" not in plain_modules
    assert "extra_module" not in more_modules and plain_key == more_key


def test_a_module_named_like_a_standard_library_one_but_elsewhere_is_read(tmp_path, monkeypatch):
    """A project's `mailbox.py` is its own code, not the standard library's: keyed by its text,
    not by the Python version (an edit of it once hit a stale entry)."""
    (tmp_path / "mailbox.py").write_text("WIDTH = 4\n")
    (tmp_path / "uses_mailbox.py").write_text(
        "import mailbox\n\n\ndef build():\n    return mailbox.WIDTH\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    saved = sys.modules.pop("mailbox", None)
    try:
        module = importlib.import_module("uses_mailbox")
        sources = {s.module: s.path for s in code_keys.code_key(module.build).sources}
        assert sources.get("mailbox") == str(tmp_path / "mailbox.py")
    finally:
        _forget("uses_mailbox")
        _forget("mailbox")
        if saved is not None:
            sys.modules["mailbox"] = saved
    # The standard library's own stays out, counted by the Python version.
    import email.message

    assert "email" not in {s.module for s in code_keys.code_key(email.message).sources}


def test_the_packages_above_a_root_module_are_its_code_too(tmp_path, monkeypatch):
    """Importing `pkgm.model` runs pkgm/__init__.py first (which may patch torch): reached
    from a model in `pkgm.model` that never imports its own package, it is in the key."""
    package = tmp_path / "pkgm"
    package.mkdir()
    (package / "__init__.py").write_text("SCALE = 0.01\n")
    (package / "model.py").write_text("def build():\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        module = importlib.import_module("pkgm.model")
        modules = {s.module for s in code_keys.code_key(module.build).sources}
        assert {"pkgm", "pkgm.model"} <= modules
    finally:
        _forget("pkgm")
