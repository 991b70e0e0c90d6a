"""trainflow benchmarks: side by side in one run, medians with min–max, ratios as the claims.

    python benchmarks/run.py                      # every section
    python benchmarks/run.py --sections cache     # one section
    python benchmarks/run.py --json out.json      # also write the numbers as JSON

Each measurement runs in a fresh child process (so one can't warm the next). The e2e section
runs first and prepares nothing: `python flows/train_flow.py` finds or starts its server as
it does for a user. The other sections share one server the benchmark starts (the same
way, flows/server.py) in its own PREFECT_HOME and stops at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve()


# --- children: each prints one JSON line --------------------------------------------------


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child_flow(args: list[str]) -> dict[str, Any]:
    """One flow call, timed from flow start to return (imports and interpreter excluded)."""
    from flows.cli import parse_config
    from flows.config import TrainConfig
    from flows.train_flow import train_flow

    config = parse_config(TrainConfig, args)
    start = time.perf_counter()
    summary = train_flow(config)
    return {
        "seconds": time.perf_counter() - start,
        "states": {s["name"]: s["state"] for s in summary.stages},
        "stage_seconds": {s["name"]: s["seconds"] for s in summary.stages},
        "epochs_trained": summary.epochs_trained,
    }


def child_load(path: str, cache_dir: str) -> dict[str, Any]:
    """The load-tensors stage alone, through the real cache, in a minimal flow."""
    from prefect import flow

    from tasks.data import load_tensors
    from tasks.stage import using_cache

    @flow(name="bench-load")
    def bench_load() -> dict[str, Any]:
        base = _rss()
        start = time.perf_counter()
        with using_cache(cache_dir, "use"):
            state = load_tensors(path, (), 100, 42, 0.1, return_state=True)
        seconds = time.perf_counter() - start
        data = state.result()
        after_stage = _peak_rss() - base
        touched = float(data.x.sum() + data.y.sum())  # page every byte in, as training would
        return {
            "state": state.name,
            "seconds": seconds,
            "rss_stage": after_stage,
            "rss_touched": _rss() - base,
            "bytes": data.x.nbytes + data.y.nbytes,
            "checksum": touched,
        }

    return bench_load()


def child_numpy_load(path: str) -> dict[str, Any]:
    import numpy as np

    base = _rss()
    start = time.perf_counter()
    with np.load(path) as arrays:
        x, y = arrays["x"], arrays["y"]
    return {
        "seconds": time.perf_counter() - start,
        "rss": _peak_rss() - base,
        "bytes": x.nbytes + y.nbytes,
    }


def child_digest(path: str) -> dict[str, Any]:
    from tasks.keys import file_digest

    start = time.perf_counter()
    file_digest(path)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "gb_per_s": os.path.getsize(path) / seconds / 1e9}


def child_checkpoint(every_seconds: str, folder: str) -> dict[str, Any]:
    """Training time of a ~10 s run with checkpoints every S seconds (0: none at all)."""
    import torch

    from tasks.checkpoint import Checkpoints
    from tasks.data import Dataset
    from tasks.loaders import make_loaders
    from tasks.model import ModelSpec, initial_model
    from tasks.split import split_indices
    from tasks.train import train_model

    g = torch.Generator().manual_seed(0)
    x = torch.randn(100_000, 16, generator=g)
    data = Dataset(x, x[:, :1] * 2 + 1, (), ())
    loaders = make_loaders(
        data, split_indices(100_000, 0.2, 13), 64, 42, "tensor", 0, torch.device("cpu")
    )
    initial = initial_model(ModelSpec("mlp", 16, 1, (64, 64), "relu"), 42)
    seconds = float(every_seconds)
    checkpoints = Checkpoints(folder, every_seconds=seconds) if seconds > 0 else None
    start = time.perf_counter()
    train_model(
        initial,
        loaders,
        "sgd",
        0.01,
        0.0,
        0.0,
        "mse",
        8,
        torch.device("cpu"),
        checkpoints=checkpoints,
    )
    return {
        "seconds": time.perf_counter() - start,
        "saved": checkpoints.saved if checkpoints else 0,
    }


def child_loop(kind: str, scale_name: str, epochs: str, device: str) -> dict[str, Any]:
    """One training loop from benchmarks/loops.py, after a short warm-up of the same loop."""
    import torch

    sys.path.insert(0, str(HERE.parent))
    import loops

    scale = {"seed": loops.SEED_SCALE, "large": loops.LARGE_SCALE}[scale_name]
    dev = torch.device(device)
    run = {
        "seed": lambda n: loops.seed_loop(scale, dev, n),
        "trainflow": lambda n: loops.trainflow_loop(scale, dev, n),
        "autograd-free": lambda n: loops.autograd_free_loop(dev, n),
    }[kind]
    run(max(1, int(epochs) // 20))  # first-call costs (lazy imports, allocator) are not steps
    result = run(int(epochs))
    return {
        "steps_per_s": result.steps_per_s,
        "seconds": result.seconds,
        "train_loss": result.train_loss,
        "val_loss": result.val_loss,
    }


def child_tensorboard(epochs: str) -> dict[str, Any]:
    """What an epoch's curves (the loss chart, the metrics' and the lr's: five points) add to
    a seed-scale epoch of train_model, side by side in rounds: no curves, train-epochs' own
    writer (tasks/curves.py), and torch's SummaryWriter called per epoch as the seed does."""
    import torch
    from torch.utils.tensorboard import SummaryWriter

    from tasks.curves import Curves
    from tasks.data import synthetic
    from tasks.loaders import make_loaders
    from tasks.model import ModelSpec, initial_model
    from tasks.split import split_indices
    from tasks.train import train_model

    cpu = torch.device("cpu")
    loaders = make_loaders(synthetic(), split_indices(100, 0.2, 13), 16, 42, "tensor", 0, cpu)
    initial = initial_model(ModelSpec("linear", 1, 1), 42)

    def summary_writer(writer: SummaryWriter) -> Callable[..., None]:
        def on_epoch(epoch: int, train: float, val: float, values: dict[str, float]) -> None:
            writer.add_scalars("loss", {"training": train, "validation": val}, epoch)
            for name, value in values.items():
                writer.add_scalar(name, value, epoch)

        return on_epoch

    ms: dict[str, list[float]] = {"none": [], "curves": [], "SummaryWriter": []}
    with tempfile.TemporaryDirectory() as folder:
        hooks = {
            "none": None,
            "curves": Curves(Path(folder, "curves"), [], []),
            "SummaryWriter": summary_writer(SummaryWriter(str(Path(folder, "writer")))),
        }
        n = int(epochs)
        for round_ in range(6):  # the first round warms each up and is not counted
            for name, hook in hooks.items():
                start = time.perf_counter()
                train_model(initial, loaders, "sgd", 0.1, 0.0, 0.0, "mse", n, cpu, hook)
                if round_:
                    ms[name].append((time.perf_counter() - start) / n * 1e3)
        hooks["curves"].close()
    return {name: statistics.median(values) for name, values in ms.items()}


def child_requests(cache_dir: str) -> dict[str, Any]:
    """A cached default run in this process: the API requests it waits for, and their time."""
    import threading

    import httpx

    from flows.train_flow import main as train_main

    waited: list[tuple[str, float]] = []
    send = httpx.Client.send

    def timed_send(self: httpx.Client, request: httpx.Request, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return send(self, request, *args, **kwargs)
        finally:
            if threading.current_thread() is threading.main_thread():
                waited.append((f"{request.method} {request.url.path}", time.perf_counter() - start))

    argv = ["--cache-dir", cache_dir, "--runs-dir", "runs"]
    assert train_main(argv) == 0  # fills the cache
    httpx.Client.send = timed_send  # type: ignore[method-assign]
    start = time.perf_counter()
    assert train_main(argv) == 0
    resources = sorted({path.split("/")[2] for path, _ in waited})  # /api/<resource>/…
    return {
        "seconds": time.perf_counter() - start,
        "requests": len(waited),
        "request_seconds": sum(t for _, t in waited),
        "paths": resources,
    }


CHILDREN: dict[str, Callable[..., dict[str, Any]]] = {
    "tensorboard": child_tensorboard,
    "requests": child_requests,
    "loop": child_loop,
    "checkpoint": child_checkpoint,
    "flow": lambda *a: child_flow(list(a)),
    "load": child_load,
    "numpy-load": child_numpy_load,
    "digest": child_digest,
}


# --- the parent: orchestration and the table ----------------------------------------------


def spawn(env: dict[str, str], kind: str, *args: str) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, str(HERE), "--child", kind, *args],
        cwd=env["BENCH_CWD"],
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{kind} {args} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def median(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def fmt(stat: dict[str, float], unit: str = "s") -> str:
    scale = 1e9 if unit == "GB" else 1
    return (
        f"{stat['median'] / scale:.3f} {unit} ({stat['min'] / scale:.3f}–{stat['max'] / scale:.3f})"
    )


class Server:
    """The other sections' Prefect server, started and stopped the way the CLI does it
    (flows/server.py), in the benchmark's own PREFECT_HOME."""

    def __init__(self, home: Path):
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
        self.env = {**env, "PREFECT_HOME": str(home), "PYTHONPATH": str(REPO)}
        start = subprocess.run(
            [sys.executable, "-m", "flows.server", "start"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        if start.returncode != 0:
            raise RuntimeError(f"the Prefect server did not start:\n{start.stderr}")
        self.env["PREFECT_API_URL"] = start.stdout.strip().splitlines()[-1] + "/api"

    def stop(self) -> None:
        subprocess.run([sys.executable, "-m", "flows.server", "stop"], env=self.env, timeout=120)


def bench_cache(env: dict[str, str], repeat: int, rows: list[tuple[str, str]]) -> dict[str, Any]:
    """Re-running a finished config: every stage Cached, nothing trained, flow time."""
    out: dict[str, Any] = {}
    cold, cached = [], []
    for i in range(repeat):
        common = ["--cache-dir", f"cache-rerun-{i}", "--runs-dir", "runs", "--epochs", "2000"]
        cold.append(spawn(env, "flow", *common))
        cached.append(spawn(env, "flow", *common))
    out["cold_flow"] = median([r["seconds"] for r in cold])
    out["cached_flow"] = median([r["seconds"] for r in cached])
    out["cached_states"] = cached[-1]["states"]
    out["cached_epochs_trained"] = cached[-1]["epochs_trained"]
    out["cached_over_cold"] = out["cached_flow"]["median"] / out["cold_flow"]["median"]
    all_cached = all(s == "Cached" for n, s in out["cached_states"].items() if n != "build-loaders")
    rows += [
        ("cache: cold flow (2000 epochs)", fmt(out["cold_flow"])),
        ("cache: re-run flow", fmt(out["cached_flow"]) + "   target ≤ 3 s"),
        ("cache: re-run / cold", f"{out['cached_over_cold']:.2f}×   target ≤ 0.3×"),
        (
            "cache: re-run stages",
            f"all cached: {all_cached}, epochs trained: {out['cached_epochs_trained']}",
        ),
    ]
    return out


def bench_data(
    env: dict[str, str], repeat: int, rows: list[tuple[str, str]], gigabytes: float
) -> dict[str, Any]:
    """A ~1 GB .npz: content hashing, a cold load-tensors, a cached one, vs numpy.load."""
    import numpy as np

    n = int(gigabytes * 1e9 / (11 * 4))  # x: n×10 float32, y: n×1
    path = Path(env["BENCH_CWD"]) / "big.npz"
    rng = np.random.default_rng(0)
    x = rng.random((n, 10), dtype=np.float32)
    np.savez(path, x=x, y=x[:, :1] * 2 + 1)
    del x
    size = path.stat().st_size
    out: dict[str, Any] = {"file_bytes": size}
    digests = [spawn(env, "digest", str(path)) for _ in range(repeat)]
    numpy_loads = [spawn(env, "numpy-load", str(path)) for _ in range(repeat)]
    colds, hits = [], []
    for i in range(repeat):
        cache = f"cache-data-{i}"
        colds.append(spawn(env, "load", str(path), cache))
        hits.append(spawn(env, "load", str(path), cache))
    path.unlink()
    data_bytes = colds[0]["bytes"]
    out["hash_gb_per_s"] = median([d["gb_per_s"] * 1e9 for d in digests])
    out["numpy_load"] = median([r["seconds"] for r in numpy_loads])
    out["numpy_rss_over_data"] = median([r["rss"] / data_bytes for r in numpy_loads])
    out["cold"] = median([r["seconds"] for r in colds])
    out["cold_rss_over_data"] = median([r["rss_stage"] / data_bytes for r in colds])
    out["hit"] = median([r["seconds"] for r in hits])
    out["hit_states"] = [r["state"] for r in hits]
    out["hit_rss_over_data"] = median([r["rss_stage"] / data_bytes for r in hits])
    out["hit_touched_rss_over_data"] = median([r["rss_touched"] / data_bytes for r in hits])
    rows += [
        (f"data: file ({size / 1e9:.2f} GB npz)", f"x {n:,}×10, y {n:,}×1 float32"),
        ("data: content hash", fmt(out["hash_gb_per_s"], "GB") + "/s   target ≥ 1 GB/s"),
        (
            "data: numpy.load",
            fmt(out["numpy_load"]) + f", peak RSS {out['numpy_rss_over_data']['median']:.2f}× data",
        ),
        (
            "data: load-tensors cold",
            fmt(out["cold"])
            + f", peak RSS {out['cold_rss_over_data']['median']:.2f}× data   target ≤ 2×",
        ),
        ("data: load-tensors hit", fmt(out["hit"]) + f" {set(out['hit_states'])}   target ≤ 0.3 s"),
        (
            "data: hit peak RSS",
            f"{out['hit_rss_over_data']['median']:.2f}× data (mapped); "
            f"{out['hit_touched_rss_over_data']['median']:.2f}× after reading every byte"
            "   target ≤ 1.2×",
        ),
    ]
    return out


def bench_checkpoint(env: dict[str, str], repeat: int, rows: list[tuple[str, str]]) -> dict:
    """What checkpointing costs training: none vs the default 30 s cadence vs every second."""
    out: dict[str, Any] = {}
    for label, every in (("none", "0"), ("default", "30"), ("every_1s", "1")):
        runs = [spawn(env, "checkpoint", every, f"ckpt-{label}-{i}") for i in range(repeat)]
        out[label] = median([r["seconds"] for r in runs])
        out[f"{label}_saved"] = runs[-1]["saved"]
    base = out["none"]["median"]
    for label in ("default", "every_1s"):
        out[f"{label}_overhead"] = out[label]["median"] / base - 1
    rows += [
        ("checkpoint: training, none", fmt(out["none"]) + "  (100k×16, mlp 64×64, batch 64)"),
        (
            "checkpoint: default (30 s + end)",
            fmt(out["default"])
            + f", {out['default_saved']} saved, overhead {out['default_overhead']:+.1%}"
            "   target < 5%",
        ),
        (
            "checkpoint: every 1 s",
            fmt(out["every_1s"])
            + f", {out['every_1s_saved']} saved, overhead {out['every_1s_overhead']:+.1%}",
        ),
    ]
    return out


def bench_loop(
    env: dict[str, str], repeat: int, rows: list[tuple[str, str]], device: str = "cpu"
) -> dict[str, Any]:
    """The seed's loop vs trainflow's on the same batches: steps/s and the ratio."""
    import numpy as np

    out: dict[str, Any] = {}
    for scale, epochs in (("seed", "300"), ("large", "1")):
        runs = {
            kind: [spawn(env, "loop", kind, scale, epochs, device) for _ in range(repeat)]
            for kind in ("seed", "trainflow")
        }
        seed, ours = (median([r["steps_per_s"] for r in runs[k]]) for k in ("seed", "trainflow"))
        ref, got = runs["seed"][0], runs["trainflow"][0]
        error = max(
            float(np.max(np.abs(np.subtract(ref[k], got[k])) / np.abs(ref[k])))
            for k in ("train_loss", "val_loss")
        )
        out[scale] = {
            "seed": seed,
            "trainflow": ours,
            "ratio": ours["median"] / seed["median"],
            "max_relative_loss_difference": error,
        }
        rows += [
            (
                f"loop {scale}: seed loop",
                f"{seed['median']:,.0f} steps/s ({seed['min']:,.0f}–{seed['max']:,.0f})",
            ),
            (
                f"loop {scale}: trainflow",
                f"{ours['median']:,.0f} steps/s ({ours['min']:,.0f}–{ours['max']:,.0f})",
            ),
            (
                f"loop {scale}: ratio",
                f"{out[scale]['ratio']:.2f}×   target ≥ 3×; "
                f"losses differ by ≤ {error:.1e} (relative)",
            ),
        ]
    free = median(
        [
            spawn(env, "loop", "autograd-free", "seed", "300", device)["steps_per_s"]
            for _ in range(repeat)
        ]
    )
    out["autograd_free"] = free
    times_seed = free["median"] / out["seed"]["seed"]["median"]
    rows.append(
        (
            "loop seed: autograd-free limit",
            f"{free['median']:,.0f} steps/s ({times_seed:.1f}× the seed loop)",
        )
    )
    return out


# --- whole processes, as a user runs them --------------------------------------------------

FLOW = REPO / "flows" / "train_flow.py"
IMPORT_TORCH, IMPORT_TORCH_PREFECT = "import torch", "import torch, prefect"
SEED = HERE.parent / "seed_script.py"


def _user_env(home: Path, cwd: Path) -> dict[str, str]:
    """A user's shell: no PREFECT_API_URL (the CLI finds or starts its server), their own
    PREFECT_HOME, bytecode cached as usual."""
    drop = {"PREFECT_API_URL", "PYTHONDONTWRITEBYTECODE", "PYTHONPATH"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, "PREFECT_HOME": str(home), "BENCH_CWD": str(cwd)}


def _timed(env: dict[str, str], *argv: str) -> tuple[float, float]:
    """`python ARGV…`: wall time, and CPU time (user + system) of the command and the children
    it waited for: a second view that other load on the machine disturbs much less."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, *argv],
        cwd=env["BENCH_CWD"],
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise RuntimeError(f"python {' '.join(argv)} failed:\n{result.stderr[-3000:]}")
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return seconds, cpu


def _stop_server(home: Path) -> None:
    env = {**os.environ, "PREFECT_HOME": str(home), "PYTHONPATH": str(REPO)}
    subprocess.run(
        [sys.executable, "-m", "flows.server", "stop"],
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )


def _shown(script: Path, *args: str) -> str:
    return " ".join(["$ python", str(script.relative_to(REPO)), *args])


def _ratio(ours: dict[str, float], seed: dict[str, float]) -> str:
    return f"{ours['median'] / seed['median']:.2f}× the seed"


def bench_e2e(scratch: Path, repeat: int, rows: list[tuple[str, str]]) -> dict[str, Any]:
    """`python flows/train_flow.py` against the seed script, whole processes, interleaved.

    No server is prepared: each new PREFECT_HOME's first run starts the one later runs use,
    exactly as for a user. (d) uses a new home each time; (a)-(c) the last one's server.
    """
    times: dict[str, list[float]] = {}
    cpu_times: dict[str, list[float]] = {}

    def run(key: str, env: dict[str, str], script: Path | str, *args: str) -> None:
        wall, cpu = _timed(env, str(script), *args)
        times.setdefault(key, []).append(wall)
        cpu_times.setdefault(key, []).append(cpu)

    homes = [scratch / f"home-{i}" for i in range(repeat)]
    try:
        for i, home in enumerate(homes):
            # (d) a new clone: a new PREFECT_HOME and folder, so a server start, a cold cache.
            env = _user_env(home, scratch / f"clone-{i}")
            Path(env["BENCH_CWD"]).mkdir(parents=True)
            run("seed_200", env, SEED)
            run("first_run", env, FLOW)
            if i < repeat - 1:
                _stop_server(home)
        # The last clone has had its first run: its default config is cached, its server up.
        for _ in range(repeat):
            run("seed_200", env, SEED)
            run("cached", env, FLOW)
            run("cached_heartbeats", {**env, "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "180"}, FLOW)
            run("import_torch", env, "-c", IMPORT_TORCH)
            run("import_torch_prefect", env, "-c", IMPORT_TORCH_PREFECT)
        for i in range(repeat):
            for epochs in ("2000", "12000"):
                run(f"seed_{epochs}", env, SEED, "--epochs", epochs)
                cold = ("--epochs", epochs, "--cache-dir", f"cold-{epochs}-{i}")
                run(f"cold_{epochs}", env, FLOW, *cold)
    finally:
        for home in homes:
            _stop_server(home)

    out: dict[str, Any] = {k: median(v) for k, v in times.items()}
    out["cpu"] = {k: median(v) for k, v in cpu_times.items()}
    out["samples"], out["cpu_samples"] = times, cpu_times
    for who in ("seed", "cold"):  # per epoch: pairwise differences of interleaved runs
        for stats, samples in ((out, times), (out["cpu"], cpu_times)):
            pairs = zip(samples[f"{who}_2000"], samples[f"{who}_12000"], strict=True)
            stats[f"{who}_per_epoch"] = median([(b - a) / 10_000 * 1e3 for a, b in pairs])

    def row(label: str, key: str, seed: str | None, command: str, target: str = "") -> None:
        wall, cpu = out[key], out["cpu"][key]
        value = f"{fmt(wall)}, CPU {cpu['median']:.2f} s"
        if seed:
            value += (
                f"   {wall['median'] / out[seed]['median']:.2f}× the seed "
                f"(CPU {cpu['median'] / out['cpu'][seed]['median']:.2f}×)"
            )
        rows.extend([(label, value + target), ("", command)])

    row(
        "e2e (d) first run, new PREFECT_HOME",
        "first_run",
        "seed_200",
        _shown(FLOW) + "   [new PREFECT_HOME, new folder; starts the server]",
    )
    row("e2e (a) seed script, 200 epochs", "seed_200", None, _shown(SEED))
    row(
        "e2e (a) trainflow, every stage cached",
        "cached",
        "seed_200",
        _shown(FLOW) + "   [after the first run]",
        "   target ≤ 1.0×",
    )
    row(
        "e2e (a) same, heartbeats on",
        "cached_heartbeats",
        "seed_200",
        "$ PREFECT_FLOWS_HEARTBEAT_FREQUENCY=180 python flows/train_flow.py",
    )
    row("e2e (b) seed script, 2,000 epochs", "seed_2000", None, _shown(SEED, "--epochs", "2000"))
    row(
        "e2e (b) trainflow cold, 2,000 epochs",
        "cold_2000",
        "seed_2000",
        _shown(FLOW, "--epochs", "2000", "--cache-dir", "cold-2000-I"),
        "   target ≤ 1.0×",
    )
    row("e2e (c) seed script, 12,000 epochs", "seed_12000", None, _shown(SEED, "--epochs", "12000"))
    row(
        "e2e (c) trainflow cold, 12,000 epochs",
        "cold_12000",
        None,
        _shown(FLOW, "--epochs", "12000", "--cache-dir", "cold-12000-I"),
    )
    seed, ours = out["seed_per_epoch"], out["cold_per_epoch"]
    cpu_seed, cpu_ours = out["cpu"]["seed_per_epoch"], out["cpu"]["cold_per_epoch"]
    rows.append(
        (
            "e2e (c) per epoch: seed → trainflow",
            f"{fmt(seed, 'ms')} → {fmt(ours, 'ms')}: {seed['median'] / ours['median']:.2f}× faster "
            f"(CPU {cpu_seed['median']:.3f} → {cpu_ours['median']:.3f} ms: "
            f"{cpu_seed['median'] / cpu_ours['median']:.2f}×)   target ≥ 3×",
        )
    )
    row("e2e imports: torch", "import_torch", None, f'$ python -c "{IMPORT_TORCH}"')
    row(
        "e2e imports: torch, prefect",
        "import_torch_prefect",
        None,
        f'$ python -c "{IMPORT_TORCH_PREFECT}"',
    )
    return out


def bench_overhead(env: dict[str, str], repeat: int, rows: list[tuple[str, str]]) -> dict:
    """Prefect's share of a cached run, and TensorBoard's of an epoch."""
    runs = [spawn(env, "requests", f"cache-requests-{i}") for i in range(repeat)]
    tb = spawn(env, "tensorboard", "1000")
    out = {
        "flow": median([r["seconds"] for r in runs]),
        "requests": runs[-1]["requests"],
        "paths": runs[-1]["paths"],
        "request_seconds": median([r["request_seconds"] for r in runs]),
        "tensorboard_ms_per_epoch": tb,
    }
    rows += [
        ("overhead: cached run, main()", fmt(out["flow"]) + " (in a process already warm)"),
        (
            "overhead: API requests it waits for",
            f"{out['requests']} ({', '.join(out['paths'])}): {fmt(out['request_seconds'])}",
        ),
        (
            "overhead: a seed-scale epoch, ms: no curves / curves / SummaryWriter",
            " / ".join(f"{tb[k]:.2f}" for k in ("none", "curves", "SummaryWriter"))
            + f"  (curves add {tb['curves'] - tb['none']:.2f} ms, SummaryWriter "
            + f"{tb['SummaryWriter'] - tb['none']:.2f} ms)",
        ),
    ]
    return out


SECTIONS = ("e2e", "loop", "overhead", "cache", "data", "checkpoint")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement")
    parser.add_argument("--data-gb", type=float, default=1.0, help="size of the data benchmark")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--device", default="cpu", help="device of the loop section")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        print(json.dumps(CHILDREN[kind](*rest)))
        return 0

    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    rows: list[tuple[str, str]] = []
    results: dict[str, Any] = {"repeat": args.repeat}
    with tempfile.TemporaryDirectory(prefix="trainflow-bench-") as scratch:
        if "e2e" in sections:  # first, and with no other server up: as a user has it
            results["e2e"] = bench_e2e(Path(scratch) / "e2e", args.repeat, rows)
        if set(sections) - {"e2e"}:
            server = Server(Path(scratch) / "prefect")
            env = {**server.env, "BENCH_CWD": scratch}
            try:
                if "loop" in sections:
                    results["loop"] = bench_loop(env, args.repeat, rows, args.device)
                if "overhead" in sections:
                    results["overhead"] = bench_overhead(env, args.repeat, rows)
                if "cache" in sections:
                    results["cache"] = bench_cache(env, args.repeat, rows)
                if "checkpoint" in sections:
                    results["checkpoint"] = bench_checkpoint(env, args.repeat, rows)
                if "data" in sections:
                    results["data"] = bench_data(env, args.repeat, rows, args.data_gb)
            finally:
                server.stop()
    width = max(len(name) for name, _ in rows)
    print(f"\n{'measurement':<{width}}  median (min–max) over {args.repeat} runs")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
