"""End to end: the Prefect flow on a shared test server, checking every file of a run."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from trainflow.flows.config import TrainConfig
from trainflow.flows.parameters import ConfigFlow
from trainflow.flows.train_flow import train_flow
from trainflow.tasks.data.tensors import synthetic
from trainflow.tasks.errors import InputError

from ..conftest import REPO

pytestmark = pytest.mark.usefixtures("prefect_api")


def _scalars(path, tag="loss"):
    events = EventAccumulator(str(path)).Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def _logs(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
        )


def test_default_run_writes_the_whole_run_directory_and_converges(tmp_path):
    config = TrainConfig(runs_dir=str(tmp_path), run_name="seed")
    summary = train_flow(config)
    run = tmp_path / "seed"
    assert summary.run_dir == str(run)

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] == metrics["epochs_trained"] == 200
    assert len(metrics["train_loss"]) == len(metrics["val_loss"]) == 200
    assert metrics["final_val_loss"] == metrics["val_loss"][-1] == summary.final_val_loss

    saved = json.loads((run / "config.json").read_text())
    assert TrainConfig(**saved) == config

    split = load_file(run / "split.safetensors")
    assert split["train"].dtype == torch.int64 and len(split["train"]) == 80
    assert sorted(torch.cat([split["train"], split["val"]]).tolist()) == list(range(100))

    # TensorBoard: one training and one validation value per epoch, a graph, hparams.
    for curve in ("loss_training", "loss_validation"):
        assert [step for step, _ in _scalars(run / curve)] == list(range(200))
    np.testing.assert_allclose(
        [v for _, v in _scalars(run / "loss_validation")], metrics["val_loss"], rtol=1e-6
    )
    top = EventAccumulator(str(run)).Reload()
    assert top.Graph() is not None
    assert "_hparams_/session_start_info" in top.PluginTagToContent("hparams")

    # The weights solve the training split's least squares, and the program predicts with them.
    weights = load_file(run / "model.safetensors")
    data = synthetic()
    xt = torch.cat([data.x[split["train"]], torch.ones(80, 1)], 1).double().numpy()
    (w, b), *_ = np.linalg.lstsq(xt, data.y[split["train"]].double().numpy(), rcond=None)
    assert weights["0.weight"].item() == pytest.approx(w.item(), abs=5e-3)
    assert weights["0.bias"].item() == pytest.approx(b.item(), abs=5e-3)
    program = torch.export.load(run / "model.pt2").module()
    expected = data.x @ weights["0.weight"].T + weights["0.bias"]
    torch.testing.assert_close(program(data.x), expected)


def test_mlp_on_a_csv_file(tmp_path):
    rng = np.random.RandomState(0)
    table = rng.rand(60, 3)
    table[:, 2] = table[:, 0] - 2 * table[:, 1]
    np.savetxt(tmp_path / "data.csv", table, delimiter=",", header="a,b,target", comments="")
    config = TrainConfig(
        data=str(tmp_path / "data.csv"),
        model="mlp",
        hidden=(8,),
        epochs=5,
        optimizer="adam",
        lr=0.01,
        runs_dir=str(tmp_path / "runs"),
        run_name="csv",
    )
    summary = train_flow(config)
    assert summary.epochs == 5
    weights = load_file(tmp_path / "runs" / "csv" / "model.safetensors")
    assert weights["0.weight"].shape == (8, 2)


def test_bad_data_fails_before_training_and_leaves_no_run_directory(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n3,x\n")
    with pytest.raises(InputError, match=r"line 3, column 'b'"):
        train_flow.with_options(retries=0)(
            TrainConfig(data=str(bad), runs_dir=str(tmp_path / "runs"))
        )
    assert not (tmp_path / "runs").exists()


def test_command_line_run_against_a_server(tmp_path, subprocess_env):
    from prefect.client.orchestration import get_client

    result = subprocess.run(
        [
            sys.executable,
            "flows/train_flow.py",
            "--epochs",
            "3",
            "--runs-dir",
            str(tmp_path),
            "--run-name",
            "cli",
        ],
        cwd=REPO,
        env=subprocess_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "run directory:" in result.stdout
    assert json.loads((tmp_path / "cli" / "metrics.json").read_text())["epochs"] == 3
    # The process ends without the interpreter's teardown (flows/session/runtime.py, exit_process):
    # what it wrote before exiting is whole, on disk and on the server.
    run = tmp_path / "cli"
    for curve in ("loss_training", "loss_validation"):
        assert [step for step, _ in _scalars(run / curve)] == [0, 1, 2]
    assert "_hparams_/session_start_info" in EventAccumulator(str(run)).Reload().PluginTagToContent(
        "hparams"
    )
    flow_run_id = result.stdout.strip().splitlines()[-1].rsplit("/", 1)[-1]
    finished = [log for log in _logs(flow_run_id) if log.message.startswith("Finished in state")]
    assert sum(log.task_run_id is None for log in finished) == 1  # the flow run's last line
    assert sum(log.task_run_id is not None for log in finished) == 6  # one per stage
    # The UI's parameters are the config as the command line resolved it.
    with get_client(sync_client=True) as client:
        parameters = client.read_flow_run(flow_run_id).parameters
    saved = json.loads((run / "config.json").read_text())
    assert parameters == {"config": saved}


def test_command_line_reports_bad_data_in_one_line(tmp_path, subprocess_env):
    result = subprocess.run(
        [
            sys.executable,
            "flows/train_flow.py",
            "--data",
            str(tmp_path / "missing.npz"),
            "--runs-dir",
            str(tmp_path / "runs"),
        ],
        cwd=REPO,
        env=subprocess_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last == f"train_flow.py: error: data file {str(tmp_path / 'missing.npz')!r}: not found"
    assert not (tmp_path / "runs").exists()


def test_the_run_shows_in_the_prefect_ui_as_a_summary_and_a_loss_table(tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
    )

    state = train_flow(
        TrainConfig(epochs=300, runs_dir=str(tmp_path), run_name="ui"), return_state=True
    )
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    by_key = {a.key: a for a in artifacts}
    summary, table = by_key["train-summary"], by_key["train-losses"]
    assert str(tmp_path / "ui") in summary.data and "tensorboard --logdir" in summary.data
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert len(rows) == 200  # 300 epochs, thinned
    assert rows[0]["epoch"] == 0 and rows[-1]["epoch"] == 299
    # The DAG: each stage's inputs name the task runs they came from (the trained model
    # passed without Prefect walking its per-epoch lists still links export-graph).
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    ids = {run.id: run.name.rsplit("-", 1)[0] for run in runs}
    inputs = {
        ids[run.id]: {k: [ids[i.id] for i in v] for k, v in run.task_inputs.items() if v}
        for run in runs
    }
    assert inputs["export-graph"] == {
        "trained": ["train-epochs"],
        "parts": ["split"],
        "sample": ["build-loaders"],
    }, inputs["export-graph"]
    assert inputs["train-epochs"] == {"initial": ["build-model"], "loaders": ["build-loaders"]}


@pytest.mark.parametrize(
    "config",
    [
        TrainConfig(),
        TrainConfig(model="mlp", hidden=(8, 4), target=("a", "b"), run_name="x", lr=1e-3),
    ],
)
def test_the_config_is_stored_as_prefect_itself_stores_it(config):
    from prefect import Flow

    def fn(config: TrainConfig, other: dict, note: str = "") -> None: ...

    parameters = {"note": "n", "config": config, "other": {"x": (1, 2)}}
    ours = ConfigFlow(fn=fn, name="train").with_options(retries=0)
    assert isinstance(ours, ConfigFlow) and isinstance(train_flow, ConfigFlow)
    stored = ours.serialize_parameters(parameters)
    assert stored == Flow(fn=fn, name="train").serialize_parameters(parameters)
    assert list(stored) == ["note", "config", "other"]


def test_a_command_line_run_sends_no_heartbeats_and_keeps_every_other_setting(monkeypatch):
    from prefect.settings import (
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        get_current_settings,
        temporary_settings,
    )

    from trainflow.flows.session import runtime

    for name in runtime.HEARTBEAT_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    with runtime.command_line_run():
        inside = get_current_settings()
    # What Prefect's own temporary_settings makes of the same change: equal, field by field.
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}) as expected:
        pass
    assert inside.flows.heartbeat_frequency is None
    assert inside == expected
    assert get_current_settings().flows.heartbeat_frequency is not None  # only inside
