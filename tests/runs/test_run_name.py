"""A flow-run name is free text; the run folder made from it never leaves runs_dir."""

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainflow.flows.config import RUN_NAME, TrainConfig
from trainflow.flows.train_flow import train_flow
from trainflow.tasks.rules import safe_run_name
from trainflow.tasks.runs.folder import config_conflict

HOSTILE = [
    "../../escape",
    "..",
    ".",
    "/etc/passwd",
    "a/../../b",
    "~root",
    "",
    "   ",
    "C:\\x",
    "name with spaces",
    "nul\0byte",
    "ünïcödé-ランナー",
    "-rf",
    ".hidden",
    "x" * 500,
]


@pytest.mark.parametrize("text", HOSTILE)
def test_a_hostile_name_becomes_one_plain_folder_name(text, tmp_path):
    name = safe_run_name(text)
    assert re.fullmatch(RUN_NAME, name), name  # what --run-name itself accepts
    assert name not in (".", "..") and len(name) <= 64
    assert (tmp_path / name).resolve().parent == tmp_path.resolve()


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_any_name_stays_inside_the_runs_folder(text):
    name = safe_run_name(text)
    assert re.fullmatch(RUN_NAME, name), name
    assert Path("/runs", name).resolve().parent == Path("/runs")


def test_a_plain_name_is_kept_as_it_is():
    assert safe_run_name("nightly-run_3.v2") == "nightly-run_3.v2"
    assert safe_run_name("bold heron / retry") == "bold_heron_retry"


@pytest.mark.usefixtures("prefect_api")
def test_a_custom_flow_run_name_cannot_escape_runs_dir(tmp_path):
    runs = tmp_path / "deep" / "runs"
    config = TrainConfig(epochs=1, runs_dir=str(runs), cache_dir=str(tmp_path / "cache"))
    summary = train_flow.with_options(flow_run_name="../../escaped/../..")(config)
    run_dir = Path(summary.run_dir)
    assert run_dir.parent == runs.absolute()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "deep"]  # nothing beside runs
    assert [p.name for p in (tmp_path / "deep").iterdir()] == ["runs"]
    assert re.fullmatch(r"\d{8}-\d{6}-escaped-[0-9a-f]{8}", run_dir.name), run_dir.name


@pytest.mark.usefixtures("prefect_api")
def test_a_link_planted_in_runs_dir_is_refused_and_nothing_lands_where_it_points(tmp_path, capsys):
    from trainflow.flows.train_flow import main

    runs, outside = tmp_path / "runs", tmp_path / "outside"
    runs.mkdir()
    outside.mkdir()
    (runs / "evil").symlink_to(outside)
    flags = ["--epochs", "1", "--runs-dir", str(runs), "--cache-dir", str(tmp_path / "cache")]
    assert main([*flags, "--run-name", "evil"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()[-1:]
    assert "--run-name evil" in line and "link" in line
    assert list(outside.iterdir()) == []


def test_a_sweep_name_that_leaves_runs_dir_is_refused_in_one_line(tmp_path, capsys):
    from trainflow.flows.sweep_flow import main

    for hostile in ("../../escaped", str(tmp_path / "abs"), "a/b"):
        flags = ["--runs-dir", str(tmp_path / "runs"), "--grid", "lr=0.1", "--epochs", "1"]
        with pytest.raises(SystemExit) as exit_:
            main([*flags, "--sweep-name", hostile])
        assert exit_.value.code == 2
        assert (
            capsys.readouterr()
            .err.strip()
            .splitlines()[-1]
            .startswith("sweep_flow.py: error: --sweep-name")
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("text", ["[]", "null", '"a run"', "3", "{", ""])
def test_a_config_json_that_is_not_an_object_is_unreadable_not_a_crash(tmp_path, text):
    (tmp_path / "config.json").write_text(text)
    defaults = TrainConfig().model_dump(mode="json")
    assert config_conflict(tmp_path, defaults, defaults) == "its config.json is unreadable"
