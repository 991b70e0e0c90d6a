"""trainflow's speed claims, measured side by side, in one table: claim, measured, goal, met?,
load.

    python benchmarks/run.py                          # every section
    python benchmarks/run.py --sections e2e           # one section, or several: e2e,loop
    python benchmarks/run.py --sections loop --scale seed --repeat 3
    python benchmarks/run.py --json out.json          # also write the numbers as JSON

Sections:
  e2e         Whole processes, as a user runs them: `python flows/train_flow.py` against the
              seed script (benchmarks/seed_script.py), in turns. Claims: the default command
              with every stage cached takes at most the seed script's 200 epochs (≤ 1.0×), and
              a cold 2,000-epoch run at most the seed script's 2,000 epochs (≤ 1.0×). Also
              shown: a first run in a new PREFECT_HOME, heartbeats on, an epoch's cost from
              12,000- minus 2,000-epoch runs, and the imports.
  loop        Loop parity (benchmarks/loops.py): trainflow's training loop against a bare
              torch loop on the same batches, steps/s, trainflow / bare ≥ 0.97, at the seed's
              scale and at 10^6 x 32 with an MLP 64-64 (--scale picks one). At the seed's
              scale, trainflow against the seed's own loop too, and with its validation
              metrics on, as information. The rounds are loops.py's, per scale, in one
              process (--repeat does not change them).
  overhead    What Prefect adds to a cached run (the API requests it waits for) and what the
              TensorBoard curves add to a seed-scale epoch. Information.
  cache       A finished config run again: every stage cached, nothing trained, the flow's
              time ≤ 3 s.
  checkpoint  What checkpoints at the default cadence cost training: < 5%.
  data        A ~1 GB .npz (--data-gb): content hashing ≥ 1 GB/s, load-tensors' peak memory
              ≤ 2x the data cold, a cached load ≤ 0.3 s and ≤ 1.2x the data once read.

Each measurement runs in a fresh child process (so one can't warm the next), except the
loop section's rounds, which take turns in one process per scale. The e2e section runs first
and prepares nothing: `python flows/train_flow.py` finds or starts its server as it does for
a user. The overhead, cache, checkpoint and data sections share one server the benchmark
starts (`trainflow server start`, in its own PREFECT_HOME) and stops at the end.

The load column is the 1-minute load average before and after the section, over the CPU
count (the benchmark's own processes count in the second). Take the numbers that count on a
quiet machine: with other work running, the spread between runs exceeds what is measured.
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
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import machine

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve()
FLOW = REPO / "flows" / "train_flow.py"  # the command a user runs
SEED = HERE.parent / "seed_script.py"
# The `trainflow` command, as `python -m`: its `server start|stop`.
TRAINFLOW = (sys.executable, "-m", "trainflow.flows.main")


def trainflow_internals() -> SimpleNamespace:
    """The trainflow internals the children call: this file's only import of them (the
    loop section's are benchmarks/loops.py's)."""
    from trainflow.flows.cli import parse_config
    from trainflow.flows.config import TrainConfig
    from trainflow.flows.train_flow import main as train_main
    from trainflow.flows.train_flow import train_flow
    from trainflow.tasks.cache.keys import file_digest
    from trainflow.tasks.cache.stage import using_cache
    from trainflow.tasks.engine.checkpoint import Checkpoints
    from trainflow.tasks.engine.fit import train_model
    from trainflow.tasks.load_tensors import load_tensors
    from trainflow.tasks.runs.curves import Curves

    return SimpleNamespace(
        parse_config=parse_config,
        TrainConfig=TrainConfig,
        train_main=train_main,
        train_flow=train_flow,
        file_digest=file_digest,
        using_cache=using_cache,
        Checkpoints=Checkpoints,
        train_model=train_model,
        load_tensors=load_tensors,
        Curves=Curves,
    )


# --- children: each prints one JSON line --------------------------------------------------


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child_flow(*args: str) -> dict[str, Any]:
    """One flow call, timed from flow start to return (imports and interpreter excluded)."""
    tf = trainflow_internals()
    config = tf.parse_config(tf.TrainConfig, list(args))
    start = time.perf_counter()
    summary = tf.train_flow(config)
    return {
        "seconds": time.perf_counter() - start,
        "states": {s["name"]: s["state"] for s in summary.stages},
        "epochs_trained": summary.epochs_trained,
    }


def child_load(path: str, cache_dir: str) -> dict[str, Any]:
    """The load-tensors stage alone, through the real cache, in a minimal flow."""
    from prefect import flow

    tf = trainflow_internals()

    @flow(name="bench-load")
    def bench_load() -> dict[str, Any]:
        base = _rss()
        start = time.perf_counter()
        with tf.using_cache(cache_dir, "use"):
            state = tf.load_tensors(path, (), 100, 42, 0.1, return_state=True)
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
    tf = trainflow_internals()
    start = time.perf_counter()
    tf.file_digest(path)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "gb_per_s": os.path.getsize(path) / seconds / 1e9}


CHECKPOINT_SCALE = ("checkpoint", 100_000, 16, "mlp", (64, 64), 64, 0.01, 30)


def child_checkpoint(every_seconds: str, folder: str) -> dict[str, Any]:
    """Training time with checkpoints every S seconds (0: none at all)."""
    import loops
    import torch

    tf = trainflow_internals()
    cpu = torch.device("cpu")
    p = loops.prepare(loops.Scale(*CHECKPOINT_SCALE), cpu)
    seconds = float(every_seconds)
    checkpoints = tf.Checkpoints(folder, every_seconds=seconds) if seconds > 0 else None
    start = time.perf_counter()
    s = p.scale
    tf.train_model(
        p.initial, p.loaders, "sgd", s.lr, 0.0, 0.0, "mse", s.epochs, cpu, checkpoints=checkpoints
    )
    return {
        "seconds": time.perf_counter() - start,
        "saved": checkpoints.saved if checkpoints else 0,
    }


def child_loop(scale: str, device: str) -> dict[str, Any]:
    """Loop parity at one scale: benchmarks/loops.py's rounds, in this process."""
    import loops
    import torch

    chosen = loops.SCALES[scale]
    return loops.parity(chosen, torch.device(device), chosen.rounds)


def child_curves(epochs: str) -> dict[str, Any]:
    """What the run folder's TensorBoard curves (the hook train-epochs calls after each epoch)
    add to a seed-scale epoch: train_model without and with them, in turns."""
    import loops
    import torch

    tf = trainflow_internals()
    cpu = torch.device("cpu")
    p = loops.prepare(loops.SEED_SCALE, cpu)
    ms: dict[str, list[float]] = {"none": [], "curves": []}
    n = int(epochs)
    with tempfile.TemporaryDirectory() as folder:
        hooks = {"none": None, "curves": tf.Curves(Path(folder), [], [])}
        for round_ in range(6):  # the first round warms each up and is not counted
            for name, hook in hooks.items():
                start = time.perf_counter()
                tf.train_model(p.initial, p.loaders, "sgd", 0.1, 0.0, 0.0, "mse", n, cpu, hook)
                if round_:
                    ms[name].append((time.perf_counter() - start) / n * 1e3)
        hooks["curves"].close()
    return {name: statistics.median(values) for name, values in ms.items()}


def child_requests(cache_dir: str) -> dict[str, Any]:
    """A cached default run in this process: the API requests it waits for, and their time."""
    import threading

    import httpx

    tf = trainflow_internals()
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
    assert tf.train_main(argv) == 0  # fills the cache
    httpx.Client.send = timed_send  # type: ignore[method-assign]
    start = time.perf_counter()
    assert tf.train_main(argv) == 0
    resources = sorted({path.split("/")[2] for path, _ in waited})  # /api/<resource>/…
    return {
        "seconds": time.perf_counter() - start,
        "requests": len(waited),
        "request_seconds": sum(t for _, t in waited),
        "paths": resources,
    }


CHILDREN: dict[str, Callable[..., dict[str, Any]]] = {
    "curves": child_curves,
    "requests": child_requests,
    "loop": child_loop,
    "checkpoint": child_checkpoint,
    "flow": child_flow,
    "load": child_load,
    "numpy-load": child_numpy_load,
    "digest": child_digest,
}


# --- the parent: orchestration and the table ----------------------------------------------


@dataclass
class Row:
    claim: str
    measured: str
    goal: str = ""  # none: information
    met: bool | None = None
    load: str = ""


class Table:
    """The rows, each section's with the load before and after it."""

    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.commands: list[str] = []

    def section(self, run: Callable[[], Any]) -> Any:
        first, before = len(self.rows), machine.load()
        out = run()
        span = machine.span(before, machine.load())
        for row in self.rows[first:]:
            row.load = row.load or span
        return out

    def add(self, claim: str, measured: str, goal: str = "", met: bool | None = None) -> None:
        self.rows.append(Row(claim, measured, goal, met))

    def print(self, repeat: int) -> None:
        header = ("claim", f"measured: median (min–max) of {repeat}", "goal", "met?", "load")
        cells = [header] + [
            (r.claim, r.measured, r.goal or "—", _met(r.met), r.load) for r in self.rows
        ]
        widths = [max(len(c[i]) for c in cells) for i in range(5)]
        print()
        for i, row in enumerate(cells):
            print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
            if i == 0:
                print("  ".join("-" * w for w in widths))
        if self.commands:
            print("\ncommands:")
            for command in self.commands:
                print(f"  {command}")


def _met(met: bool | None) -> str:
    return "info" if met is None else "yes" if met else "NO"


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
    scale = 1e9 if unit.startswith("GB") else 1
    return (
        f"{stat['median'] / scale:.3f} {unit} ({stat['min'] / scale:.3f}–{stat['max'] / scale:.3f})"
    )


class Server:
    """The sections' Prefect server, started and stopped by the `trainflow server` command in
    the benchmark's own PREFECT_HOME."""

    def __init__(self, home: Path):
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
        self.env = {**env, "PREFECT_HOME": str(home)}
        start = subprocess.run(
            [*TRAINFLOW, "server", "start"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        if start.returncode != 0:
            raise RuntimeError(f"the Prefect server did not start:\n{start.stderr}")
        self.env["PREFECT_API_URL"] = start.stdout.strip().splitlines()[-1] + "/api"

    def stop(self) -> None:
        subprocess.run([*TRAINFLOW, "server", "stop"], env=self.env, timeout=120)


def bench_loop(env: dict[str, str], table: Table, scales: list[str], device: str) -> dict[str, Any]:
    """Loop parity, one child process per scale: trainflow / bare, and / the seed's loop."""
    out: dict[str, Any] = {}
    for scale in scales:
        r = out[scale] = spawn(env, "loop", scale, device)
        load = machine.span(r["load_before"], r["load_after"])
        rate, t = r["steps_per_s"], r["trainflow_over_bare"]
        epoch_us = r["overhead_per_epoch_s"] * 1e6
        table.add(
            f"loop {scale}: trainflow / bare torch loop, steps/s",
            f"{t['median']:.3f}× ({t['min']:.3f}–{t['max']:.3f}): "
            f"{rate['trainflow']['median']:,.0f} vs {rate['bare']['median']:,.0f} steps/s, "
            f"{epoch_us:+,.0f} µs an epoch",
            f"≥ {r['goal']}×",
            None if r["busy"] else r["met"],  # a busy machine: no verdict
        )
        table.rows[-1].load = load
        table.add(
            f"loop {scale}: same final weights as bare",
            f"{r['same_weights_as_bare']}; losses ≤ {r['loss_gap_to_bare']:.1e} apart (relative)",
        )
        table.rows[-1].load = load
        for info in r["information"]:
            s, loop, reference = info["ratio"], info["loop"], info["reference"]
            table.add(
                f"loop {scale}: {loop} / {reference}, steps/s ({info['about']})",
                f"{s['median']:.3f}× ({s['min']:.3f}–{s['max']:.3f}): "
                f"{rate[loop]['median']:,.0f} vs {rate[reference]['median']:,.0f} steps/s",
            )
            table.rows[-1].load = load
        where = (
            f"{r['describe']}; {r['rounds']} rounds of {r['epochs']:,} epochs "
            f"({r['steps']:,} steps)"
        )
        table.commands.append(
            f"loop {scale}: python benchmarks/loops.py --scale {scale}"
            f"   [{where}, {r['device']}, {r['threads']} torch threads]"
        )
    return out


def bench_cache(env: dict[str, str], repeat: int, table: Table) -> dict[str, Any]:
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
    table.add("cache: cold flow, 2,000 epochs", fmt(out["cold_flow"]))
    table.add(
        "cache: re-run of it, flow time",
        fmt(out["cached_flow"]),
        "≤ 3 s",
        out["cached_flow"]["median"] <= 3,
    )
    # Information: the ratio follows the cold run's length, not the cache.
    table.add("cache: re-run / cold", f"{out['cached_over_cold']:.2f}×")
    table.add(
        "cache: re-run's stages",
        f"all cached: {all_cached}, epochs trained: {out['cached_epochs_trained']}",
        "all cached, 0 trained",
        all_cached and out["cached_epochs_trained"] == 0,
    )
    return out


def bench_data(env: dict[str, str], repeat: int, table: Table, gigabytes: float) -> dict[str, Any]:
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
    cold_rss, hit_rss = out["cold_rss_over_data"]["median"], out["hit_rss_over_data"]["median"]
    touched = out["hit_touched_rss_over_data"]["median"]
    table.add(f"data: file, {size / 1e9:.2f} GB .npz", f"x {n:,}×10, y {n:,}×1 float32")
    table.add(
        "data: content hash",
        fmt(out["hash_gb_per_s"], "GB/s"),
        "≥ 1 GB/s",
        out["hash_gb_per_s"]["median"] >= 1e9,
    )
    table.add(
        "data: numpy.load",
        fmt(out["numpy_load"]) + f", peak RSS {out['numpy_rss_over_data']['median']:.2f}× data",
    )
    table.add(
        "data: load-tensors cold, peak RSS",
        f"{cold_rss:.2f}× data, in " + fmt(out["cold"]),
        "≤ 2×",
        cold_rss <= 2,
    )
    table.add(
        "data: load-tensors cached",
        fmt(out["hit"]) + f" {sorted(set(out['hit_states']))}",
        "≤ 0.3 s",
        out["hit"]["median"] <= 0.3,
    )
    table.add(
        "data: cached, peak RSS once every byte is read",
        f"{touched:.2f}× data ({hit_rss:.2f}× mapped, unread)",
        "≤ 1.2×",
        touched <= 1.2,
    )
    return out


def bench_checkpoint(env: dict[str, str], repeat: int, table: Table) -> dict[str, Any]:
    """What checkpointing costs training: none vs the default 30 s cadence vs every second."""
    out: dict[str, Any] = {}
    for label, every in (("none", "0"), ("default", "30"), ("every_1s", "1")):
        runs = [spawn(env, "checkpoint", every, f"ckpt-{label}-{i}") for i in range(repeat)]
        out[label] = median([r["seconds"] for r in runs])
        out[f"{label}_saved"] = runs[-1]["saved"]
    base = out["none"]["median"]
    for label in ("default", "every_1s"):
        out[f"{label}_overhead"] = out[label]["median"] / base - 1
    _, rows, features, _, hidden, batch, _, epochs = CHECKPOINT_SCALE
    shape = f"{rows:,}×{features}, MLP {'-'.join(map(str, hidden))}, batch {batch}"
    table.add(f"checkpoint: training, none ({shape}, {epochs} epochs)", fmt(out["none"]))
    table.add(
        "checkpoint: default cadence (30 s and the end), overhead",
        f"{out['default_overhead']:+.1%}, {out['default_saved']} saved, " + fmt(out["default"]),
        "< 5%",
        out["default_overhead"] < 0.05,
    )
    table.add(
        "checkpoint: every 1 s, overhead",
        f"{out['every_1s_overhead']:+.1%}, {out['every_1s_saved']} saved, " + fmt(out["every_1s"]),
    )
    return out


def bench_overhead(env: dict[str, str], repeat: int, table: Table) -> dict[str, Any]:
    """Prefect's share of a cached run, and the TensorBoard curves' of an epoch."""
    runs = [spawn(env, "requests", f"cache-requests-{i}") for i in range(repeat)]
    curves = spawn(env, "curves", "1000")
    out = {
        "flow": median([r["seconds"] for r in runs]),
        "requests": runs[-1]["requests"],
        "paths": runs[-1]["paths"],
        "request_seconds": median([r["request_seconds"] for r in runs]),
        "curves_ms_per_epoch": curves,
    }
    table.add("overhead: cached run, main() in a warm process", fmt(out["flow"]))
    table.add(
        "overhead: API requests it waits for",
        f"{out['requests']} ({', '.join(out['paths'])}): {fmt(out['request_seconds'])}",
    )
    table.add(
        "overhead: TensorBoard curves, per seed-scale epoch",
        f"{curves['curves'] - curves['none']:+.3f} ms "
        f"({curves['none']:.3f} → {curves['curves']:.3f} ms an epoch)",
    )
    return out


# --- whole processes, as a user runs them --------------------------------------------------

IMPORT_TORCH, IMPORT_TORCH_PREFECT = "import torch", "import torch, prefect"


def _user_env(home: Path, cwd: Path) -> dict[str, str]:
    """A user's shell: no PREFECT_API_URL (the CLI finds or starts its server), their own
    PREFECT_HOME, bytecode cached as usual."""
    drop = {"PREFECT_API_URL", "PYTHONDONTWRITEBYTECODE"}
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
    env = {**os.environ, "PREFECT_HOME": str(home)}
    subprocess.run(
        [*TRAINFLOW, "server", "stop"], env=env, check=True, capture_output=True, timeout=120
    )


def _shown(script: Path, *args: str) -> str:
    return " ".join(["python", str(script.relative_to(REPO)), *args])


def bench_e2e(scratch: Path, repeat: int, table: Table) -> dict[str, Any]:
    """`python flows/train_flow.py` against the seed script, whole processes, interleaved.

    No server is prepared: each new PREFECT_HOME's first run starts the one later runs use,
    exactly as for a user. The first runs use a new home each time; the rest the last one's
    server.
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
            # A new clone: a new PREFECT_HOME and folder, so a server start and a cold cache.
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

    def timing(label: str, key: str) -> None:
        wall, cpu = out[key], out["cpu"][key]
        table.add(label, f"{fmt(wall)}, CPU {cpu['median']:.2f} s")

    def versus(label: str, key: str, seed: str, goal: str = "") -> None:
        ratio = out[key]["median"] / out[seed]["median"]
        cpu = out["cpu"][key]["median"] / out["cpu"][seed]["median"]
        met = ratio <= 1.0 if goal else None
        measured = (
            f"{ratio:.2f}× ({out[key]['median']:.2f} s vs {out[seed]['median']:.2f} s; "
            f"CPU {cpu:.2f}×)"
        )
        table.add(label, measured, goal, met)

    versus(
        "e2e: trainflow, every stage cached / seed script, 200 epochs",
        "cached",
        "seed_200",
        "≤ 1.0×",
    )
    versus(
        "e2e: trainflow cold, 2,000 epochs / seed script, 2,000 epochs",
        "cold_2000",
        "seed_2000",
        "≤ 1.0×",
    )
    timing("e2e: seed script, 200 epochs", "seed_200")
    timing("e2e: trainflow, every stage cached", "cached")
    versus("e2e: the same, heartbeats on / seed script", "cached_heartbeats", "seed_200")
    versus("e2e: first run in a new PREFECT_HOME / seed script", "first_run", "seed_200")
    timing("e2e: seed script, 2,000 epochs", "seed_2000")
    timing("e2e: trainflow cold, 2,000 epochs", "cold_2000")
    timing("e2e: seed script, 12,000 epochs", "seed_12000")
    timing("e2e: trainflow cold, 12,000 epochs", "cold_12000")
    seed, ours = out["seed_per_epoch"], out["cold_per_epoch"]
    cpu_seed, cpu_ours = out["cpu"]["seed_per_epoch"], out["cpu"]["cold_per_epoch"]
    table.add(
        "e2e: an epoch, 12,000- minus 2,000-epoch runs: seed → trainflow",
        f"{fmt(seed, 'ms')} → {fmt(ours, 'ms')} (CPU {cpu_seed['median']:.3f} → "
        f"{cpu_ours['median']:.3f} ms)",
    )
    timing("e2e: imports, torch", "import_torch")
    timing("e2e: imports, torch and prefect", "import_torch_prefect")
    table.commands += [
        "e2e, in turns, in a new folder:",
        "  " + _shown(SEED),
        "  " + _shown(FLOW) + "   [the first in a new PREFECT_HOME: it starts the server]",
        "  PREFECT_FLOWS_HEARTBEAT_FREQUENCY=180 " + _shown(FLOW),
        "  " + _shown(SEED, "--epochs", "N") + "   [N: 2000, 12000]",
        "  " + _shown(FLOW, "--epochs", "N", "--cache-dir", "cold-N-I") + "   [a new cache each]",
        f'  python -c "{IMPORT_TORCH}"',
        f'  python -c "{IMPORT_TORCH_PREFECT}"',
    ]
    return out


SECTIONS = ("e2e", "loop", "overhead", "cache", "checkpoint", "data")
NEEDS_SERVER = ("overhead", "cache", "checkpoint", "data")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated")
    parser.add_argument("--repeat", type=int, default=3, help="runs (loop: rounds) per measurement")
    parser.add_argument("--scale", choices=("seed", "mlp", "both"), default="both", help="loop")
    parser.add_argument("--device", default="cpu", help="device of the loop section")
    parser.add_argument(
        "--data-gb", type=float, default=1.0, help="size of the data section's file"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        print(json.dumps(CHILDREN[kind](*rest)))
        return 0

    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if unknown := set(sections) - set(SECTIONS):
        parser.error(f"unknown sections: {', '.join(sorted(unknown))} (from {', '.join(SECTIONS)})")
    scales = ["seed", "mlp"] if args.scale == "both" else [args.scale]
    table = Table()
    results: dict[str, Any] = {"repeat": args.repeat, "cpus": machine.cpus()}
    with tempfile.TemporaryDirectory(prefix="trainflow-bench-") as scratch:
        env = {**os.environ, "BENCH_CWD": scratch}
        if "e2e" in sections:  # first, and with no other server up: as a user has it
            e2e = Path(scratch) / "e2e"
            results["e2e"] = table.section(lambda: bench_e2e(e2e, args.repeat, table))
        if "loop" in sections:
            results["loop"] = table.section(lambda: bench_loop(env, table, scales, args.device))
        if set(sections) & set(NEEDS_SERVER):
            server = Server(Path(scratch) / "prefect")
            env = {**server.env, "BENCH_CWD": scratch}
            benches: dict[str, Callable[[], Any]] = {
                "overhead": lambda: bench_overhead(env, args.repeat, table),
                "cache": lambda: bench_cache(env, args.repeat, table),
                "checkpoint": lambda: bench_checkpoint(env, args.repeat, table),
                "data": lambda: bench_data(env, args.repeat, table, args.data_gb),
            }
            try:
                for name in NEEDS_SERVER:
                    if name in sections:
                        results[name] = table.section(benches[name])
            finally:
                server.stop()
    table.print(args.repeat)
    if args.json:
        results["table"] = [asdict(row) for row in table.rows]
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
