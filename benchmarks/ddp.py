"""train-epochs' DDP path against one process: the large case (10⁶ rows × 32 features, MLP
64-64, global batch 256, SGD) at nproc 1 and nproc 2, one torch thread per process.

    python benchmarks/ddp.py [--rows 1000000] [--epochs 1] [--device cpu] [--launcher-at-1]

prints global steps/s side by side and the scaling efficiency (speed-up / processes). The
batch is global, so 2 ranks take 128 rows a step each: ideal is twice the steps/s. Both rows
time train_model alone (the ranks' start-up, about a process group's and an import's seconds,
is reported apart). `--launcher-at-1` adds nproc 1 under the launcher (DDP over a world of
one: gloo on the CPU, nccl on CUDA), which is what benchmarks/gpu.sh runs on a GPU machine.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
from loops import MLP_SCALE, Scale, make_data

# trainflow's internals: this file's only import of them.
from trainflow.tasks.data.batches import make_loaders
from trainflow.tasks.data.splits import split_indices
from trainflow.tasks.engine.fit import train_model
from trainflow.tasks.engine.launch import Job, run_ranks
from trainflow.tasks.engine.models import ModelSpec, initial_model
from trainflow.tasks.engine.options import Launch


def one_process(scale: Scale, device: torch.device, inputs: dict) -> float:
    start = time.perf_counter()
    train_model(**inputs, epochs=scale.epochs, device=device)
    return time.perf_counter() - start


def on_ranks(scale: Scale, device: str, inputs: dict, nproc: int) -> tuple[float, float]:
    """(seconds in train_model on rank 0, seconds from the launch to the result)."""
    with tempfile.TemporaryDirectory() as run_dir:
        job = Job(inputs, scale.epochs, device, None, None, run_dir, "", 1, 600.0)
        start = time.perf_counter()
        reports = run_ranks(Launch(nproc=nproc), job, lambda line: None)
        return reports[0].train_seconds, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=MLP_SCALE.rows)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--launcher-at-1", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one thread per process, as each rank gets
    os.environ["OMP_NUM_THREADS"] = "1"  # the ranks inherit it
    scale = Scale("ddp", args.rows, 32, "mlp", (64, 64), 256, 0.01, args.epochs)
    device = torch.device(args.device)
    data, parts = make_data(scale), split_indices(scale.rows, 0.2, 13)
    # The ranks put their chunks on their own device: the loaders stay on the CPU for them.
    cpu_loaders = make_loaders(data, parts, scale.batch_size, 42, "tensor", 0, torch.device("cpu"))
    initial = initial_model(ModelSpec(scale.model, scale.features, 1, scale.hidden), 42)
    inputs = {
        "initial": initial,
        "loaders": cpu_loaders,
        "optimizer": "sgd",
        "lr": scale.lr,
        "momentum": 0.0,
        "weight_decay": 0.0,
        "loss": "mse",
    }
    steps = -(-len(parts.train) // scale.batch_size) * scale.epochs
    local = {**inputs, "loaders": make_loaders(data, parts, 256, 42, "tensor", 0, device)}
    rows = [("nproc 1, in process", one_process(scale, device, local), None)]
    if args.launcher_at_1:
        rows.append(("nproc 1, launcher (DDP)", *on_ranks(scale, args.device, inputs, 1)))
    if device.type == "cpu" or torch.cuda.device_count() >= 2:
        rows.append(("nproc 2, launcher (DDP)", *on_ranks(scale, args.device, inputs, 2)))
    base = steps / rows[0][1]
    print(f"{scale.rows:,} rows x 32, MLP 64-64, batch 256 (global), {steps} steps, {device}")
    print(f"{'':26} {'steps/s':>9} {'speed-up':>9} {'efficiency':>10} {'launch+start s':>15}")
    for name, seconds, total in rows:
        rate = steps / seconds
        nproc = 2 if name.startswith("nproc 2") else 1
        overhead = "" if total is None else f"{total - seconds:15.1f}"
        print(f"{name:26} {rate:9.0f} {rate / base:9.2f} {rate / base / nproc:10.0%} {overhead}")


if __name__ == "__main__":
    main()
