"""The project's registry (tasks/project.py): names by kind from trainflow.toml or pyproject.toml,
found from the working folder up, and imported from the project folder only."""

import os
import sys
import uuid
from pathlib import Path

import pytest

import trainflow.tasks.cache.code_keys
from trainflow.tasks.errors import InputError
from trainflow.tasks.project import KINDS, load, lookup, project_root, registered_names, registry

PREFIX = "tfproj_"


@pytest.fixture(autouse=True)
def _imports_left_as_found(monkeypatch: pytest.MonkeyPatch):
    """load() appends the project folder to sys.path and imports modules: undo both."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(trainflow.tasks.cache.code_keys, "_plugins", set())
    yield
    for name in [name for name in sys.modules if name.startswith(PREFIX)]:
        del sys.modules[name]


def unique() -> str:
    """A module name no other test (or process state) has imported."""
    return f"{PREFIX}{uuid.uuid4().hex[:10]}"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def one_line_error(*fragments: str, call=None) -> str:
    with pytest.raises(InputError) as info:
        (call or registry)()
    message = str(info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


# --- finding the names ----------------------------------------------------------------------


def test_names_from_trainflow_toml_by_kind(tmp_path):
    write(
        tmp_path / "trainflow.toml",
        '[models]\ncnn = "nets:build"\nrnn = "nets.seq:build"\n'
        '[losses]\nfocal = "lossy:focal"\n'
        '[metrics]\ntop5 = "meters:top5"\n'
        '[augmentations]\ncutout = "augs:cutout"\n',
    )
    found = registry()
    assert set(found) == set(KINDS)
    assert sorted(found["models"]) == ["cnn", "rnn"]
    rnn = found["models"]["rnn"]
    assert (rnn.module, rnn.attribute, rnn.target) == ("nets.seq", "build", "nets.seq:build")
    root = tmp_path.resolve()
    assert rnn.root == str(root) and rnn.file == str(root / "trainflow.toml")
    assert found["losses"]["focal"].target == "lossy:focal"
    assert registered_names("metrics") == ("top5",)
    assert registered_names("augmentations") == ("cutout",)
    assert lookup("models", "cnn") == found["models"]["cnn"]
    assert lookup("models", "absent") is None


def test_names_from_pyproject_tool_trainflow(tmp_path):
    write(
        tmp_path / "pyproject.toml",
        '[project]\nname = "mine"\n[tool.trainflow.models]\nb = "m:b"\na = "m:a"\n'
        '[tool.trainflow.losses]\nmy-loss = "m:loss"\n',
    )
    assert registered_names("models") == ("a", "b")
    assert registered_names("losses") == ("my-loss",)
    assert registered_names("metrics") == ()


def test_names_from_both_files_are_merged(tmp_path):
    write(tmp_path / "trainflow.toml", '[models]\none = "m:one"\n')
    write(tmp_path / "pyproject.toml", '[tool.trainflow.models]\ntwo = "m:two"\n')
    assert registered_names("models") == ("one", "two")


def test_the_project_is_found_from_a_subfolder(tmp_path, monkeypatch):
    write(tmp_path / "trainflow.toml", '[models]\nnet = "m:build"\n')
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)
    assert project_root() == tmp_path.resolve()
    assert lookup("models", "net").root == str(tmp_path.resolve())


def test_no_project_registers_nothing(tmp_path):
    assert registry() == {kind: {} for kind in KINDS}
    assert registered_names("models") == ()


def test_the_search_stops_at_a_pyproject_without_a_trainflow_table(tmp_path, monkeypatch):
    write(tmp_path / "trainflow.toml", '[models]\nparents = "m:build"\n')
    inner = tmp_path / "inner"
    write(inner / "pyproject.toml", '[project]\nname = "inner"\n')
    monkeypatch.chdir(inner)
    assert project_root() == inner.resolve()
    assert registered_names("models") == ()
    assert lookup("models", "parents") is None


def test_the_search_stops_at_a_git_folder(tmp_path, monkeypatch):
    write(tmp_path / "trainflow.toml", '[models]\nparents = "m:build"\n')
    inner = tmp_path / "repo"
    (inner / ".git").mkdir(parents=True)
    monkeypatch.chdir(inner)
    assert project_root() == inner.resolve()
    assert registered_names("models") == ()


# --- errors in the registry files ------------------------------------------------------------


@pytest.mark.parametrize(
    "target", ["json.dumps", "nets", "nets:", ":build", "nets:build.inner", "1nets:build", ""]
)
def test_a_target_that_is_not_module_colon_attribute_names_the_file_and_entry(tmp_path, target):
    file = write(tmp_path / "trainflow.toml", f'[models]\nbad = "{target}"\n')
    one_line_error(str(file), "models.bad", repr(target), "module.path:attribute")
    assert registered_names("models") == ()  # the command line lists none, the run says why


def test_bad_toml_is_one_line_naming_the_file(tmp_path):
    file = write(tmp_path / "trainflow.toml", '[models]\nnet = "m:build\nother = 1\n')
    one_line_error(str(file), "not valid TOML")


def test_bad_toml_in_pyproject_is_one_line_naming_the_file(tmp_path):
    file = write(tmp_path / "pyproject.toml", "[tool.trainflow.models\n")
    one_line_error(str(file), "not valid TOML")


@pytest.mark.parametrize(
    ("file_name", "text"),
    [
        ("trainflow.toml", '[model]\nnet = "m:build"\n'),
        ("pyproject.toml", '[tool.trainflow.modles]\nnet = "m:build"\n'),
        ("trainflow.toml", "extra = 1\n"),
    ],
)
def test_an_unknown_table_is_named(tmp_path, file_name, text):
    file = write(tmp_path / file_name, text)
    one_line_error(str(file), "unknown table", "known: models, losses, metrics, augmentations")


def test_a_name_registered_in_both_files_is_refused(tmp_path):
    toml = write(tmp_path / "trainflow.toml", '[models]\nnet = "a:build"\n')
    pyproject = write(tmp_path / "pyproject.toml", '[tool.trainflow.models]\nnet = "b:build"\n')
    one_line_error(str(toml), str(pyproject), "models.net")


@pytest.mark.parametrize(
    "text",
    ['[models]\n"1net" = "m:build"\n', '[models]\n"a b" = "m:build"\n', "[models]\nnet = 3\n"],
    ids=["leading_digit", "space", "not_a_string"],
)
def test_bad_names_and_values_are_named(tmp_path, text):
    file = write(tmp_path / "trainflow.toml", text)
    one_line_error(str(file), "models.")


def test_a_kind_that_is_not_a_table_is_refused(tmp_path):
    file = write(tmp_path / "trainflow.toml", 'models = "m:build"\n')
    one_line_error(str(file), "models must be a table")


def test_a_pyproject_whose_tool_is_not_a_table_is_an_input_error(tmp_path):
    write(tmp_path / "pyproject.toml", 'tool = "x"\n')
    # Either no names (no [tool.trainflow] table) or a one-line InputError; never a traceback.
    assert registered_names("models") == ()


def test_a_registry_file_owned_by_another_user_is_refused(tmp_path, monkeypatch):
    file = write(tmp_path / "trainflow.toml", '[models]\nnet = "m:build"\n')
    uid = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: uid + 1)
    one_line_error(str(file), "owned by another user")
    with pytest.raises(InputError, match="owned by another user"):
        lookup("models", "net")
    assert registered_names("models") == ()


def test_a_pyproject_of_another_user_without_trainflow_table_is_no_registry(tmp_path, monkeypatch):
    write(tmp_path / "pyproject.toml", '[project]\nname = "theirs"\n')
    uid = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: uid + 1)
    assert registry() == {kind: {} for kind in KINDS}


# --- loading ----------------------------------------------------------------------------------


def _project(tmp_path: Path, kind: str, name: str, target: str) -> None:
    table = f"[{kind}]\n{name} = {target!r}\n".replace("'", '"')
    write(tmp_path / "trainflow.toml", table)


def test_load_imports_the_projects_object(tmp_path):
    module = unique()
    write(tmp_path / f"{module}.py", "def build(spec):\n    return ('built', spec)\n")
    _project(tmp_path, "models", "net", f"{module}:build")
    build = load(lookup("models", "net"))
    assert build(3) == ("built", 3)
    assert build is sys.modules[module].build
    assert Path(sys.modules[module].__file__).resolve() == (tmp_path / f"{module}.py").resolve()


def test_load_imports_a_submodule_of_a_project_package(tmp_path):
    package = unique()
    write(tmp_path / package / "__init__.py", "")
    write(tmp_path / package / "losses.py", "def focal(pred, y):\n    return 'focal'\n")
    _project(tmp_path, "losses", "focal", f"{package}.losses:focal")
    item = lookup("losses", "focal")
    assert load(item)(None, None) == "focal"
    assert load(item)(None, None) == "focal"  # a second load finds it imported from the project


def test_a_module_in_a_namespace_package_loads_twice(tmp_path):
    package = unique()
    write(tmp_path / package / "nets.py", "def build(spec):\n    return spec\n")
    _project(tmp_path, "models", "net", f"{package}.nets:build")
    item = lookup("models", "net")
    assert load(item)(1) == 1
    assert load(item)(2) == 2  # the pipeline loads an entry more than once per run


def test_a_deferred_import_in_the_projects_function_works_after_load(tmp_path):
    module, helper = unique(), unique()
    write(tmp_path / f"{helper}.py", "VALUE = 41\n")
    write(
        tmp_path / f"{module}.py",
        f"def build(spec):\n    import {helper}\n\n    return {helper}.VALUE + spec\n",
    )
    _project(tmp_path, "models", "net", f"{module}:build")
    build = load(lookup("models", "net"))
    assert build(1) == 42


def test_a_stdlib_module_is_refused(tmp_path):
    file = tmp_path / "trainflow.toml"
    _project(tmp_path, "metrics", "dumps", "json:dumps")
    with pytest.raises(InputError) as info:
        load(lookup("metrics", "dumps"))
    message = str(info.value)
    assert "\n" not in message and str(file) in message and "metrics.dumps" in message
    assert "'json'" in message


def test_a_module_already_imported_from_elsewhere_is_refused_even_if_the_project_has_one(
    tmp_path,
):
    # The project's own json.py: the json already imported is the standard library's.
    write(tmp_path / "json.py", "def dumps(value):\n    return 'project'\n")
    _project(tmp_path, "metrics", "dumps", "json:dumps")
    with pytest.raises(InputError, match="standard-library module's name"):
        load(lookup("metrics", "dumps"))
    import json

    assert json.dumps(1) == "1"


def test_a_project_module_named_like_a_standard_library_one_is_refused_imported_or_not(tmp_path):
    """Its import would replace the standard library's module for the whole process, and the
    cache once keyed it by the Python version instead of its text."""
    assert "tabnanny" not in sys.modules  # a standard-library module nothing here imports
    write(tmp_path / "tabnanny.py", "def build(spec):\n    return None\n")
    _project(tmp_path, "models", "shadow", "tabnanny:build")
    one_line_error("tabnanny", "standard-library", call=lambda: load(lookup("models", "shadow")))
    assert "tabnanny" not in sys.modules


def test_a_module_that_is_not_in_the_project_folder_is_refused(tmp_path):
    # Installed elsewhere, but never in the project folder: nothing is imported.
    missing = unique()
    _project(tmp_path, "models", "net", f"{missing}:build")
    with pytest.raises(InputError, match="no module") as info:
        load(lookup("models", "net"))
    assert str(tmp_path) in str(info.value) and missing not in sys.modules


def test_a_module_installed_but_not_imported_is_not_taken_from_site_packages(tmp_path, monkeypatch):
    # A real module on sys.path (outside the project), not yet imported.
    elsewhere = tmp_path.parent / f"{tmp_path.name}-site"
    module = unique()
    write(elsewhere / f"{module}.py", "def build(spec):\n    return 'installed'\n")
    sys.path.append(str(elsewhere))
    project = tmp_path / "proj"
    _project(project, "models", "net", f"{module}:build")
    monkeypatch.chdir(project)
    with pytest.raises(InputError, match="no module"):
        load(lookup("models", "net"))
    assert module not in sys.modules


def test_a_missing_attribute_is_named(tmp_path):
    module = unique()
    write(tmp_path / f"{module}.py", "X = 1\n")
    _project(tmp_path, "models", "net", f"{module}:build")
    with pytest.raises(InputError, match="'build'") as info:
        load(lookup("models", "net"))
    message = str(info.value)
    assert "\n" not in message and "models.net" in message
    assert str(tmp_path / "trainflow.toml") in message


@pytest.mark.parametrize(
    ("source", "why"),
    [
        ("def build(spec)\n    return 1\n", "SyntaxError"),
        ("import tfproj_no_such_module_anywhere\n", "ModuleNotFoundError"),
        ("raise RuntimeError('first line\\nsecond line')\n", "RuntimeError: first line"),
    ],
    ids=["syntax_error", "import_error", "multi_line_error"],
)
def test_an_error_in_the_users_module_is_one_line_naming_file_and_entry(tmp_path, source, why):
    module = unique()
    write(tmp_path / f"{module}.py", source)
    _project(tmp_path, "augmentations", "mine", f"{module}:build")
    item = lookup("augmentations", "mine")
    message = one_line_error(
        str(tmp_path / "trainflow.toml"),
        "augmentations.mine",
        "cannot import it",
        why,
        call=lambda: load(item),
    )
    assert "second line" not in message


def test_the_run_folders_copy_holds_every_project_module_the_key_counts(tmp_path):
    """Not the registered module alone: the packages above it and the helpers it imports, as
    imported (a helper's edit retrains, so the copy must show it)."""
    from trainflow.tasks.engine.registered import project_sources

    top = unique()
    write(tmp_path / top / "__init__.py", "X = 1\n")
    write(tmp_path / top / "b" / "c.py", "from . import d\n\n\ndef build(spec):\n    return d.H\n")
    write(tmp_path / top / "b" / "d.py", "H = 8\n")
    _project(tmp_path, "models", "deep", f"{top}.b.c:build")
    sources = project_sources([("models", "deep"), ("losses", "mse")])
    assert sources == {
        f"{top}/__init__.py": b"X = 1\n",
        f"{top}/b/c.py": (tmp_path / top / "b" / "c.py").read_bytes(),
        f"{top}/b/d.py": b"H = 8\n",
    }


def test_a_project_moved_to_another_folder_keys_its_code_as_before(tmp_path, monkeypatch):
    """The key counts the registered target and the code's text, never where the project
    lies: a moved or re-cloned project hits the entries it made."""
    from trainflow.tasks.engine.registered import registered_code

    module = unique()
    keys = []
    for place in ("here", "moved"):
        root = tmp_path / place
        write(
            root / f"{module}.py",
            "from torch import nn\n\n\ndef build(spec):\n    return nn.ReLU()\n",
        )
        _project(root, "models", "net", f"{module}:build")
        monkeypatch.chdir(root)
        keys.append(registered_code("models", "net"))
        del sys.modules[module]
    assert keys[0] == keys[1] and keys[0]["target"] == f"{module}:build"
    write(
        tmp_path / "moved" / f"{module}.py",
        "from torch import nn\n\n\ndef build(spec):\n    return nn.Tanh()\n",
    )
    keys.append(registered_code("models", "net"))
    assert keys[2]["code"] != keys[1]["code"]  # and an edit there still misses
