"""The stage cache end to end: Prefect states, hits across processes, misses, corruption."""

import base64
import json
import os
import pickle
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from flows.config import TrainConfig
from flows.train_flow import train_flow

from .conftest import REPO

pytestmark = pytest.mark.usefixtures("prefect_api")
CACHED = ["load-tensors", "split", "build-model", "train-epochs", "export-graph"]


def _train(tmp_path: Path, name: str, **overrides):
    config = {"epochs": 5, "runs_dir": str(tmp_path / "runs"), "run_name": name,
              "cache_dir": str(tmp_path / "cache"), **overrides}  # fmt: skip
    return train_flow(TrainConfig(**config))


def _states(summary) -> dict[str, str]:
    return {stage["name"]: stage["state"] for stage in summary.stages}


def _weights(summary) -> bytes:
    return (Path(summary.run_dir) / "model.safetensors").read_bytes()


def _csv(path: Path, rows: int = 40, seed: int = 0) -> Path:
    table = np.random.RandomState(seed).rand(rows, 3).round(4)
    np.savetxt(path, table, delimiter=",", header="a,b,y", comments="", fmt="%.4f")
    return path


def test_a_rerun_serves_every_stage_from_the_cache_and_trains_nothing(tmp_path):
    first = _train(tmp_path, "first")
    second = _train(tmp_path, "second")
    assert set(_states(first).values()) == {"Completed"}
    assert _states(second) == {**dict.fromkeys(CACHED, "Cached"), "build-loaders": "Completed"}
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
        "load-tensors": "Cached", "split": "Cached", "build-loaders": "Completed",
        "build-model": "Cached", "train-epochs": "Completed", "export-graph": "Completed",
    }  # fmt: skip


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
    states = _states(_train(tmp_path, "other", data=str(data), n_samples=7, hidden=(3,)))
    assert set(states.values()) - {"Completed"} == {"Cached"}
    assert states["build-loaders"] == "Completed"


def test_refresh_cache_recomputes_and_overwrites(tmp_path):
    first = _train(tmp_path, "first")
    refreshed = _train(tmp_path, "refreshed", refresh_cache=True)
    assert set(_states(refreshed).values()) == {"Completed"}
    assert _weights(first) == _weights(refreshed)
    assert set(_states(_train(tmp_path, "after")).values()) == {"Cached", "Completed"}


def test_no_cache_neither_reads_nor_writes(tmp_path):
    _train(tmp_path, "warm")
    before = sorted(p.name for p in (tmp_path / "cache").rglob("*"))
    bypass = _train(tmp_path, "bypass", no_cache=True)
    assert set(_states(bypass).values()) == {"Completed"}
    assert sorted(p.name for p in (tmp_path / "cache").rglob("*")) == before
    assert not (tmp_path / "fresh").exists()
    _train(tmp_path, "none", no_cache=True, cache_dir=str(tmp_path / "fresh"))
    assert not (tmp_path / "fresh").exists()


def test_cached_and_uncached_runs_write_the_same_weights(tmp_path):
    uncached = _train(tmp_path, "uncached", no_cache=True, model="mlp", hidden=(4,))
    cold = _train(tmp_path, "cold", model="mlp", hidden=(4,))
    hot = _train(tmp_path, "hot", model="mlp", hidden=(4,))
    assert _weights(uncached) == _weights(cold) == _weights(hot)


def test_a_corrupted_entry_is_recomputed_and_replaced(tmp_path):
    first = _train(tmp_path, "first")
    for blob in (tmp_path / "cache" / "blobs").iterdir():
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0xFF
        blob.write_bytes(bytes(data))
        os.utime(blob, ns=(blob.stat().st_atime_ns, blob.stat().st_mtime_ns + 10**9))
    record = tmp_path / "cache" / "records" / first.stages[1]["key"]
    record.write_bytes(record.read_bytes()[:40])  # truncated
    repaired = _train(tmp_path, "repaired")
    assert set(_states(repaired).values()) == {"Completed"}
    assert _weights(first) == _weights(repaired)
    assert set(_states(_train(tmp_path, "again")).values()) == {"Cached", "Completed"}


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_planted_pickle_is_never_unpickled(tmp_path):
    first = _train(tmp_path, "first")
    marker = tmp_path / "pwned"
    payload = base64.b64encode(pickle.dumps(_Exploit(marker))).decode()
    planted = {"metadata": {"storage_key": "x", "serializer": {"type": "pickle"},
                            "prefect_version": "3.9.1"}, "result": payload}  # fmt: skip
    for stage in first.stages:
        if stage["name"] in CACHED:
            (tmp_path / "cache" / "records" / stage["key"]).write_text(json.dumps(planted))
    (tmp_path / "cache" / "records" / "raw").write_bytes(pickle.dumps(_Exploit(marker)))
    replanted = _train(tmp_path, "replanted")
    assert not marker.exists()
    assert set(_states(replanted).values()) == {"Completed"}


def test_no_stored_file_is_a_pickle(tmp_path):
    _train(tmp_path, "run", model="mlp", hidden=(4,))
    files = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert files
    for path in files:
        head = path.read_bytes()[:2]
        assert not (head[:1] == b"\x80" and head[1:] in (b"\x02", b"\x03", b"\x04", b"\x05")), path
        if path.parent.name == "records":
            record = json.loads(path.read_text())
            assert record["metadata"]["serializer"]["type"] == "trainflow-artifact"
            assert json.loads(record["result"])["artifact"]
        else:
            assert path.suffix == ".safetensors"
            load_file(path)


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_fsspec_url_caches_hit(tmp_path, scheme):
    url = f"memory://trainflow-{uuid.uuid4().hex}" if scheme == "memory" else (
        f"file://{tmp_path / 'url-cache'}")  # fmt: skip
    _train(tmp_path, "first", cache_dir=url)
    again = _train(tmp_path, "again", cache_dir=url)
    assert _states(again)["train-epochs"] == "Cached"


def _cli(tmp_path, env, name):
    return subprocess.Popen(
        [sys.executable, str(REPO / "flows" / "train_flow.py"), "--epochs", "20",
         "--runs-dir", str(tmp_path / "runs"), "--run-name", name,
         "--cache-dir", str(tmp_path / "cache")],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _finish(process) -> dict[str, str]:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    run_dir = Path(out.split("run directory: ")[1].splitlines()[0])
    return {s["name"]: s["state"] for s in json.loads((run_dir / "stages.json").read_text())}


def test_hits_across_processes_and_concurrent_runs_leave_valid_entries(tmp_path, subprocess_env):
    one, two = _cli(tmp_path, subprocess_env, "one"), _cli(tmp_path, subprocess_env, "two")
    _finish(one), _finish(two)  # same config at once: both succeed
    third = _finish(_cli(tmp_path, subprocess_env, "three"))
    assert third == {**dict.fromkeys(CACHED, "Cached"), "build-loaders": "Completed"}
    weights = {load_file(tmp_path / "runs" / n / "model.safetensors")["0.weight"].item()
               for n in ("one", "two", "three")}  # fmt: skip
    assert len(weights) == 1


def test_a_data_file_is_hashed_once_per_run(tmp_path, monkeypatch):
    import tasks.data

    calls = []
    real = tasks.data.content_digest

    def counting(url):
        calls.append(url)
        return real(url)

    monkeypatch.setattr(tasks.data, "content_digest", counting)  # a remote file is not memoised
    _train(tmp_path, "once", data=str(_csv(tmp_path / "data.csv")))
    assert len(calls) == 1
