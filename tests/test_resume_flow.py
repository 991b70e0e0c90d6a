"""Crash-proof training end to end: real processes, real signals, bytes compared."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import tasks.train
from flows.config import TrainConfig
from flows.train_flow import train_flow

from .conftest import REPO

pytestmark = pytest.mark.usefixtures("prefect_api")

# 1,000 batches per epoch, a few seconds of training for 40 epochs on these machines.
BY_EPOCH = ["--n-samples", "20000", "--epochs", "40", "--checkpoint-every-epochs", "4",
            "--checkpoint-every-seconds", "0"]  # fmt: skip
# 20,000 batches per epoch (about a second each): time-based checkpoints land mid-epoch.
MID_EPOCH = ["--n-samples", "400000", "--epochs", "3", "--checkpoint-every-seconds", "0.2"]


def _start(tmp_path, env, args, cache, name):
    return subprocess.Popen(
        [sys.executable, str(REPO / "flows" / "train_flow.py"), *args, "--runs-dir",
         str(tmp_path / "runs"), "--run-name", name, "--cache-dir", str(tmp_path / cache)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def _finish(process) -> str:
    out, _ = process.communicate(timeout=600)
    assert process.returncode == 0, out
    return out


def _checkpoints(cache: Path) -> list[tuple[int, int]]:
    names = (p.name.split("-") for p in cache.glob("checkpoints/*/ckpt-*.safetensors"))
    return sorted((int(epoch), int(batch)) for _, epoch, batch, _ in names)


def _wait_for(cache: Path, ready, timeout=120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(ready(epoch, batch) for epoch, batch in _checkpoints(cache)):
            return
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint matched in {timeout} s: {_checkpoints(cache)}")


def _steps(run: Path) -> list[int]:
    events = EventAccumulator(str(run / "loss_training")).Reload()
    return [e.step for e in events.Scalars("loss")]


@pytest.fixture(scope="module")
def references(tmp_path_factory, prefect_api):
    """Uninterrupted runs of both configs, in their own cache."""
    import os

    root = tmp_path_factory.mktemp("reference")
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    runs = {name: _start(root, env, args, "cache", name)
            for name, args in (("by-epoch", BY_EPOCH), ("mid-epoch", MID_EPOCH))}  # fmt: skip
    for process in runs.values():
        _finish(process)
    return {name: (root / "runs" / name / "model.safetensors").read_bytes() for name in runs}


@pytest.mark.parametrize(
    ("args", "reference", "ready"),
    [
        (BY_EPOCH, "by-epoch", lambda epoch, batch: epoch >= 4),
        (BY_EPOCH, "by-epoch", lambda epoch, batch: epoch >= 24),
        (MID_EPOCH, "mid-epoch", lambda epoch, batch: epoch >= 1 and batch > 0),
    ],
    ids=["early", "late", "mid-epoch"],
)
def test_a_sigkilled_run_resumes_and_ends_bit_identical(
    tmp_path, subprocess_env, references, args, reference, ready
):
    victim = _start(tmp_path, subprocess_env, args, "cache", "run")
    _wait_for(tmp_path / "cache", ready)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    last = _checkpoints(tmp_path / "cache")[-1]

    out = _finish(_start(tmp_path, subprocess_env, args, "cache", "run"))  # same run folder
    run = tmp_path / "runs" / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["resumed_from"] is not None
    assert (metrics["resumed_from"]["epoch"], metrics["resumed_from"]["batch"]) >= last
    assert f"resumed from epoch {metrics['resumed_from']['epoch']}" in out
    assert (run / "model.safetensors").read_bytes() == references[reference]
    assert _steps(run) == list(range(metrics["epochs"]))  # each epoch exactly once


def test_sigterm_and_sigint_checkpoint_and_exit_with_the_signal_code(tmp_path, subprocess_env):
    for signum in (signal.SIGTERM, signal.SIGINT):
        cache = f"cache-{signum.name}"
        process = _start(tmp_path, subprocess_env, BY_EPOCH, cache, signum.name)
        _wait_for(tmp_path / cache, lambda epoch, batch: epoch >= 4)
        before = _checkpoints(tmp_path / cache)[-1]
        process.send_signal(signum)
        out, _ = process.communicate(timeout=120)
        assert process.returncode == 128 + signum, out
        assert "checkpoint saved" in out
        assert _checkpoints(tmp_path / cache)[-1] > before


def _config(tmp_path, name, **overrides):
    base = {"n_samples": 200, "epochs": 12, "checkpoint_every_epochs": 2,
            "checkpoint_every_seconds": 0, "runs_dir": str(tmp_path / "runs"), "run_name": name,
            "cache_dir": str(tmp_path / name)}  # fmt: skip
    return TrainConfig(**{**base, **overrides})


def test_a_task_retry_resumes_from_the_last_checkpoint(tmp_path, monkeypatch):
    reference = train_flow(_config(tmp_path, "reference"))
    real_log = tasks.train.log_losses
    failed = []

    def fail_once_at_epoch_7(writer, epoch, *losses):
        if epoch == 7 and not failed:
            failed.append(epoch)
            raise RuntimeError("injected worker fault")
        real_log(writer, epoch, *losses)

    monkeypatch.setattr(tasks.train, "log_losses", fail_once_at_epoch_7)
    retried = train_flow(_config(tmp_path, "retried"))
    assert failed == [7]
    assert retried.resumed_from == {"epoch": 6, "batch": 0}
    assert Path(retried.run_dir, "model.safetensors").read_bytes() == (
        Path(reference.run_dir, "model.safetensors").read_bytes()
    )
    assert _steps(Path(retried.run_dir)) == list(range(12))


def test_extending_a_finished_run_continues_from_its_last_epoch(tmp_path):
    longer = _config(tmp_path, "shared", epochs=18)
    fresh = train_flow(longer.model_copy(update={"cache_dir": str(tmp_path / "fresh"),
                                                 "run_name": "fresh"}))  # fmt: skip
    train_flow(_config(tmp_path, "shared"))
    extended = train_flow(longer.model_copy(update={"run_name": "extended"}))
    assert extended.resumed_from == {"epoch": 12, "batch": 0}
    assert extended.epochs_trained == 6
    assert Path(extended.run_dir, "model.safetensors").read_bytes() == (
        Path(fresh.run_dir, "model.safetensors").read_bytes()
    )
    assert _steps(Path(extended.run_dir)) == list(range(18))
