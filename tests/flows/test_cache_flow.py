"""The stage cache end to end, attacked: moved folders, device spellings, plugin upgrades,
bad input, reused run names, remote data, corruption, planted pickles, two processes."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import trainflow.tasks.cache.stage
import trainflow.tasks.data.sources
from trainflow.flows.config import TrainConfig
from trainflow.flows.train_flow import train_flow
from trainflow.tasks.errors import InputError

from ..conftest import REPO

pytestmark = pytest.mark.usefixtures("prefect_api")
CACHED = ["load-tensors", "split", "build-model", "train-epochs", "export-graph"]
ALL_HIT = {**dict.fromkeys(CACHED, "Cached"), "build-loaders": "Completed"}


def _train(tmp_path: Path, name: str, **overrides):
    config = {
        "epochs": 5,
        "runs_dir": str(tmp_path / "runs"),
        "run_name": name,
        "cache_dir": str(tmp_path / "cache"),
        **overrides,
    }
    return train_flow(TrainConfig(**config))


def _states(summary) -> dict[str, str]:
    return {stage["name"]: stage["state"] for stage in summary.stages}


def _weights(summary) -> bytes:
    return (Path(summary.run_dir) / "model.safetensors").read_bytes()


def _csv(path: Path, rows: int = 40, seed: int = 0) -> Path:
    table = np.random.RandomState(seed).rand(rows, 3).round(4)
    np.savetxt(path, table, delimiter=",", header="a,b,y", comments="", fmt="%.4f")
    return path


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_rerun_serves_every_stage_from_the_cache_and_trains_nothing(tmp_path):
    first = _train(tmp_path, "first")
    second = _train(tmp_path, "second")
    assert set(_states(first).values()) == {"Completed"}
    assert _states(second) == ALL_HIT
    assert [s["key"] for s in first.stages] == [s["key"] for s in second.stages]
    assert (first.epochs_trained, second.epochs_trained) == (5, 0)
    assert _weights(first) == _weights(second)

    run = Path(second.run_dir)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs_trained"] == 0 and len(metrics["train_loss"]) == 5
    recorded = json.loads((run / "stages.json").read_text())
    assert [s["name"] for s in recorded] == [s["name"] for s in second.stages]
    assert all({"name", "state", "seconds", "key"} <= set(s) for s in recorded)
    for file in ("model.pt2", "split.safetensors", "config.json"):
        assert (run / file).is_file()
    # The cached run's TensorBoard still shows every epoch once, and the graph.
    steps = [e.step for e in EventAccumulator(str(run / "loss_training")).Reload().Scalars("loss")]
    assert steps == list(range(5))
    assert EventAccumulator(str(run)).Reload().Graph() is not None


def test_changing_epochs_retrains_but_reuses_data_split_and_initial_weights(tmp_path):
    _train(tmp_path, "short")
    longer = _train(tmp_path, "long", epochs=6)
    assert _states(longer) == {
        "load-tensors": "Cached",
        "split": "Cached",
        "build-loaders": "Completed",
        "build-model": "Cached",
        "train-epochs": "Completed",
        "export-graph": "Completed",
    }


def test_turning_the_metrics_off_retrains_and_records_the_losses_and_lr_only(tmp_path):
    measured = _train(tmp_path, "measured")
    plain = _train(tmp_path, "plain", metrics=False)
    assert _states(plain)["train-epochs"] == "Completed"  # a run with metrics is not its result
    written, full = (
        json.loads((Path(s.run_dir) / "metrics.json").read_text()) for s in (plain, measured)
    )
    assert {"val_mae", "val_r2"} <= set(full)
    assert not any(name.startswith("val_") and name != "val_loss" for name in written)
    assert written["lr"] == full["lr"] and written["val_loss"] == full["val_loss"]
    assert _weights(plain) == _weights(measured)


# --- where the cache is: moved, copied, mounted elsewhere ------------------------------------


def test_a_moved_cache_still_hits(tmp_path):
    first = _train(tmp_path, "first")
    os.rename(tmp_path / "cache", tmp_path / "moved")
    moved = _train(tmp_path, "moved", cache_dir=str(tmp_path / "moved"))
    assert _states(moved) == ALL_HIT
    assert _weights(moved) == _weights(first)


def test_a_copied_cache_hits_and_reads_only_the_copy(tmp_path):
    first = _train(tmp_path, "first")
    shutil.copytree(tmp_path / "cache", tmp_path / "copy")
    shutil.rmtree(tmp_path / "cache")  # nothing left to read where the entries were written
    copied = _train(tmp_path, "copied", cache_dir=str(tmp_path / "copy"))
    assert _states(copied) == ALL_HIT
    assert _weights(copied) == _weights(first)


def test_one_cache_under_two_mount_paths_hits_from_both(tmp_path):
    (tmp_path / "mnt").mkdir()
    os.symlink(tmp_path / "cache", tmp_path / "mnt" / "worker-b", target_is_directory=True)
    (tmp_path / "cache").mkdir()
    _train(tmp_path, "worker-a")
    from_b = _train(tmp_path, "worker-b", cache_dir=str(tmp_path / "mnt" / "worker-b"))
    as_url = _train(tmp_path, "as-url", cache_dir=f"file://{tmp_path / 'mnt' / 'worker-b'}")
    assert _states(from_b) == _states(as_url) == ALL_HIT


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_an_fsspec_url_cache_hits(tmp_path, scheme):
    url = (
        f"memory://trainflow-{uuid.uuid4().hex}"
        if scheme == "memory"
        else (f"file://{tmp_path / 'url-cache'}")
    )
    _train(tmp_path, "first", cache_dir=url)
    assert _states(_train(tmp_path, "again", cache_dir=url)) == ALL_HIT


# --- what a key covers -----------------------------------------------------------------------


def test_the_device_spelling_and_how_batches_arrive_do_not_split_the_cache(tmp_path):
    first = _train(tmp_path, "auto", device="auto")
    for name, change in (("cpu", {"device": "cpu"}), ("workers", {"num_workers": 2})):
        assert _states(_train(tmp_path, name, **change)) == ALL_HIT, name
    # One lineage, so one checkpoint folder, whatever the spelling.
    assert len(list((tmp_path / "cache" / "checkpoints").iterdir())) == 1
    # The DataLoader path draws the same batches: equal weights, so one key is right.
    dataloader = _train(tmp_path, "dataloader", loader="dataloader", num_workers=0, no_cache=True)
    assert _weights(dataloader) == _weights(first)


def test_data_is_keyed_by_content_not_name(tmp_path):
    data = _csv(tmp_path / "data.csv")
    _train(tmp_path, "original", data=str(data))
    copy = tmp_path / "renamed.csv"
    copy.write_bytes(data.read_bytes())
    assert _states(_train(tmp_path, "copy", data=str(copy)))["load-tensors"] == "Cached"

    lines = data.read_text().splitlines()
    lines[5] = "0.1234,0.5678,0.9999"
    data.write_text("\n".join(lines) + "\n")
    edited = _states(_train(tmp_path, "edited", data=str(data)))
    assert edited["load-tensors"] == "Completed" and edited["train-epochs"] == "Completed"


def test_parameters_a_stage_does_not_use_leave_its_key_alone(tmp_path):
    data = _csv(tmp_path / "data.csv")
    _train(tmp_path, "base", data=str(data))
    # n_samples only shapes synthetic data; hidden only shapes an mlp.
    assert _states(_train(tmp_path, "other", data=str(data), n_samples=7, hidden=(3,))) == ALL_HIT


def _plugin(root: Path, version: str, hidden: int = 3) -> Path:
    """A distribution 'tinymodels' registering the model 'tiny', installed under `root`."""
    (root / "tinymodels").mkdir(parents=True, exist_ok=True)
    (root / "tinymodels" / "__init__.py").write_text(
        "import torch.nn as nn\n"
        "def build(spec):\n"
        f"    return nn.Sequential(nn.Linear(spec.n_inputs, {hidden}), nn.Tanh(),\n"
        f"                         nn.Linear({hidden}, spec.n_outputs))\n"
    )
    dist = root / f"tinymodels-{version}.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: tinymodels\nVersion: {version}\n")
    (dist / "entry_points.txt").write_text("[trainflow.models]\ntiny = tinymodels:build\n")
    return root


def _command_states(
    tmp_path: Path, env: dict[str, str], name: str, *flags: str, project: Path = REPO
) -> dict[str, str]:
    """`python <project>/flows/train_flow.py` into tmp_path's runs and cache: its stages' states."""
    done = subprocess.run(
        [
            sys.executable,
            str(project / "flows" / "train_flow.py"),
            *flags,
            "--runs-dir",
            str(tmp_path / "runs"),
            "--run-name",
            name,
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    stages = json.loads((tmp_path / "runs" / name / "stages.json").read_text())
    return {s["name"]: s["state"] for s in stages}


def _plugin_run(tmp_path: Path, env: dict[str, str], plugin: Path, name: str) -> dict[str, str]:
    env = {**env, "PYTHONPATH": str(plugin)}
    return _command_states(tmp_path, env, name, "--model", "tiny", "--epochs", "3")


def test_upgrading_or_editing_a_plugin_model_misses(tmp_path, subprocess_env):
    env = subprocess_env
    v1 = _plugin(tmp_path / "v1", "1.0")
    assert _plugin_run(tmp_path, env, v1, "v1")["build-model"] == "Completed"
    assert _plugin_run(tmp_path, env, v1, "v1-again") == ALL_HIT
    v2 = _plugin(tmp_path / "v2", "1.1")  # same code, new version: another build
    assert _plugin_run(tmp_path, env, v2, "v2")["build-model"] == "Completed"
    edited = _plugin(tmp_path / "edited", "1.0", hidden=4)  # an editable install, changed
    states = _plugin_run(tmp_path, env, edited, "edited")
    assert states["build-model"] == states["train-epochs"] == "Completed"


def _plugin_with_helper(root: Path, hidden: int) -> Path:
    """'tinymodels' whose builder reads its width from another package of the user's."""
    _plugin(root, "1.0")
    (root / "tinymodels" / "__init__.py").write_text(
        "import torch.nn as nn\n"
        "import widths\n"
        "def build(spec):\n"
        "    return nn.Sequential(nn.Linear(spec.n_inputs, widths.HIDDEN), nn.Tanh(),\n"
        "                         nn.Linear(widths.HIDDEN, spec.n_outputs))\n"
    )
    (root / "widths").mkdir(exist_ok=True)
    (root / "widths" / "__init__.py").write_text(f"HIDDEN = {hidden}\n")
    return root


def test_editing_a_plugin_models_helper_package_misses(tmp_path, subprocess_env):
    plugin = _plugin_with_helper(tmp_path / "plugin", hidden=3)
    assert _plugin_run(tmp_path, subprocess_env, plugin, "three")["build-model"] == "Completed"
    _plugin_with_helper(plugin, hidden=4)  # the helper's constant, edited in place
    states = _plugin_run(tmp_path, subprocess_env, plugin, "four")
    assert states["build-model"] == states["train-epochs"] == "Completed"
    shapes = {
        name: load_file(tmp_path / "runs" / name / "model.safetensors")["0.weight"].shape
        for name in ("three", "four")
    }
    assert shapes == {"three": (3, 1), "four": (4, 1)}


def test_an_edit_of_code_the_train_stage_reaches_only_at_run_time_misses(tmp_path, subprocess_env):
    """The DDP launcher (tasks/engine/launch.py) runs in train-epochs' body, never in the
    function whose key it is: editing it must re-train, in a copy of the project (laid out as
    installed, `trainflow/tasks` and `trainflow/flows`, and first on the path)."""
    project = tmp_path / "project"
    for package in ("tasks", "flows"):
        shutil.copytree(REPO / package, project / "trainflow" / package)
    env = {**subprocess_env, "PYTHONPATH": str(project)}

    def run(name: str) -> dict[str, str]:
        return _command_states(tmp_path, env, name, "--epochs", "2", project=project / "trainflow")

    assert set(run("before").values()) == {"Completed"}
    # A fresh copy's first run stores its stages like any other: the next run hits.
    assert run("again")["train-epochs"] == "Cached"
    launch = project / "trainflow" / "tasks" / "engine" / "launch.py"
    launch.write_text(launch.read_text() + "\n\nSHARD_SCALE = 2.0\n")
    states = run("after")
    assert states["train-epochs"] == states["export-graph"] == "Completed"
    assert states["load-tensors"] == states["split"] == "Cached"  # they never reach it


# --- bad input and run folders ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("csv", "options"),
    [
        ("a,y\n1,2\n", {}),  # one row: the split leaves training empty
        ("a,y\n1,0.5\n2,1.5\n3,2\n4,1\n5,0\n", {"loss": "cross_entropy"}),  # not class ids
        ("a,y\n1,0.5\n2,1.5\n3,2\n4,1\n5,0\n", {"loss": "bce_with_logits"}),  # outside [0, 1]
        ("a,y\n1,1\n2,0\n3,1\n", {"val_fraction": 0.9}),  # training empty: int(3 * 0.1) = 0
    ],
    ids=["one-row", "ce-float-targets", "bce-out-of-range", "empty-training"],
)
def test_bad_input_leaves_the_cache_and_the_runs_folder_as_they_were(tmp_path, csv, options):
    _train(tmp_path, "earlier")  # a cache and a runs folder with something in them
    bad = tmp_path / "bad.csv"
    bad.write_text(csv)
    before = _files(tmp_path)
    with pytest.raises(InputError):
        _train(tmp_path, "bad", data=str(bad), **options)
    assert _files(tmp_path) == before


def test_naming_the_default_target_and_features_keys_as_leaving_them_out(tmp_path):
    data = str(_csv(tmp_path / "table.csv"))  # columns a, b, y
    _train(tmp_path, "defaults", data=data)
    named = _train(tmp_path, "named", data=data, target=("y",), features=("a", "b"))
    assert _states(named) == ALL_HIT
    reordered = _train(tmp_path, "reordered", data=data, features=("b", "a"))
    assert _states(reordered)["load-tensors"] == "Completed"  # other tensors: another key


def test_two_spellings_of_one_data_file_are_one_config_for_a_run_name(tmp_path):
    _csv(tmp_path / "d.csv")  # the tests run in tmp_path
    _train(tmp_path, "mine", data="d.csv")
    again = _train(tmp_path, "mine", data="./d.csv")
    assert _states(again) == ALL_HIT
    assert _states(_train(tmp_path, "mine", data=str(tmp_path / "d.csv"))) == ALL_HIT
    _csv(tmp_path / "other.csv", seed=1)
    with pytest.raises(InputError, match=r"another config \(data: '\S*d\.csv' → 'other\.csv'\)"):
        _train(tmp_path, "mine", data="other.csv")


def test_a_run_name_reused_with_another_config_is_refused(tmp_path):
    _train(tmp_path, "mine")
    folder = tmp_path / "runs" / "mine"
    before = _files(folder)
    with pytest.raises(InputError, match=r"--run-name mine: .* another config \(epochs: 5 → 6\)"):
        _train(tmp_path, "mine", epochs=6)
    assert _files(folder) == before
    # The same config again (a retry, a re-run) is the same run: allowed, and not duplicated.
    _train(tmp_path, "mine", refresh_cache=True)
    events = sorted(p.name for p in folder.glob("events.out.tfevents.*"))
    assert sum(".graph" in n for n in events) == 1 and sum(".hparams" in n for n in events) == 1
    accumulator = EventAccumulator(str(folder)).Reload()
    assert accumulator.Graph() is not None


def test_a_run_folder_from_before_a_setting_existed_is_the_same_run_at_its_default(tmp_path):
    """A config.json written before a field was added reads as that field's default (what the
    older version computed): the same config continues there, another value is refused."""
    _train(tmp_path, "older")
    config = tmp_path / "runs" / "older" / "config.json"
    written = json.loads(config.read_text())
    del written["metrics"]
    config.write_text(json.dumps(written))
    _train(tmp_path, "older", refresh_cache=True)
    with pytest.raises(InputError, match=r"another config \(metrics: True → False\)"):
        _train(tmp_path, "older", metrics=False)


# --- remote data: one download, or none ------------------------------------------------------


@pytest.fixture
def remote_csv(tmp_path):
    url = f"memory://trainflow-data-{uuid.uuid4().hex}/data.csv"
    fs, path = fsspec.core.url_to_fs(url)
    fs.pipe_file(path, _csv(tmp_path / "local.csv").read_bytes())
    yield url
    fs.rm(path.rsplit("/", 1)[0], recursive=True)


def _count_opens(monkeypatch) -> list[str]:
    opened: list[str] = []
    memory = fsspec.filesystem("memory")
    real = type(memory)._open

    def counting(self, path, *args, **kwargs):
        opened.append(path)
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(type(memory), "_open", counting)
    return opened


def test_a_remote_file_is_read_once_on_a_cold_run(tmp_path, remote_csv, monkeypatch):
    opened = _count_opens(monkeypatch)
    cold = _train(tmp_path, "cold", data=remote_csv)
    assert _states(cold)["load-tensors"] == "Completed"
    assert len(opened) == 1


def test_with_version_identity_a_hit_reads_nothing_and_a_new_version_misses(
    tmp_path, remote_csv, monkeypatch
):
    _train(tmp_path, "first", data=remote_csv, data_identity="version")
    opened = _count_opens(monkeypatch)
    assert _states(_train(tmp_path, "hit", data=remote_csv, data_identity="version")) == ALL_HIT
    assert opened == []
    fs, path = fsspec.core.url_to_fs(remote_csv)
    fs.pipe_file(path, _csv(tmp_path / "other.csv", seed=1).read_bytes())
    newer = _states(_train(tmp_path, "newer", data=remote_csv, data_identity="version"))
    assert newer["load-tensors"] == "Completed"


def test_no_cache_hashes_nothing(tmp_path, monkeypatch):
    def no_hashing(*args, **kwargs):
        raise AssertionError("hashed with --no-cache")

    monkeypatch.setattr(trainflow.tasks.data.sources, "file_digest", no_hashing)
    monkeypatch.setattr(trainflow.tasks.cache.stage, "keyed", no_hashing)
    bypass = _train(tmp_path, "bypass", data=str(_csv(tmp_path / "data.csv")), no_cache=True)
    assert all(s["key"] is None for s in bypass.stages)
    assert not (tmp_path / "cache").exists()


def test_a_local_data_file_is_hashed_once_per_run(tmp_path, monkeypatch):
    calls = []
    real = trainflow.tasks.data.sources.file_digest
    monkeypatch.setattr(
        trainflow.tasks.data.sources, "file_digest", lambda p: calls.append(p) or real(p)
    )
    _train(tmp_path, "once", data=str(_csv(tmp_path / "data.csv")))
    assert len(calls) == 1


# --- the cache controls ----------------------------------------------------------------------


def test_refresh_cache_recomputes_and_overwrites(tmp_path):
    first = _train(tmp_path, "first")
    refreshed = _train(tmp_path, "refreshed", refresh_cache=True)
    assert set(_states(refreshed).values()) == {"Completed"}
    assert _weights(first) == _weights(refreshed)
    assert _states(_train(tmp_path, "after")) == ALL_HIT


def test_no_cache_neither_reads_nor_writes(tmp_path):
    _train(tmp_path, "warm")
    before = _files(tmp_path / "cache")
    bypass = _train(tmp_path, "bypass", no_cache=True)
    assert set(_states(bypass).values()) == {"Completed"}
    assert _files(tmp_path / "cache") == before


def test_cached_and_uncached_runs_write_the_same_weights(tmp_path):
    uncached = _train(tmp_path, "uncached", no_cache=True, model="mlp", hidden=(4,))
    cold = _train(tmp_path, "cold", model="mlp", hidden=(4,))
    hot = _train(tmp_path, "hot", model="mlp", hidden=(4,))
    assert _weights(uncached) == _weights(cold) == _weights(hot)


# --- damage --------------------------------------------------------------------------------


def test_a_corrupted_entry_is_recomputed_and_replaced(tmp_path):
    first = _train(tmp_path, "first")
    for blob in (tmp_path / "cache" / "blobs").iterdir():
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0xFF
        blob.write_bytes(bytes(data))  # same size; no mtime games: the checksum must catch it
    record = tmp_path / "cache" / "records" / f"{first.stages[1]['key']}.json"
    record.write_bytes(record.read_bytes()[:40])  # truncated
    repaired = _train(tmp_path, "repaired")
    assert set(_states(repaired).values()) == {"Completed"}
    assert _weights(first) == _weights(repaired)
    assert _states(_train(tmp_path, "again")) == ALL_HIT


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_planted_pickle_is_never_unpickled(tmp_path):
    first = _train(tmp_path, "first")
    marker = tmp_path / "pwned"
    for stage in first.stages:
        if stage["name"] in CACHED:
            record = tmp_path / "cache" / "records" / f"{stage['key']}.json"
            record.write_bytes(pickle.dumps(_Exploit(marker)))
    replanted = _train(tmp_path, "replanted")
    assert not marker.exists()
    assert set(_states(replanted).values()) == {"Completed"}


def test_no_stored_file_is_a_pickle(tmp_path):
    _train(tmp_path, "run", model="mlp", hidden=(4,))
    files = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert files
    for path in files:
        if path.parent.name == "records":
            assert json.loads(path.read_text())["artifact"]
        else:
            assert path.suffix == ".safetensors"
            load_file(path)


# --- two processes ---------------------------------------------------------------------------


def _cli(tmp_path, env, name):
    return subprocess.Popen(
        [
            sys.executable,
            str(REPO / "flows" / "train_flow.py"),
            "--epochs",
            "20",
            "--runs-dir",
            str(tmp_path / "runs"),
            "--run-name",
            name,
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(process) -> dict[str, str]:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    run_dir = Path(out.split("run directory: ")[1].splitlines()[0])
    return {s["name"]: s["state"] for s in json.loads((run_dir / "stages.json").read_text())}


def test_hits_across_processes_and_concurrent_runs_leave_valid_entries(tmp_path, subprocess_env):
    one, two = _cli(tmp_path, subprocess_env, "one"), _cli(tmp_path, subprocess_env, "two")
    _finish(one), _finish(two)  # same config at once: both succeed
    assert _finish(_cli(tmp_path, subprocess_env, "three")) == ALL_HIT
    weights = {
        load_file(tmp_path / "runs" / n / "model.safetensors")["0.weight"].item()
        for n in ("one", "two", "three")
    }
    assert len(weights) == 1
