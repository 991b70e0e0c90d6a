"""GPU checks, run by benchmarks/gpu.sh on a CUDA machine: no host sync per step, loop parity
on CUDA (benchmarks/loops.py), bit-identical resume and retry on CUDA, and one whole flow run with
--device cuda.

    python benchmarks/gpu_check.py --out results/   # prints a report, writes gpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import loops  # noqa: E402

# trainflow's internals: this file's only import of them.
from trainflow.tasks.data.batches import make_loaders  # noqa: E402
from trainflow.tasks.data.splits import split_indices  # noqa: E402
from trainflow.tasks.data.tensors import Dataset  # noqa: E402
from trainflow.tasks.engine.checkpoint import Checkpoints, decode  # noqa: E402
from trainflow.tasks.engine.fit import train_model  # noqa: E402
from trainflow.tasks.engine.models import ModelSpec, initial_model  # noqa: E402

# --cpu-dry-run walks every check on the CPU at toy sizes, to test this script without a GPU.
DRY = "--cpu-dry-run" in sys.argv
CUDA = torch.device("cpu" if DRY else "cuda")


def _line_data(rows: int) -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(rows, 1, generator=g)
    return Dataset(x, 1 + 2 * x + 0.1 * torch.randn(rows, 1, generator=g), ("x",), ("y",))


def syncs_per_epoch(batches_per_epoch: int, epochs: int = 4) -> float:
    """Host syncs during training, counted by CUDA's sync debug mode, per epoch."""
    rows = batches_per_epoch * 16 * 5 // 4  # 80% train at batch 16
    data = _line_data(rows)
    loaders = make_loaders(data, split_indices(rows, 0.2, 13), 16, 42, "tensor", 0, CUDA)
    initial = initial_model(ModelSpec("linear", 1, 1), 42)
    train_model(initial, loaders, "sgd", 0.1, 0.0, 0.0, "mse", 1, CUDA)  # warm-up
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train_model(initial, loaders, "sgd", 0.1, 0.0, 0.0, "mse", epochs, CUDA)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    return len(syncs) / epochs


def loop_benchmark(rounds: int = 3) -> dict:
    """Loop parity on CUDA (benchmarks/loops.py): trainflow / bare at both scales."""
    mlp = dataclasses.replace(loops.MLP_SCALE, rows=20_000) if DRY else loops.MLP_SCALE
    seed = dataclasses.replace(loops.SEED_SCALE, epochs=30) if DRY else loops.SEED_SCALE
    return {scale.name: loops.parity(scale, CUDA, rounds) for scale in (seed, mlp)}


def resume_is_bit_identical() -> bool:
    data = _line_data(4000)
    parts = split_indices(4000, 0.2, 13)
    initial = initial_model(ModelSpec("mlp", 1, 1, (32, 32)), 42)

    def train(**kwargs):
        loaders = make_loaders(data, parts, 16, 42, "tensor", 0, CUDA)
        return train_model(initial, loaders, "adam", 0.01, 0.0, 0.0, "mse", 6, CUDA, **kwargs)

    reference = train()
    with tempfile.TemporaryDirectory() as folder:
        train(checkpoints=Checkpoints(folder, every_seconds=0.05, keep=10**6))
        resumes = sorted(Path(folder).iterdir())[1::7]
        for path in resumes:
            resumed = train(resume=decode(path.read_bytes()))
            same = resumed.train_loss == reference.train_loss and all(
                torch.equal(v, reference.state[k]) for k, v in resumed.state.items()
            )
            if not same:
                print(f"  resume from {path.name}: NOT identical")
                return False
        print(f"  {len(resumes)} resumes (mid-epoch and epoch ends) all bit-identical")
    return True


def retry_is_bit_identical() -> bool:
    """A failed attempt, then a retry given the same Loaders (CUDA tensors and all), trains the
    uninterrupted run; and training hands the CUDA RNG back as it found it."""
    data, parts = _line_data(4000), split_indices(4000, 0.2, 13)
    initial = initial_model(ModelSpec("mlp", 1, 1, (32, 32)), 42)
    loaders = make_loaders(data, parts, 16, 42, "tensor", 0, CUDA)

    def train():
        return train_model(initial, loaders, "sgd", 0.05, 0.0, 0.0, "mse", 4, CUDA)

    reference = train()
    real, calls = torch.Tensor.backward, [0]

    def fail_once(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 317:
            raise RuntimeError("injected")
        return real(self, *args, **kwargs)

    torch.Tensor.backward = fail_once
    try:
        train()
    except RuntimeError:
        pass
    finally:
        torch.Tensor.backward = real
    rng = torch.cuda.get_rng_state(CUDA) if CUDA.type == "cuda" else torch.get_rng_state()
    retried = train()
    after = torch.cuda.get_rng_state(CUDA) if CUDA.type == "cuda" else torch.get_rng_state()
    same = retried.train_loss == reference.train_loss and all(
        torch.equal(v, reference.state[k]) for k, v in retried.state.items()
    )
    print(
        f"  retry after a fault at step 317 bit-identical: {same}; "
        f"RNG left as it was: {torch.equal(rng, after)}"
    )
    return same and torch.equal(rng, after)


def whole_flow(out: Path) -> dict:
    runs, cache = out / "runs", Path(tempfile.mkdtemp()) / "cache"
    command = [
        sys.executable,
        str(HERE.parent / "flows" / "train_flow.py"),
        "--device",
        CUDA.type,
        "--epochs",
        "300",
        "--runs-dir",
        str(runs),
        "--run-name",
        "cuda",
        "--cache-dir",
        str(cache),
    ]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=400)
    seconds = time.perf_counter() - start
    (out / "flow.log").write_text(result.stdout + result.stderr)
    metrics = {}
    if result.returncode == 0:
        metrics = json.loads((runs / "cuda" / "metrics.json").read_text())
    return {
        "returncode": result.returncode,
        "seconds": seconds,
        "final_val_loss": metrics.get("final_val_loss"),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("gpu-results"))
    parser.add_argument("--cpu-dry-run", action="store_true", help="test this script on a CPU")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    assert DRY or torch.cuda.is_available(), "no CUDA device"
    name = "cpu (dry run)" if DRY else torch.cuda.get_device_name()
    report: dict = {"device": name, "torch": torch.__version__}
    print(f"{report['device']}, torch {report['torch']}")

    report["syncs_per_epoch"] = (
        {n: 0.0 for n in (5, 50, 500)} if DRY else {n: syncs_per_epoch(n) for n in (5, 50, 500)}
    )
    print(f"host syncs per epoch at 5 / 50 / 500 batches per epoch: {report['syncs_per_epoch']}")
    # A per-step sync would show as ≥ 1 more per epoch for every batch; a few per epoch is the
    # designed cost (the epoch's loss read-out, the shuffle order's copy to the device).
    counts = report["syncs_per_epoch"].values()
    flat = max(counts) <= 3 and max(counts) - min(counts) < 1
    print(f"  no per-step sync: {flat} (the count does not grow with the number of steps)")

    report["loop"] = loop_benchmark()
    for r in report["loop"].values():
        print(loops.report(r))
    # Where the engine stands on CUDA: information, the goal is the CPU's (benchmarks/run.py).
    report["loop_parity_met"] = all(r["met"] for r in report["loop"].values())

    report["resume_bit_identical"] = resume_is_bit_identical()
    report["retry_bit_identical"] = retry_is_bit_identical()
    report["flow"] = whole_flow(args.out)
    print(
        f"whole flow with --device cuda (300 epochs): rc {report['flow']['returncode']}, "
        f"{report['flow']['seconds']:.1f} s, final val loss {report['flow']['final_val_loss']}"
    )
    (args.out / "gpu.json").write_text(json.dumps(report, indent=2))
    ok = (
        flat
        and report["resume_bit_identical"]
        and report["retry_bit_identical"]
        and report["flow"]["returncode"] == 0
    )
    print("ALL GPU CHECKS PASSED" if ok else "SOME GPU CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    sys.exit(main())
