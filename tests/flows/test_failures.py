"""What happens when …: every bad input and fault ends in one clear line and loses nothing."""

import errno
import json
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st
from prefect.client.orchestration import get_client
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import trainflow.tasks.data.tensors
import trainflow.tasks.runs.folder
from trainflow.flows.config import PredictConfig, TrainConfig
from trainflow.flows.predict_flow import predict_flow
from trainflow.flows.train_flow import main, train_flow
from trainflow.tasks.data.batches import make_loaders
from trainflow.tasks.data.splits import split_indices
from trainflow.tasks.data.tensors import Dataset
from trainflow.tasks.errors import InputError

from ..conftest import REPO
from ..disks import fill, tmpfs
from ..torch_faults import around_method

# Where a fault strikes: drawn afresh each session unless given (printed with a failure).
SEED = int(os.environ.get("TRAINFLOW_FAULT_SEED") or random.SystemRandom().randrange(2**32))

pytestmark = pytest.mark.usefixtures("prefect_api")


def _csv(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _npz(path: Path, **arrays) -> str:
    np.savez(path, **arrays)
    return str(path)


def _pt(path: Path, obj) -> str:
    torch.save(obj, path)
    return str(path)


class _Exploit:
    def __reduce__(self):
        return (Path.touch, (Path("pwned"),))


GOOD = "a,b,y\n" + "".join(f"{i / 10},{i % 3},{i / 5}\n" for i in range(20))

# (id, argv builder taking the scratch folder, exit code, what the one line must say)
CASES = [
    ("negative-lr", lambda d: ["--lr", "-1"], 2, "--lr: input should be greater than 0"),
    ("nan-lr", lambda d: ["--lr", "nan"], 2, "--lr: input should be a finite number"),
    ("inf-lr", lambda d: ["--lr", "inf"], 2, "--lr: input should be a finite number"),
    ("zero-epochs", lambda d: ["--epochs", "0"], 2, "--epochs: input should be greater"),
    ("text-batch", lambda d: ["--batch-size", "abc"], 2, "--batch-size: input should be a valid"),
    ("zero-batch", lambda d: ["--batch-size", "0"], 2, "--batch-size: input should be greater"),
    ("unknown-model", lambda d: ["--model", "nope"], 2, "--model: invalid choice"),
    ("val-above-1", lambda d: ["--val-fraction", "1.5"], 2, "--val-fraction: input should be less"),
    ("val-zero", lambda d: ["--val-fraction", "0"], 2, "--val-fraction: input should be greater"),
    (
        "zero-hidden",
        lambda d: ["--hidden", "0,3"],
        2,
        "--hidden: hidden sizes must be between 1 and 1048576 (got '0,3')",
    ),
    ("negative-hidden", lambda d: ["--hidden", "-4"], 2, "--hidden: hidden sizes must be between"),
    (
        "bad-device",
        lambda d: ["--device", "tpu"],
        2,
        "--device: must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps' (got 'tpu')",
    ),
    ("run-name-dotdot", lambda d: ["--run-name", "../evil"], 2, "--run-name: must be 1-128"),
    ("run-name-slash", lambda d: ["--run-name", "a/b"], 2, "--run-name: must be 1-128"),
    ("run-name-absolute", lambda d: ["--run-name", "/tmp/x"], 2, "--run-name: must be 1-128"),
    ("unknown-flag", lambda d: ["--nope", "1"], 2, "unrecognized arguments: --nope"),
    ("abbreviated-flag", lambda d: ["--ep", "3"], 2, "unrecognized arguments: --ep 3"),
    ("ce-on-synthetic", lambda d: ["--loss", "cross_entropy"], 2, "synthetic data's target is"),
    ("one-synthetic-row", lambda d: ["--n-samples", "1"], 2, "leaves the training split empty"),
    ("momentum-1", lambda d: ["--momentum", "1.5"], 2, "--momentum: input should be less"),
    (
        "negative-cadence",
        lambda d: ["--checkpoint-every-seconds", "-1"],
        2,
        "--checkpoint-every-seconds: input should be greater",
    ),
    ("missing-file", lambda d: ["--data", str(d / "missing.csv")], 2, "missing.csv': not found"),
    ("directory", lambda d: ["--data", str(d)], 2, "no class folders"),
    ("directory-csv", lambda d: ["--data", str(_mkdir(d / "dir.csv"))], 2, "is a directory"),
    (
        "unknown-extension",
        lambda d: ["--data", _csv(d / "data.txt", GOOD)],
        2,
        "unknown extension '.txt'",
    ),
    ("empty-file", lambda d: ["--data", _csv(d / "empty.csv", "")], 2, "file is empty"),
    (
        "header-only",
        lambda d: ["--data", _csv(d / "h.csv", "a,b,y\n")],
        2,
        "has a header but no data rows",
    ),
    (
        "non-numeric",
        lambda d: ["--data", _csv(d / "n.csv", "a,b,y\n1,2,3\n1,x,3\n")],
        2,
        "line 3, column 'b': 'x' is not a number",
    ),
    (
        "ragged",
        lambda d: ["--data", _csv(d / "r.csv", "a,b,y\n1,2,3\n1,2\n")],
        2,
        "line 3 has 2 fields, the header has 3",
    ),
    (
        "missing-target",
        lambda d: ["--data", _csv(d / "t.csv", GOOD), "--target", "zz"],
        2,
        "target column 'zz' not found",
    ),
    (
        "duplicate-target",
        lambda d: ["--data", _csv(d / "u.csv", "a,y,y\n1,2,3\n4,5,6\n")],
        2,
        "target column 'y' appears twice",
    ),
    (
        "nan-values",
        lambda d: ["--data", _csv(d / "v.csv", GOOD + "nan,1,nan\n")],
        2,
        "1 NaN/Inf value(s) in x, first at row 20, column 'a'",
    ),
    (
        "inf-in-npz",
        lambda d: ["--data", _npz(d / "i.npz", x=np.array([[1.0], [np.inf]]), y=np.ones(2))],
        2,
        "1 NaN/Inf value(s)",
    ),
    (
        "row-mismatch",
        lambda d: ["--data", _npz(d / "m.npz", x=np.ones((5, 2)), y=np.ones(4))],
        2,
        "x has 5 rows but y has 4",
    ),
    (
        "npz-without-y",
        lambda d: ["--data", _npz(d / "w.npz", x=np.ones((5, 2)))],
        2,
        "missing array(s) y",
    ),
    (
        "pt-bare-tensor",
        lambda d: ["--data", _pt(d / "b.pt", torch.ones(3))],
        2,
        "expected a dict with tensors 'x' and 'y'",
    ),
    (
        "pt-needs-unpickling",
        lambda d: ["--data", _pt(d / "e.pt", {"x": _Exploit()})],
        2,
        "holds objects that need unpickling code",
    ),
    (
        "target-for-npz",
        lambda d: ["--data", _npz(d / "k.npz", x=np.ones(4), y=np.ones(4)), "--target", "y"],
        2,
        "--target applies to tables (CSV, Parquet, Feather) only, not .npz",
    ),
    (
        "loss-vs-targets",
        lambda d: ["--data", _csv(d / "c.csv", GOOD), "--loss", "cross_entropy"],
        2,
        "--loss cross_entropy needs class ids 0, 1, 2",
    ),
    (
        "split-leaves-val-empty",
        lambda d: ["--data", _csv(d / "s.csv", "a,y\n1,2\n")],
        2,
        "s.csv' has 1 row: --val-fraction 0.2 leaves the training split empty",
    ),
    ("no-cuda", lambda d: ["--device", "cuda"], 2, "CUDA is not available"),
]


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _snapshot(*folders: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p): (p.stat().st_size, p.stat().st_mtime_ns)
        for folder in folders
        for p in folder.rglob("*")
        if p.is_file()
    }


@pytest.fixture(scope="module")
def warm(tmp_path_factory, prefect_api):
    """A runs folder and a cache with real entries, which no failure may touch."""
    root = tmp_path_factory.mktemp("warm")
    args = ["--runs-dir", str(root / "runs"), "--cache-dir", str(root / "cache"), "--epochs", "3"]
    assert main([*args, "--run-name", "good"]) == 0
    return root, args


@pytest.mark.parametrize(("case", "argv", "code", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_touches_nothing(
    tmp_path, warm, capsys, case, argv, code, message
):
    if message == "CUDA is not available" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    root, common = warm
    before = _snapshot(root)
    capsys.readouterr()
    try:
        result = main([*common, *argv(tmp_path)])
    except SystemExit as exit_:  # argparse and pydantic errors exit before any flow starts
        result = exit_.code
    err = capsys.readouterr().err.strip().splitlines()
    assert result == code
    assert err[-1].startswith("train_flow.py: error: "), err
    assert message in err[-1], err[-1]
    assert "Traceback" not in "\n".join(err)
    # Even where the data itself is fine and a rule about using it is not (the loss against
    # the targets, the split against the row count), no stage's entry is kept.
    assert _snapshot(root) == before
    assert not Path("pwned").exists()


def _run_count(state) -> int:
    with get_client(sync_client=True) as client:
        return client.read_flow_run(state.state_details.flow_run_id).run_count


def test_a_user_error_ends_a_flow_run_with_retries_at_its_first_attempt(tmp_path, warm):
    """A scheduled or UI run retries a failed flow (train: twice, 30 s apart; predict: once):
    bad input would only fail again, so the run ends Failed at its first attempt."""
    root, _ = warm
    data = _csv(tmp_path / "bad.csv", "x,y\n1,2\n2,oops\n" + "3,4\n" * 20)
    config = TrainConfig(data=data, runs_dir=str(root / "runs"), cache_dir=str(root / "cache"))
    trained = train_flow(config, return_state=True)
    assert trained.is_failed() and isinstance(trained.result(raise_on_failure=False), InputError)
    assert _run_count(trained) == 1
    missing = PredictConfig(model="no-such-run", runs_dir=str(root / "runs"))
    scored = predict_flow(missing, return_state=True)
    assert scored.is_failed() and isinstance(scored.result(raise_on_failure=False), InputError)
    assert _run_count(scored) == 1


@pytest.mark.parametrize(("code", "attempts"), [(errno.EIO, 2), (errno.ENOSPC, 1)])
def test_a_passing_write_error_is_retried_and_a_lasting_one_is_not(
    tmp_path, warm, monkeypatch, code, attempts
):
    """An I/O error on network storage may pass: a deployment run retries it, and a full disk
    would only fail again, so it ends the run at its first attempt."""
    root, _ = warm
    real, failed = trainflow.tasks.runs.folder.write_json, []

    def write_json(path, value):
        if not failed:
            failed.append(path)
            raise OSError(code, os.strerror(code))
        return real(path, value)

    monkeypatch.setattr(trainflow.tasks.runs.folder, "write_json", write_json)
    config = TrainConfig(epochs=3, runs_dir=str(tmp_path / "runs"), cache_dir=str(root / "cache"))
    state = train_flow.with_options(retry_delay_seconds=0)(config, return_state=True)
    assert _run_count(state) == attempts
    assert state.is_completed() == (attempts == 2), state.message


def test_a_file_too_large_for_memory_is_refused_up_front(tmp_path, warm, capsys, monkeypatch):
    _, common = warm
    monkeypatch.setattr(trainflow.tasks.data.tensors, "available_memory", lambda: 10)
    # Kept off the memory-mapped path (which would train on it): the whole-file read refuses.
    monkeypatch.setenv("TRAINFLOW_IN_MEMORY_BYTES", str(10**15))
    data = _npz(tmp_path / "big.npz", x=np.ones((100, 3)), y=np.ones(100))
    assert main([*common, "--data", data]) == 2
    assert "needs about 0.0 GB of memory to load, but only 0.0 GB" in capsys.readouterr().err


def test_an_unwritable_runs_folder_is_a_clear_error(tmp_path, warm, capsys):
    root, common = warm
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    before = _snapshot(root)
    assert main([*common, "--runs-dir", str(blocker / "runs")]) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("train_flow.py: error: cannot write the run folder")
    assert _snapshot(root) == before


@pytest.fixture
def tiny_disk(tmp_path, request):
    with tmpfs(tmp_path / "disk", getattr(request, "param", "48k")) as disk:  # indirect: size
        yield disk


def test_a_full_disk_for_the_run_folder_fails_clearly_and_keeps_the_cache(warm, tiny_disk, capsys):
    root, common = warm
    before = _snapshot(root / "cache")
    fill(tiny_disk, leave=8192)
    assert main([*common, "--runs-dir", str(tiny_disk), "--epochs", "4"]) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "no space left on the device" in line and "run folder" in line, line
    assert _snapshot(root / "cache") == before
    assert not list(tiny_disk.rglob(".*.tmp"))  # no half-written file under any name


@pytest.mark.parametrize("tiny_disk", ["2m"], indirect=True)  # a whole run fits, with room
def test_a_run_folder_disk_that_fills_mid_training_fails_clearly_and_the_rerun_resumes(
    tmp_path, warm, tiny_disk, monkeypatch, capsys
):
    """The disk fills at a seeded backward pass, from outside trainflow: the curves' next
    write meets it inside the epoch loop. One line names the run folder; nothing is left
    half-written; with room again, the same command resumes from its last checkpoint and
    ends as an uninterrupted run, each epoch's point once in TensorBoard."""
    _, common = warm
    epochs, strike = 1500, random.Random(SEED).randint(50, 250)  # the backward pass, seeded
    flags = ["--epochs", str(epochs), "--checkpoint-every-seconds", "0.5"]
    flags += ["--cache-dir", str(tmp_path / "cache"), "--run-name", "filled"]
    calls = [0]

    def fill_the_disk_at_the_strike(backward, *args, **kwargs):
        calls[0] += 1
        if calls[0] == strike:
            fill(tiny_disk)
        return backward(*args, **kwargs)

    around_method(monkeypatch, torch.Tensor, "backward", fill_the_disk_at_the_strike)
    capsys.readouterr()
    assert main([*common, *flags, "--runs-dir", str(tiny_disk)]) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    why = f"disk filled at backward pass {strike} (TRAINFLOW_FAULT_SEED={SEED})"
    assert line == (
        f"train_flow.py: error: cannot write the run folder '{tiny_disk / 'filled'}': "
        "no space left on the device"
    ), why
    assert not [p for p in tiny_disk.rglob("*") if ".tmp" in p.name], why
    monkeypatch.undo()
    (tiny_disk / "filler").unlink()
    assert main([*common, *flags, "--runs-dir", str(tiny_disk)]) == 0, why
    whole_flags = ["--run-name", "whole", "--cache-dir", str(tmp_path / "other-cache")]
    assert main([*common, *flags, "--runs-dir", str(tmp_path), *whole_flags]) == 0
    filled, whole = tiny_disk / "filled", tmp_path / "whole"
    resumed = json.loads((filled / "metrics.json").read_text())
    assert resumed["resumed_from"] is not None, why  # it did resume, mid-run
    assert (filled / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()
    expected = json.loads((whole / "metrics.json").read_text())
    assert (resumed["train_loss"], resumed["val_loss"]) == (
        expected["train_loss"],
        expected["val_loss"],
    ), why
    events = EventAccumulator(str(filled / "loss_training")).Reload()
    assert [e.step for e in events.Scalars("loss")] == list(range(epochs)), why


def test_a_full_cache_disk_is_a_warning_and_the_run_ends_as_it_would_have(
    tmp_path, warm, tiny_disk, caplog
):
    """Checkpoints are a safety net: one that can't be written is a warning, training goes
    on, and the result is the one a run with room to spare gets."""
    _, common = warm
    cache, args = tiny_disk / "cache", [*common, "--epochs", "3", "--n-samples", "30"]
    assert main([*common, "--cache-dir", str(cache), "--epochs", "2", "--n-samples", "30"]) == 0
    fill(tiny_disk, leave=2048)  # less than a checkpoint needs
    before = _snapshot(cache)
    caplog.clear()
    code = main(
        [*args, "--cache-dir", str(cache), "--run-name", "full", "--checkpoint-every-epochs", "1"]
    )
    assert code == 0
    assert f"cannot write a checkpoint to '{cache}/checkpoints/" in caplog.text
    assert "no space left on the device; training goes on" in caplog.text
    after = _snapshot(cache)
    assert {k: after[k] for k in before} == before  # every existing entry as it was
    assert not [p for p in tiny_disk.rglob("*") if p.name.endswith(".tmp")]  # nothing half-written
    assert main([*args, "--cache-dir", str(tmp_path / "roomy"), "--run-name", "roomy"]) == 0
    full, roomy = Path(common[1]) / "full", Path(common[1]) / "roomy"
    assert (full / "model.safetensors").read_bytes() == (roomy / "model.safetensors").read_bytes()
    losses = [json.loads((run / "metrics.json").read_text()) for run in (full, roomy)]
    assert [m["train_loss"] for m in losses] == [losses[1]["train_loss"]] * 2
    assert [m["val_loss"] for m in losses] == [losses[1]["val_loss"]] * 2


def test_a_planted_pickle_in_the_checkpoint_folder_is_never_loaded(tmp_path, warm, caplog):
    _, common = warm
    cache = tmp_path / "cache"
    args = [*common, "--cache-dir", str(cache), "--checkpoint-every-epochs", "1"]
    assert main([*args, "--epochs", "2"]) == 0
    (folder,) = (cache / "checkpoints").iterdir()
    payload = pickle.dumps(_Exploit())
    name = f"ckpt-000000003-000000000-{xxhash.xxh3_128_hexdigest(payload)}.safetensors"
    (folder / name).write_bytes(payload)  # its name even carries the right checksum
    assert main([*args, "--epochs", "4", "--run-name", "after-plant"]) == 0
    assert not Path("pwned").exists()
    assert f"skipping checkpoint {name}" in caplog.text
    metrics = json.loads((Path(common[1]) / "after-plant" / "metrics.json").read_text())
    assert metrics["resumed_from"] == {"epoch": 2, "batch": 0}  # the last good one


def test_a_model_from_an_entry_point_trains(tmp_path, subprocess_env):
    plugin = tmp_path / "plugin"
    (plugin / "tinymodels").mkdir(parents=True)
    (plugin / "tinymodels" / "__init__.py").write_text(
        "import torch.nn as nn\n"
        "def build(spec):\n"
        "    return nn.Sequential(nn.Linear(spec.n_inputs, 3), nn.Tanh(),\n"
        "                         nn.Linear(3, spec.n_outputs))\n"
    )
    dist = plugin / "tinymodels-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tinymodels\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[trainflow.models]\ntiny = tinymodels:build\n")
    # The shared server: this test is about the plugin, not about starting a server.
    path = f"{plugin}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    env = {**subprocess_env, "PYTHONPATH": path}
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "flows" / "train_flow.py"),
            "--model",
            "tiny",
            "--epochs",
            "3",
            "--runs-dir",
            str(tmp_path / "runs"),
            "--run-name",
            "tiny",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "runs" / "tiny" / "model.safetensors")
    assert weights["0.weight"].shape == (3, 1)


# --- properties of the split and the batches -----------------------------------------------


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 500), val=st.floats(0.01, 0.99), seed=st.integers(0, 2**31))
def test_split_covers_every_row_once_and_is_seeded(n, val, seed):
    try:
        parts = split_indices(n, val, seed)
    except InputError as refused:
        # Refused only when plain arithmetic leaves a side with less than one row.
        assert min(n * (1 - val), n * val) < 1 + 1e-6, (n, val)
        assert str(refused).startswith(f"--val-fraction {val} leaves the ")
        return
    rows = parts.train.tolist() + parts.val.tolist()
    assert sorted(rows) == list(range(n))
    assert parts.train.numel() > 0 and parts.val.numel() > 0
    assert abs(parts.train.numel() - n * (1 - val)) < 1  # the seed's int(n * ratio), give or take
    again = split_indices(n, val, seed)
    assert torch.equal(parts.train, again.train) and torch.equal(parts.val, again.val)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(5, 300),
    batch=st.integers(1, 64),
    seed=st.integers(0, 2**31),
    kind=st.sampled_from(["tensor", "dataloader"]),
)
def test_batches_cover_the_training_rows_once_per_epoch_in_a_seeded_order(n, batch, seed, kind):
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1)
    data = Dataset(x, x, ("x",), ("y",))
    parts = split_indices(n, 0.2, 13)

    def epochs(count):
        loaders = make_loaders(data, parts, batch, seed, kind, 0, torch.device("cpu"))
        shuffle = loaders.train.shuffle()
        return [
            [int(v) for xb, _ in loaders.train.epoch(shuffle) for v in xb[:, 0]]
            for _ in range(count)
        ]

    first = epochs(2)
    for order in first:
        assert sorted(order) == sorted(parts.train.tolist())
    assert first == epochs(2)
