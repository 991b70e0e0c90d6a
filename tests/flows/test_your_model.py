"""A user's own model from their own project, end to end, as `trainflow` command-line runs.

The project is examples/digits copied to a folder outside the repository (its model file and
its pyproject.toml, which registers `digits_cnn`), with the data its make_data.py writes; every
run is the `trainflow` command in a child process whose working folder is that project. The
promises: the digits trained from a .npz and from a folder of PNGs, and scored by predict and by
model.pt2 alike; bad input refused in one line; the cache across edits of the model's file; a
run SIGKILLed mid-epoch resumed into the uninterrupted run, bit for bit.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ..conftest import REPO

pytestmark = [pytest.mark.system, pytest.mark.usefixtures("prefect_api")]

EXAMPLE = REPO / "examples" / "digits"
FAULTS = REPO / "tests" / "faults"  # the harness that SIGKILLs a child at a training step
TRAINFLOW = str(Path(sys.executable).parent / "trainflow")  # the console script, as installed
DIGITS = [
    "--model",
    "digits_cnn",
    "--loss",
    "cross_entropy",
    "--optimizer",
    "adam",
    "--lr",
    "0.003",
    "--batch-size",
    "32",
]
EPOCHS = 25  # the example's command (README): every seed and split tried ends ≥ 0.98
# 1,797 digits, 1,437 of them for training (val fraction 0.2): 45 batches of 32 an epoch.
STEPS = math.ceil(int(1797 * 0.8) / 32)
STAGES = ["load-tensors", "split", "build-loaders", "build-model", "train-epochs", "export-graph"]
ALL_HIT = {**dict.fromkeys(STAGES, "Cached"), "build-loaders": "Completed"}  # never cached
MODEL_MISSES = {
    "load-tensors": "Cached",
    "split": "Cached",
    "build-loaders": "Completed",
    "build-model": "Completed",
    "train-epochs": "Completed",
    "export-graph": "Completed",
}
RUN_FILES = [
    "model.safetensors",
    "model.pt2",
    "spec.json",
    "columns.json",
    "metrics.json",
    "config.json",
    "stages.json",
    "source/digits_model.py",
]
TABLE_HEADER = re.compile(r"^stage\s+state\s+seconds\s+key$", re.MULTILINE)
# A record of Prefect's console log (stderr): `00:31:26.617 | INFO    | Flow run 'x' - …`.
PREFECT_LOG = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} \| [A-Z]+ *\| ")


# --- helpers ----------------------------------------------------------------------------------


def _trainflow(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [TRAINFLOW, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=400
    )


def _train(
    project: Path, env: dict[str, str], root: Path, name: str, *flags: str, epochs: int = EPOCHS
) -> subprocess.CompletedProcess:
    """`trainflow train` of the digits model, from the project, into root's runs and cache."""
    return _trainflow(
        [
            "train",
            *DIGITS,
            "--epochs",
            str(epochs),
            *flags,
            "--runs-dir",
            str(root / "runs"),
            "--cache-dir",
            str(root / "cache"),
            "--run-name",
            name,
        ],
        project,
        env,
    )


def _ok(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _states(done: subprocess.CompletedProcess, run_dir: Path) -> dict[str, str]:
    """Each stage's state as the terminal's table shows it (the same as stages.json says)."""
    header = TABLE_HEADER.search(done.stdout)
    assert header, done.stdout
    rows = done.stdout[header.end() :].strip("\n").split("\n\n")[0].splitlines()
    shown = {row.split()[0]: row.split()[1] for row in rows}
    recorded = json.loads((run_dir / "stages.json").read_text())
    assert shown == {stage["name"]: stage["state"] for stage in recorded}
    assert list(shown) == STAGES
    return shown


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def _own_lines(stderr: str) -> list[str]:
    """What stderr says besides Prefect's own log records."""
    return [line for line in stderr.splitlines() if line.strip() and not PREFECT_LOG.match(line)]


def _tree(*folders: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under `folders`."""
    return {
        str(path): path.read_bytes() if path.is_file() else None
        for folder in folders
        if folder.exists()
        for path in folder.rglob("*")
    }


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _digits(project: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(project / "data" / "digits.npz") as arrays:
        return arrays["x"], arrays["y"]


def _copy_project(to: Path) -> Path:
    to.mkdir()
    for name in ("digits_model.py", "pyproject.toml"):
        shutil.copy(EXAMPLE / name, to / name)
    return to


# --- the project and its first runs, once per module -----------------------------------------


@pytest.fixture(scope="module")
def env(prefect_api: str) -> dict[str, str]:
    """The children's environment: the session's Prefect server (no server start-up)."""
    return {**os.environ, "PREFECT_API_URL": prefect_api}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/digits as a user's project outside the repository, with its data made."""
    proj = _copy_project(tmp_path_factory.mktemp("user") / "proj")
    subprocess.run(
        [sys.executable, str(EXAMPLE / "make_data.py"), "--out", str(proj / "data")],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return proj


@pytest.fixture(scope="module")
def trained(project: Path, env: dict[str, str], tmp_path_factory: pytest.TempPathFactory):
    """The digits trained from the .npz, then from the PNG folder (the newest run), one cache."""
    root = tmp_path_factory.mktemp("trained")
    done = {
        name: _ok(_train(project, env, root, name, "--data", data))
        for name, data in (("npz", "data/digits.npz"), ("png", "data/digits"))
    }
    return root, done


# --- 1. the digits, from a .npz and from a folder of PNGs -------------------------------------


@pytest.mark.parametrize("name", ["npz", "png"])
def test_the_digits_reach_97_percent_and_the_run_keeps_the_models_source(project, trained, name):
    root, done = trained
    run = root / "runs" / name
    accuracy = _metrics(run)["val_accuracy"]
    assert len(accuracy) == EPOCHS
    assert accuracy[-1] >= 0.97, accuracy
    for file in RUN_FILES:
        assert (run / file).is_file(), file
    assert (run / "source" / "digits_model.py").read_bytes() == (
        project / "digits_model.py"
    ).read_bytes()
    spec = json.loads((run / "spec.json").read_text())
    assert (spec["name"], spec["input_shape"], spec["input_dtype"]) == (
        "digits_cnn",
        [1, 8, 8],
        "uint8",
    )
    states = _states(done[name], run)
    assert states["load-tensors"] == states["train-epochs"] == "Completed"


def test_predict_on_the_png_folder_the_npz_and_model_pt2_agree(project, env, trained, tmp_path):
    root, _ = trained
    newest = root / "runs" / "png"
    said, rows = {}, {}
    for name, data in (("png", "data/digits"), ("npz", "data/digits.npz")):
        out = tmp_path / f"{name}.csv"
        done = _ok(
            _trainflow(
                [
                    "predict",
                    *("--model", "latest", "--runs-dir", str(root / "runs")),
                    *("--data", data, "--out", str(out)),
                ],
                project,
                env,
            )
        )
        assert f" with {newest}\n" in done.stdout, done.stdout  # 'latest': the PNG run
        (said[name],) = [line for line in done.stdout.splitlines() if line.startswith("metrics:")]
        rows[name] = _rows(out)
    assert said["png"] == said["npz"], said
    loss, accuracy = re.fullmatch(r"metrics: loss (\S+), accuracy (\S+)", said["npz"]).groups()

    probs = [f"prob_{i}" for i in range(10)]
    for name, first in (("png", ["row", "file", "prediction"]), ("npz", ["row", "prediction"])):
        header = list(rows[name][0])
        assert header[: len(first)] == first and header[-10:] == probs, header
    # Each image is the .npz's row of its file's name (make_data.py): the same prediction.
    by_row = {int(r["row"]): r["prediction"] for r in rows["npz"]}
    assert len(rows["png"]) == len(by_row) == 1797
    for row in rows["png"]:
        assert row["prediction"] == by_row[int(Path(row["file"]).stem)], row["file"]

    # model.pt2 takes the stored uint8 batches, of any size (trusted: this test's own run).
    model = torch.export.load(newest / "model.pt2").module()
    x, y = (torch.from_numpy(a) for a in _digits(project))
    with torch.no_grad():
        logits = model(x)
        assert torch.equal(model(x[:7]).argmax(1), logits.argmax(1)[:7])
    predicted = logits.argmax(1)
    assert predicted.tolist() == [int(r["prediction"]) for r in rows["npz"]]
    assert accuracy == f"{(predicted == y).double().mean().item():.6g}"
    assert loss == f"{torch.nn.functional.cross_entropy(logits, y).item():.6g}"
    written = torch.tensor([[float(r[p]) for p in probs] for r in rows["npz"]], dtype=torch.float64)
    torch.testing.assert_close(written, logits.double().softmax(1), rtol=0, atol=1e-6)


# --- 2. bad input: one line naming it, exit 2, nothing written -------------------------------


def _npz(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    with path.open("wb") as f:  # a file object: np.savez would append .npz to a name
        np.savez(f, x=x, y=y)
    return path


def _images(project: Path, folder: Path) -> Path:
    return Path(shutil.copytree(project / "data" / "digits", folder / "images"))


def _y_3d(project: Path, folder: Path) -> tuple[Path, list[str]]:
    x, y = _digits(project)
    data = _npz(folder / "y3d.npz", x, y.reshape(-1, 1, 1))
    return data, [str(data)]


def _float_class_id(project: Path, folder: Path) -> tuple[Path, list[str]]:
    x, y = _digits(project)
    y = y.astype(np.float64)
    y[5] = 2.5
    data = _npz(folder / "float_ids.npz", x, y)
    return data, [str(data)]


def _unreadable_image(project: Path, folder: Path) -> tuple[Path, list[str]]:
    images = _images(project, folder)
    (images / "3" / "x.png").write_bytes(b"not an image")
    return images, [str(images / "3" / "x.png")]


def _empty_class(project: Path, folder: Path) -> tuple[Path, list[str]]:
    images = _images(project, folder)
    (images / "extra").mkdir()
    return images, [str(images / "extra")]


def _mixed_sizes(project: Path, folder: Path) -> tuple[Path, list[str]]:
    images = _images(project, folder)
    Image.fromarray(np.full((9, 8), 128, np.uint8), mode="L").save(images / "4" / "tall.png")
    return images, [str(images / "4" / "tall.png"), "--image-size"]


BAD: list[tuple[str, Callable[[Path, Path], tuple[Path, list[str]]]]] = [
    ("y-3d", _y_3d),
    ("float-class-id", _float_class_id),
    ("unreadable-image", _unreadable_image),
    ("empty-class-folder", _empty_class),
    ("mixed-sizes", _mixed_sizes),
]


@pytest.mark.parametrize("make", [make for _, make in BAD], ids=[case for case, _ in BAD])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(project, env, trained, tmp_path, make):
    root, _ = trained  # a runs folder and a cache with entries in them
    data, named = make(project, tmp_path)
    before = _tree(root / "runs", root / "cache")
    done = _train(project, env, root, "bad", "--data", str(data), epochs=1)
    lines = _own_lines(done.stderr)
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(lines) == 1, lines
    assert lines[0].startswith("trainflow train: error: "), lines
    for text in named:
        assert text in lines[0], (text, lines[0])
    assert "Traceback" not in done.stderr
    assert not (root / "runs" / "bad").exists()
    assert _tree(root / "runs", root / "cache") == before


def test_mixed_image_sizes_train_with_image_size(project, env, tmp_path):
    images, _ = _mixed_sizes(project, tmp_path)
    done = _ok(
        _train(
            project,
            env,
            tmp_path,
            "resized",
            "--data",
            str(images),
            "--image-size",
            "8,8",
            epochs=1,
        )
    )
    run = tmp_path / "runs" / "resized"
    assert json.loads((run / "spec.json").read_text())["input_shape"] == [1, 8, 8]
    assert _states(done, run)["train-epochs"] == "Completed"
    assert len(_metrics(run)["val_accuracy"]) == 1


# --- 3. the cache across edits of the project's model ----------------------------------------


def test_a_comment_keeps_the_cache_and_a_one_token_edit_retrains(project, env, tmp_path):
    mine = _copy_project(tmp_path / "proj")  # edited below: a project of the test's own
    model = mine / "digits_model.py"
    data = str(project / "data" / "digits.npz")

    def run(name: str) -> dict[str, str]:
        done = _ok(_train(mine, env, tmp_path, name, "--data", data, epochs=2))
        folder = tmp_path / "runs" / name
        assert (folder / "source" / "digits_model.py").read_bytes() == model.read_bytes()
        return _states(done, folder)

    def edit(old: str, new: str, text: str) -> str:
        assert old in text, old
        return text.replace(old, new, 1)

    def weights(name: str) -> bytes:
        return (tmp_path / "runs" / name / "model.safetensors").read_bytes()

    original = model.read_text()
    assert set(run("first").values()) == {"Completed"}
    assert run("again") == ALL_HIT

    commented = edit(
        "    return nn.Sequential(", "    # the layers\n    return nn.Sequential(", original
    )
    model.write_text(f"# the digits' model\n{commented}")
    assert run("commented") == ALL_HIT
    assert weights("commented") == weights("first")

    model.write_text(edit("nn.ReLU()", "nn.Tanh()", original))  # one token
    assert run("tanh") == MODEL_MISSES

    channels = edit("nn.Conv2d(channels, 16,", "nn.Conv2d(channels, 12,", original)
    model.write_text(edit("nn.Conv2d(16, 32,", "nn.Conv2d(12, 32,", channels))
    assert run("twelve") == MODEL_MISSES
    shapes = {
        tuple(t.shape)
        for t in load_file(tmp_path / "runs" / "twelve" / "model.safetensors").values()
    }
    assert (12, 1, 3, 3) in shapes and (16, 1, 3, 3) not in shapes, shapes


def test_the_same_run_by_the_script_hits_the_trainflow_commands_cache(project, env, tmp_path):
    """`trainflow train` is `python flows/train_flow.py`: one config, one key, whichever ran it
    (a key that counted the process's __main__ once told them apart)."""
    flags = ["--data", str(project / "data" / "digits.npz")]
    _ok(_train(project, env, tmp_path, "command", *flags, epochs=2))
    script = subprocess.run(
        [
            sys.executable,
            str(REPO / "flows" / "train_flow.py"),
            *DIGITS,
            *("--epochs", "2", *flags),
            *("--runs-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache")),
            *("--run-name", "script"),
        ],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert _states(_ok(script), tmp_path / "runs" / "script") == ALL_HIT


# --- 4. SIGKILLed mid-epoch, then the same command again --------------------------------------

# Killed after the backward pass of training step 3 epochs + 12 (of 5 epochs), before its
# optimizer step: with a checkpoint after every step, the newest holds 3 epochs and 11 batches.
RESUME_EPOCHS = 5
KILL_AT = 3 * STEPS + 12
RESUMED_FROM = {"epoch": 3, "batch": 11}


def test_a_run_sigkilled_mid_epoch_resumes_into_the_uninterrupted_run(project, env, tmp_path):
    flags = ["--data", "data/digits.npz", "--augment", "crop", "--crop-padding", "1"]
    flags += ["--checkpoint-every-seconds", "0.000001"]  # a checkpoint after every step
    log = tmp_path / "fault.jsonl"
    path = os.pathsep.join(p for p in (str(FAULTS), env.get("PYTHONPATH", "")) if p)
    # tests/faults/sitecustomize.py on the path: it logs its strike, then SIGKILLs the child.
    killed_env = {
        **env,
        "PYTHONPATH": path,
        "TRAINFLOW_FAULT": f"signal:KILL:step:{KILL_AT}",
        "TRAINFLOW_FAULT_LOG": str(log),
    }

    def train(root: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
        return _train(project, env, root, "digits", *flags, epochs=RESUME_EPOCHS)

    with ThreadPoolExecutor(max_workers=2) as pool:
        # The uninterrupted run, in runs and a cache of its own, beside the one killed.
        reference = pool.submit(train, tmp_path / "reference", env)
        killed = train(tmp_path / "killed", killed_env)
        uninterrupted = _ok(reference.result())

    strikes = [json.loads(line) for line in log.read_text().splitlines()]
    strikes = [event for event in strikes if event["event"] == "strike"]
    assert [event["step"] for event in strikes] == [KILL_AT], killed.stderr[-3000:]
    assert killed.returncode == -9, killed.stderr[-3000:]
    written = sorted(p.name for p in (tmp_path / "killed" / "cache").glob("checkpoints/*/ckpt-*"))
    assert written and written[-1].startswith("ckpt-000000003-000000011-"), written

    # The same command, without the harness: what a process imports besides trainflow and the
    # project (a sitecustomize here) is in no key.
    rerun = _ok(train(tmp_path / "killed", env))
    run = tmp_path / "killed" / "runs" / "digits"
    assert _metrics(run)["resumed_from"] == RESUMED_FROM
    assert "resumed from epoch 3, batch 11" in rerun.stderr
    assert _states(rerun, run)["train-epochs"] == "Completed"
    expected = tmp_path / "reference" / "runs" / "digits"
    assert _metrics(expected)["resumed_from"] is None, uninterrupted.stdout
    assert (run / "model.safetensors").read_bytes() == (expected / "model.safetensors").read_bytes()
    for curve in ("train_loss", "val_loss", "val_accuracy"):
        assert _metrics(run)[curve] == _metrics(expected)[curve], curve
