"""CSV readers side by side: pyarrow, pandas (if installed), numpy.loadtxt and trainflow's
load-tensors reader, on one generated file, each run in a fresh process.

    python benchmarks/readers.py                       # 10^6 rows x 17 float columns, 3 rounds
    python benchmarks/readers.py --rows 100000 --rounds 5 --keep /tmp/table.csv

The file is generated into a temporary folder (never committed) unless --keep names it. A
round runs every reader once, in turn, so a machine that gets busier slows all of them alike.
`read s` is the read alone, timed inside the process after its imports; `process s` is the
whole process, interpreter and imports included. The claim is load-tensors' read time over
pyarrow's: at most 1.2x. The machine's load average is printed beside it, before and after
the rounds; take the numbers that count on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.util import find_spec
from pathlib import Path

import machine

READERS = ("pyarrow", "pandas", "numpy", "trainflow")
GOAL = 1.2  # load-tensors' read time over pyarrow's, at most


def child(reader: str, path: str) -> dict[str, float]:
    """Import the reader, then time one read of `path` into memory."""
    if reader == "pyarrow":
        import pyarrow.csv as pv

        start = time.perf_counter()
        rows = pv.read_csv(path).num_rows
    elif reader == "pandas":
        import pandas as pd

        start = time.perf_counter()
        rows = len(pd.read_csv(path))
    elif reader == "numpy":
        import numpy as np

        start = time.perf_counter()
        rows = len(np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float32, ndmin=2))
    else:
        # trainflow's internals: this file's only import of them.
        from trainflow.tasks.data.tensors import load_dataset

        start = time.perf_counter()
        rows = len(load_dataset(path))
    return {"seconds": time.perf_counter() - start, "rows": rows}


def write_table(path: Path, rows: int, columns: int, seed: int = 0) -> None:
    """Random normal floats to 6 significant digits: ~150 MB for 10^6 x 17."""
    import numpy as np

    rng = np.random.default_rng(seed)
    header = ",".join(f"c{i}" for i in range(columns - 1)) + ",y"
    chunk = 100_000
    with path.open("w") as f:
        f.write(header + "\n")
        for start in range(0, rows, chunk):
            block = rng.normal(size=(min(chunk, rows - start), columns))
            np.savetxt(f, block, delimiter=",", fmt="%.6g")


def measure(reader: str, path: Path) -> tuple[float, float]:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", reader, str(path)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    process = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{reader} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["seconds"], process


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--columns", type=int, default=17)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="write (or reuse) the CSV here")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        path = args.keep or Path(scratch) / "table.csv"
        if not path.exists():
            write_table(path, args.rows, args.columns)
        size = path.stat().st_size
        readers = [r for r in READERS if r != "pandas" or find_spec("pandas") is not None]
        times: dict[str, list[tuple[float, float]]] = {r: [] for r in readers}
        before = machine.load()
        for _ in range(args.rounds):
            for reader in readers:
                times[reader].append(measure(reader, path))
        after = machine.load()
        print(f"{path.name}: {args.rows:,} rows x {args.columns} columns, {size / 1e6:,.0f} MB")
        print(f"median of {args.rounds} rounds, each reader in a fresh process")
        print(machine.describe("before", before))
        if "pandas" not in readers:
            print("pandas: not installed, skipped")
        print(f"{'reader':<12}{'read s':>9}{'MB/s':>8}{'process s':>11}{'x pyarrow':>11}")
        base = statistics.median(t for t, _ in times["pyarrow"])
        for reader in readers:
            read = statistics.median(t for t, _ in times[reader])
            process = statistics.median(p for _, p in times[reader])
            print(
                f"{reader:<12}{read:>9.2f}{size / 1e6 / read:>8.0f}{process:>11.2f}"
                f"{read / base:>10.2f}x"
            )
        ratio = statistics.median(t for t, _ in times["trainflow"]) / base
        met = "met" if ratio <= GOAL else "NOT met"
        print(
            f"\nload-tensors / pyarrow, read time: {ratio:.2f}x   goal ≤ {GOAL}x: {met}   "
            f"load {machine.span(before, after)}"
        )
        print(machine.describe("after", after))
    return 0


if __name__ == "__main__":
    sys.exit(main())
