"""A flow-run name is free text; the run folder made from it never leaves runs_dir."""

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainflow.flows.config import RUN_NAME, TrainConfig
from trainflow.flows.train_flow import train_flow
from trainflow.tasks.rules import safe_run_name

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
