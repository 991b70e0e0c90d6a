"""trainflow benchmarks: side by side in one run, medians with min–max, ratios as the claims.

    python benchmarks/run.py                      # every section
    python benchmarks/run.py --sections cache     # one section
    python benchmarks/run.py --json out.json      # also write the numbers as JSON

Each measurement runs in a fresh child process (so one can't warm the next), against one
local Prefect server the benchmark starts on 127.0.0.1 and stops at the end.
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


CHILDREN: dict[str, Callable[..., dict[str, Any]]] = {
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
    """A local Prefect server for the children, so no measurement pays an ephemeral start."""

    def __init__(self, home: Path):
        self.port = _free_port()
        self.env = {
            **os.environ,
            "PREFECT_HOME": str(home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_API_URL": f"http://127.0.0.1:{self.port}/api",
        }
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "prefect",
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--no-ui",
            ],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        import urllib.request

        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/health", timeout=2)
                return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError("the Prefect server did not start within 180 s")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def _timed_process(env: dict[str, str], *command: str) -> float:
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, *command],
        cwd=env["BENCH_CWD"],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{command} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def bench_e2e(env: dict[str, str], repeat: int, rows: list[tuple[str, str]]) -> dict[str, Any]:
    """Whole processes at 2,000 epochs: the seed script vs `python flows/train_flow.py`."""
    flow = str(REPO / "flows" / "train_flow.py")
    seed = str(HERE.parent / "seed_script.py")
    # Prefect's temporary server: its own PREFECT_HOME, migrated by a warm-up run first.
    ephemeral = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    ephemeral["PREFECT_HOME"] = str(Path(env["BENCH_CWD"]) / "prefect-ephemeral")
    _timed_process(ephemeral, flow, "--epochs", "2", "--cache-dir", "warm-up")
    times: dict[str, list[float]] = {k: [] for k in ("seed", "ephemeral", "server", "cached")}
    for i in range(repeat):
        times["seed"].append(_timed_process(env, seed, "--epochs", "2000", "--logdir", f"s{i}"))
        args = ("--epochs", "2000")
        times["ephemeral"].append(_timed_process(ephemeral, flow, *args, "--cache-dir", f"e{i}"))
        times["server"].append(_timed_process(env, flow, *args, "--cache-dir", f"c{i}"))
        times["cached"].append(_timed_process(env, flow, *args, "--cache-dir", f"c{i}"))
    out = {k: median(v) for k, v in times.items()}
    base = out["seed"]["median"]
    rows += [
        ("e2e 2000 epochs: seed script", fmt(out["seed"])),
        (
            "e2e: trainflow, temporary server",
            fmt(out["ephemeral"])
            + f"   {out['ephemeral']['median'] / base:.2f}× the seed   target ≤ 1.0×",
        ),
        (
            "e2e: trainflow, running server",
            fmt(out["server"])
            + f"   {out['server']['median'] / base:.2f}× the seed   target ≤ 1.0×",
        ),
        (
            "e2e: trainflow, cached re-run",
            fmt(out["cached"])
            + f"   {out['cached']['median'] / out['server']['median']:.2f}× its cold run",
        ),
    ]
    return out


SECTIONS = ("loop", "e2e", "cache", "data", "checkpoint")


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
        server = Server(Path(scratch) / "prefect")
        env = {**server.env, "BENCH_CWD": scratch, "PYTHONPATH": str(REPO)}
        try:
            if "loop" in sections:
                results["loop"] = bench_loop(env, args.repeat, rows, args.device)
            if "e2e" in sections:
                results["e2e"] = bench_e2e(env, args.repeat, rows)
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
