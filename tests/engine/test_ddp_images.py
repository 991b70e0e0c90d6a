"""DDP on a user's own model over uint8 images, with augmentation: `--nproc 2` ends
bit-identical to itself after a killed rank, as on the seed's tables (engine/test_ddp.py)."""

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ..conftest import REPO
from ..flows.test_resume_flow import SEED, Result
from .test_ddp import _env, _strikes

pytestmark = [pytest.mark.system, pytest.mark.usefixtures("prefect_api")]

# 96 images: 76 for training, 5 global batches of 16 an epoch (8 rows a rank); checkpoints after
# every epoch, so a rank killed after the first one restarts the job from a checkpoint.
STEPS, EPOCHS = 5, 4
MODEL = """
from torch import nn


def build(spec):
    channels, height, width = spec.input_shape
    return nn.Sequential(
        nn.Conv2d(channels, 4, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * height * width, spec.n_outputs),
    )
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("project")
    (root / "pyproject.toml").write_text('[tool.trainflow.models]\ntiny_cnn = "tiny_model:build"\n')
    (root / "tiny_model.py").write_text(MODEL)
    rng = np.random.default_rng(7)
    x = rng.integers(0, 256, size=(96, 1, 6, 6), dtype=np.uint8)
    y = (x[:, 0, :3].mean(axis=(1, 2)) > x[:, 0, 3:].mean(axis=(1, 2))).astype(np.int64)
    np.savez(root / "images.npz", x=x, y=y)
    return root


def _train(project: Path, run: str, env: dict[str, str], output: Path) -> tuple[int, str]:
    command = [
        sys.executable,
        str(REPO / "flows" / "train_flow.py"),
        *("--data", "images.npz", "--model", "tiny_cnn", "--loss", "cross_entropy"),
        *("--optimizer", "adam", "--lr", "0.01", "--epochs", str(EPOCHS)),
        *("--augment", "crop,flip", "--crop-padding", "1", "--device", "cpu"),
        *("--checkpoint-every-epochs", "1", "--checkpoint-every-seconds", "0"),
        *("--nproc", "2", "--hang-timeout", "8"),
        *("--runs-dir", str(output.parent / "runs"), "--run-name", run),
        *("--cache-dir", str(output.parent / "cache")),
    ]
    with output.open("w") as out:
        code = subprocess.run(
            command, cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=300
        ).returncode
    return code, output.read_text()


def test_a_killed_rank_of_an_image_model_with_augmentation_restarts_into_the_same_run(
    tmp_path_factory, project, subprocess_env
):
    reference_dir = tmp_path_factory.mktemp("reference")
    env = _env(subprocess_env, reference_dir / "faults.jsonl")
    code, output = _train(project, "two", env, reference_dir / "out.txt")
    assert code == 0, output[-4000:]
    reference = Result.of(reference_dir / "runs" / "two")
    assert len(reference.train_loss) == EPOCHS

    rng = random.Random(f"{SEED}-killed-image-rank")
    step = rng.randint(STEPS + 1, EPOCHS * STEPS - 1)  # after the first checkpoint
    struck = tmp_path_factory.mktemp("struck")
    log = struck / "faults.jsonl"
    env = _env(subprocess_env, log, f"signal:KILL:step:{step}", rank=1)
    code, output = _train(project, "run", env, struck / "out.txt")
    why = f"rank 1 killed at step {step} (TRAINFLOW_FAULT_SEED={SEED})\n{output[-4000:]}"
    assert code == 0, why
    assert [(s["step"], s["rank"]) for s in _strikes(log)] == [(step, "1")], why
    assert "1 restart(s) before this attempt" in output, why
    assert Result.of(struck / "runs" / "run").same_run_as(reference), why
    # The model's own source is kept beside its weights, as the project had it.
    kept = struck / "runs" / "run" / "source" / "tiny_model.py"
    assert kept.read_text() == (project / "tiny_model.py").read_text(), why
    assert os.path.getsize(struck / "runs" / "run" / "model.pt2") > 0, why
