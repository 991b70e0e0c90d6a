"""One import name: the wheel installs `trainflow` alone, so a user's own `tasks` or `flows`
package never collides with ours; the `trainflow` command is each script, exit codes too."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from .conftest import REPO

pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # Built from a copy: a build in the checkout would leave build/ and metadata behind.
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    for folder in ("tasks", "flows"):
        shutil.copytree(
            REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__")
        )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(source)],
        check=True,
        capture_output=True,
    )
    (built,) = out.glob("trainflow-*.whl")
    return built


def test_the_wheel_installs_one_top_level_package(wheel: Path):
    names = zipfile.ZipFile(wheel).namelist()
    top = {
        name.split("/", 1)[0] for name in names if not name.split("/", 1)[0].endswith(".dist-info")
    }
    assert top == {"trainflow"}
    packages = {str(Path(name).parent) for name in names if name.endswith("/__init__.py")}
    # Every package of the repository's folders is in it (a sub-package left out of
    # pyproject.toml's list would install a trainflow that fails on import).
    on_disk = {
        "trainflow/" + str(init.parent.relative_to(REPO))
        for folder in ("flows", "tasks")
        for init in (REPO / folder).rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert packages == on_disk
    assert "trainflow-0.1.0.dist-info/licenses/LICENSE" in names


USER_PROJECT = """\
import json, sys
import flows, tasks  # the user's own packages, beside trainflow's
from trainflow.tasks.engine.fit import train_model
from trainflow.tasks.data.tensors import synthetic
from trainflow.tasks.data.splits import split_indices
from trainflow.tasks.data.batches import make_loaders
from trainflow.tasks.engine.models import initial_model, model_spec
import torch

data = synthetic()
parts = split_indices(len(data), 0.2, 42)
loaders = make_loaders(data, parts, 16, 42, "tensor", 0, torch.device("cpu"))
initial = initial_model(model_spec("linear", 1, 1, (), "relu"), 42)
trained = train_model(initial, loaders, "sgd", 0.1, 0.0, 0.0, "mse", 3, torch.device("cpu"))
print(json.dumps({"user": [tasks.MINE, flows.MINE], "trained": len(trained.train_loss),
                  "trainflow": sys.modules["trainflow.tasks"].__file__}))
"""


def test_a_user_project_with_its_own_tasks_and_flows_packages_trains(tmp_path: Path):
    project = tmp_path / "project"
    for package in ("tasks", "flows"):
        (project / package).mkdir(parents=True)
        (project / package / "__init__.py").write_text(f"MINE = {package!r}\n")
    done = subprocess.run(
        [sys.executable, "-c", USER_PROJECT], cwd=project, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = __import__("json").loads(done.stdout.strip().splitlines()[-1])
    assert out["user"] == ["tasks", "flows"]
    assert out["trained"] == 3
    assert Path(out["trainflow"]).parent == REPO / "tasks"


@pytest.mark.parametrize(
    ("command", "script"),
    [
        (["train", "--lr", "-1"], ["flows/train_flow.py", "--lr", "-1"]),
        (["predict", "--no-such-flag"], ["flows/predict_flow.py", "--no-such-flag"]),
        (["sweep", "--grid", "lr"], ["flows/sweep_flow.py", "--grid", "lr"]),
        (["cache", "bogus"], ["flows/cache_cli.py", "bogus"]),
        (["train", "--help"], ["flows/train_flow.py", "--help"]),
    ],
)
def test_the_trainflow_command_is_the_script_it_names(
    command: list[str], script: list[str], tmp_path: Path
):
    """Same exit code, same message but the program's name, on stdout and stderr alike."""
    trainflow = Path(sys.executable).parent / "trainflow"
    by_command = subprocess.run(
        [str(trainflow), *command], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    by_script = subprocess.run(
        [sys.executable, str(REPO / script[0]), *script[1:]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert by_command.returncode == by_script.returncode
    name = Path(script[0]).name
    prog = f"trainflow {command[0]}"
    # (argparse wraps a usage line at another column for a longer program name)
    assert words(by_command.stderr) == words(by_script.stderr.replace(name, prog))
    assert words(by_command.stdout) == words(by_script.stdout.replace(name, prog))


def words(text: str) -> list[str]:
    return text.split()


def test_an_unknown_command_exits_2_naming_it(tmp_path: Path):
    trainflow = Path(sys.executable).parent / "trainflow"
    done = subprocess.run([str(trainflow), "tran"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 2
    assert (
        done.stderr.strip().splitlines()[-1].startswith("trainflow: error: unknown command 'tran'")
    )
