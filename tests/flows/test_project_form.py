"""The project's own names are the config's choices: `--help`, validation and the UI form's
JSON schema (what a deployment made from the project offers) list them."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.system

REGISTRY = """
[tool.trainflow.models]
tiny = "parts:build"

[tool.trainflow.losses]
smooth = "parts:smooth"

[tool.trainflow.metrics]
top2 = "parts:top2"

[tool.trainflow.augmentations]
jitter = "parts:jitter"
"""
SCHEMA = (
    "import json; from trainflow.flows.config import TrainConfig; "
    "print(json.dumps(TrainConfig.model_json_schema()))"
)


def _schema(cwd) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", SCHEMA], cwd=cwd, capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout)


def test_the_ui_form_offers_the_projects_names_and_only_in_the_project(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "pyproject.toml").write_text(REGISTRY)
    (tmp_path / "elsewhere").mkdir()
    properties = _schema(project)["properties"]
    assert "tiny" in properties["model"]["enum"]
    assert {"linear", "mlp"} <= set(properties["model"]["enum"])
    assert "smooth" in properties["loss"]["enum"] and "mse" in properties["loss"]["enum"]
    assert properties["extra_metrics"]["items"]["enum"] == ["top2"]
    assert properties["augment"]["items"]["enum"] == ["crop", "flip", "jitter"]
    outside = _schema(tmp_path / "elsewhere")["properties"]
    assert "tiny" not in outside["model"]["enum"] and "smooth" not in outside["loss"]["enum"]
    assert outside["augment"]["items"]["enum"] == ["crop", "flip"]


def test_an_unregistered_name_is_one_line_naming_the_flag(tmp_path):
    (tmp_path / "pyproject.toml").write_text(REGISTRY)
    done = subprocess.run(
        [sys.executable, "-m", "trainflow.flows.main", "train", "--extra-metrics", "top3"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()[-1:]
    assert "--extra-metrics" in line and "top3" in line and "top2" in line, done.stderr
