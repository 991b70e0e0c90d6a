"""Data larger than memory: peak RSS, wall time and conversion speed of one training run on a
generated table of about 4 GB of float32 (README, "Data").

    python benchmarks/bigdata.py                     # 30M rows × 32 features + 1 target
    python benchmarks/bigdata.py --rows 2000000      # smaller, quicker

The table is written as Parquet in row groups (never whole in memory), into a temporary
folder on the disk under --dir, and removed at the end with the run's cache. The run is
`python flows/train_flow.py --data <file> --epochs 1` as a whole process, against a Prefect
server this script starts in its own PREFECT_HOME and stops; its RSS is polled with psutil.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from run import REPO, Server  # benchmarks/run.py: the server, started as the CLI starts it

GROUP_ROWS = 1 << 20


def generate(path: Path, rows: int, features: int, seed: int) -> int:
    """A linear target of `features` standard-normal columns plus noise, group by group."""
    generator = torch.Generator().manual_seed(seed)  # the table's only randomness
    weights = torch.randn(features, generator=generator)
    names = [f"f{i}" for i in range(features)] + ["target"]
    schema = pa.schema([(name, pa.float32()) for name in names])
    with pq.ParquetWriter(path, schema, compression="none") as writer:
        for start in range(0, rows, GROUP_ROWS):
            n = min(GROUP_ROWS, rows - start)
            x = torch.randn(n, features, generator=generator)
            y = x @ weights + 0.1 * torch.randn(n, generator=generator)
            columns = [pa.array(x[:, i].numpy()) for i in range(features)] + [pa.array(y.numpy())]
            writer.write_table(pa.Table.from_arrays(columns, schema=schema))
    return path.stat().st_size


def run_flow(
    args: list[str], env: dict[str, str], log: Path, every_s: float = 0.1
) -> dict[str, float]:
    """The flow as a whole process; its peak RSS by polling (children are not counted: the
    Prefect server is a separate, already running process)."""
    start = time.perf_counter()
    with log.open("w") as out:  # a file, not a pipe: nobody reads a pipe while polling
        child = psutil.Popen(
            [sys.executable, str(REPO / "flows" / "train_flow.py"), *args],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    peak, peak_at = 0, ""
    try:
        while child.poll() is None:
            try:
                rss = child.memory_info().rss
            except psutil.NoSuchProcess:
                break
            if rss > peak:  # when: to read against the run's log lines
                peak, peak_at = rss, time.strftime("%H:%M:%S")
            time.sleep(every_s)
        output = log.read_text()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    if child.returncode != 0:
        raise RuntimeError(f"train_flow.py exited {child.returncode}:\n{output[-4000:]}")
    return {
        "wall_s": time.perf_counter() - start,
        "peak_rss": peak,
        "peak_at": peak_at,
        "output": output,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=30_000_000)
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=65536)
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the table goes")
    parser.add_argument(
        "--table", help="use (or generate and keep) this Parquet file instead of a temporary one"
    )
    parser.add_argument(
        "--in-memory-bytes",
        default="1000000000",
        help="TRAINFLOW_IN_MEMORY_BYTES for the run: fixed, so the path taken does not depend "
        "on what else the machine is doing",
    )
    opts = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="trainflow-bigdata-", dir=opts.dir))
    server = None
    try:
        table = Path(opts.table) if opts.table else work / "table.parquet"
        if not table.exists():
            start = time.perf_counter()
            generate(table, opts.rows, opts.features, seed=0)
            print(f"generated {table} in {time.perf_counter() - start:.0f} s", flush=True)
        size = table.stat().st_size
        opts.rows = pq.read_metadata(table).num_rows
        server = Server(work / "prefect")
        env = {**server.env, "TRAINFLOW_IN_MEMORY_BYTES": opts.in_memory_bytes}
        flags = [
            *("--data", str(table), "--epochs", "1", "--batch-size", str(opts.batch_size)),
            *("--cache-dir", str(work / "cache"), "--runs-dir", str(work / "runs")),
            *("--run-name", "bigdata"),
        ]
        measured = run_flow(flags, env, work / "output.txt")
        stages = json.loads((work / "runs" / "bigdata" / "stages.json").read_text())
        seconds = {s["name"]: s["seconds"] for s in stages}
        float32 = opts.rows * pq.read_metadata(table).num_columns * 4
        result = {
            "rows": opts.rows,
            "parquet_gb": size / 1e9,
            "float32_gb": float32 / 1e9,
            "wall_s": round(measured["wall_s"], 1),
            "peak_rss_gb": round(measured["peak_rss"] / 1e9, 3),
            "peak_at": measured["peak_at"],
            "load_tensors_s": round(seconds["load-tensors"], 1),
            "conversion_mb_s": round(size / 1e6 / seconds["load-tensors"], 1),
            "train_epochs_s": round(seconds["train-epochs"], 1),
            "stage_seconds": seconds,
        }
        print(measured["output"][-6000:])
        print(json.dumps(result, indent=2))
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
