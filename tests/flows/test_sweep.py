"""Sweeps: grids, seeded samples, shared stages computed once, threads, Dask and Ray, and
trials that are DDP jobs themselves."""

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from prefect.task_runners import ThreadPoolTaskRunner

from trainflow.flows.config import TrainConfig
from trainflow.flows.sweep_flow import (
    main,
    parse_grid,
    plan_points,
    rank,
    sweep_flow,
    task_runner,
    torch_threads_per_trial,
    trial_configs,
)
from trainflow.flows.train_flow import train_flow
from trainflow.tasks.errors import InputError

from .test_resume_flow import Result


def test_a_grid_parses_fields_and_list_values():
    assert parse_grid(["lr=0.01,0.1", "batch-size=16", "hidden=8;16,16"]) == {
        "lr": ["0.01", "0.1"],
        "batch_size": ["16"],
        "hidden": ["8", "16,16"],
    }


@pytest.mark.parametrize("spec", ["nope=1", "lr", "lr=", "run_name=a,b", "cache_dir=x"])
def test_a_bad_grid_names_itself(spec):
    with pytest.raises(InputError, match="--grid"):
        parse_grid([spec])


def test_points_are_the_product_or_a_seeded_sample_in_grid_order():
    grid = {"lr": ["1", "2", "3"], "batch_size": ["8", "16"]}
    every = plan_points(grid, None, 0)
    assert len(every) == 6 and every[0] == {"lr": "1", "batch_size": "8"}
    sample = plan_points(grid, 3, seed=7)
    assert sample == plan_points(grid, 3, seed=7) and len(sample) == 3
    assert sample == sorted(sample, key=every.index)
    assert plan_points(grid, 3, seed=8) != sample or plan_points(grid, 3, seed=9) != sample


def test_each_point_is_a_validated_config_in_the_sweep_folder(tmp_path):
    configs = trial_configs(TrainConfig(), [{"lr": "0.5"}, {"lr": "0.25"}], tmp_path)
    assert [c.lr for c in configs] == [0.5, 0.25]
    assert {c.runs_dir for c in configs} == {str(tmp_path)}
    assert configs[0].run_name != configs[1].run_name
    with pytest.raises(InputError, match=r"--lr: input should be greater than 0"):
        trial_configs(TrainConfig(), [{"lr": "-1"}], tmp_path)


def test_trials_share_the_cores():
    assert torch_threads_per_trial(1) == (os.cpu_count() or 1)
    assert torch_threads_per_trial(10**6) == 1


def test_ranking_puts_failures_last():
    rows = [
        {"status": "completed", "final_val_loss": 0.3, "run_name": "a"},
        {"status": "failed", "error": "boom", "run_name": "b"},
        {"status": "completed", "final_val_loss": 0.1, "run_name": "c"},
    ]
    assert [(r["rank"], r["run_name"]) for r in rank(rows)] == [(1, "c"), (2, "a"), (None, "b")]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--grid", "nope=1"], "--grid 'nope=1'"),
        (["--grid", "lr=0.1", "--random", "0"], "--random must be at least 1"),
        (["--grid", "lr=0.1", "--max-concurrency", "0"], "--max-concurrency"),
    ],
)
def test_the_command_line_rejects_bad_sweep_options_in_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sweep_flow.py: error: ") and message in err and "\n" not in err


def _sweep(tmp_path, runner):
    base = TrainConfig(epochs=8, runs_dir=str(tmp_path / "runs"), cache_dir=str(tmp_path / "c"))
    grid = {"lr": ["0.05", "0.1", "100"], "batch_size": ["16", "32"]}
    return sweep_flow.with_options(task_runner=runner)(
        base, grid, random_points=4, seed=1, max_concurrency=2, sweep_name="s"
    )


def _check(tmp_path, ranked):
    assert len(ranked) == 4
    completed = [r for r in ranked if r["status"] == "completed"]
    failed = [r for r in ranked if r["status"] == "failed"]
    assert completed and all("NonFiniteLoss" in r["error"] for r in failed)  # lr=100 diverges
    losses = [r["final_val_loss"] for r in completed]
    assert (
        losses == sorted(losses)
        and [r["rank"] for r in completed] == list(range(1, 5))[: len(completed)]
    )
    states = [r["stages"]["load-tensors"] for r in completed]
    assert states.count("Completed") <= 1 and states.count("Cached") >= len(completed) - 1
    record = json.loads((tmp_path / "runs" / "s" / "sweep.json").read_text())
    assert [t["run_name"] for t in record["trials"]] == [r["run_name"] for r in ranked]
    for row in completed:  # each trial is a full run folder, compared in one TensorBoard view
        assert (Path(row["run_dir"]) / "model.safetensors").is_file()


@pytest.mark.usefixtures("prefect_api")
def test_a_sweep_on_threads(tmp_path):
    _check(tmp_path, _sweep(tmp_path, ThreadPoolTaskRunner(max_workers=2)))


def test_a_sweep_on_a_local_dask_cluster(tmp_path, prefect_api, monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", prefect_api)  # the workers are other processes
    _check(tmp_path, _sweep(tmp_path, task_runner("dask", 2, None)))


def test_a_sweep_on_a_local_ray(tmp_path, prefect_api, monkeypatch):
    # A real local Ray (the dev extra installs it): trials run in Ray worker processes.
    import ray

    monkeypatch.setenv("PREFECT_API_URL", prefect_api)  # the workers are other processes
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")  # nothing leaves this machine
    try:
        _check(tmp_path, _sweep(tmp_path, task_runner("ray", 2, None)))
    finally:
        ray.shutdown()


# --- a trial that is itself a DDP job ---------------------------------------------------------

# 160 training rows: 10 global batches of 16 an epoch, 8 rows a rank.
DDP_TRIAL = {"epochs": 3, "n_samples": 200, "nproc": 2, "hang_timeout": 60.0}


@pytest.fixture(scope="module")
def alone(tmp_path_factory, prefect_api):
    """What one point of the DDP sweeps below trains on its own: train_flow, 2 processes."""
    root = tmp_path_factory.mktemp("ddp-alone")
    config = TrainConfig(
        **DDP_TRIAL, lr=0.2, runs_dir=str(root / "runs"), cache_dir=str(root / "c"), run_name="a"
    )
    return Result.of(train_flow(config).run_dir)


@pytest.mark.parametrize("runner", ["threads", "dask"])
def test_a_trial_may_itself_be_a_two_process_job(tmp_path, prefect_api, monkeypatch, alone, runner):
    """Three trials, two at a time (the first alone, then two side by side: two elastic
    launchers in one process on threads, in two daemon-free worker processes on Dask), each
    of 2 ranks: every trial completes, and a trial trains what its point trains on its own."""
    monkeypatch.setenv("PREFECT_API_URL", prefect_api)  # Dask's workers are other processes
    base = TrainConfig(**DDP_TRIAL, runs_dir=str(tmp_path / "runs"), cache_dir=str(tmp_path / "c"))
    ranked = sweep_flow.with_options(task_runner=task_runner(runner, 2, None))(
        base, {"lr": ["0.05", "0.1", "0.2"]}, max_concurrency=2, sweep_name="s"
    )
    assert [r["status"] for r in ranked] == ["completed"] * 3, ranked
    assert all(r["stages"]["train-epochs"] == "Completed" for r in ranked), ranked
    [point] = [r for r in ranked if r["run_name"].endswith("lr0.2")]
    assert Result.of(point["run_dir"]).same_run_as(alone)


def test_a_daemonic_worker_cannot_start_ranks_and_says_how_to_fix_it(monkeypatch):
    from trainflow.tasks.engine.launch import Job, run_ranks
    from trainflow.tasks.engine.options import Launch

    monkeypatch.setattr("multiprocessing.current_process", lambda: SimpleNamespace(daemon=True))
    job = Job({}, 1, "cpu", None, None, "", progress="", threads=1, hang_timeout=1.0)
    with pytest.raises(InputError) as error:
        run_ranks(Launch(nproc=2), job, print)
    message = str(error.value)
    assert "--nproc 2" in message and "DASK_DISTRIBUTED__WORKER__DAEMON=False" in message
    assert "\n" not in message
