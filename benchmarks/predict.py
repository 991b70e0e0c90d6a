"""Batch prediction: rows/s of `python flows/predict_flow.py` against a bare torch.export loop.

    python benchmarks/predict.py [--rows 1000000] [--repeat 3]

Both are whole processes over the same CSV file, as a user runs them, interleaved round after
round (so a busy machine slows each alike): the bare loop is what a user would write without
trainflow — `np.loadtxt`, `torch.export.load(...).module()` over 65,536-row batches,
`np.savetxt` — and predict is the flow, cold (`--no-cache`) and with its score cached. The model
is trained once first, on a 1,000-row sample of the same columns. Each command's peak RSS (its
own process, from wait4) shows what streaming saves: predict holds a block of rows, the outputs
and the targets, never the whole table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FEATURES = ("a", "b", "c", "d")

BARE_LOOP = """
import sys, numpy as np, torch
model, data, out = sys.argv[1:]
table = np.loadtxt(data, delimiter=",", skiprows=1, dtype=np.float32, ndmin=2, usecols=range(4))
program = torch.export.load(model).module()
x = torch.from_numpy(table)
with torch.no_grad():
    y = torch.cat([program(x[i : i + 65536]) for i in range(0, len(x), 65536)])
rows = np.column_stack([np.arange(len(x)), y[:, 0].double().numpy()])
np.savetxt(out, rows, fmt=["%d", "%.17g"], delimiter=",", header="row,prediction", comments="")
"""


def write_table(path: Path, rows: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, len(FEATURES))).astype(np.float32)
    y = x @ np.arange(1, len(FEATURES) + 1, dtype=np.float32) + 1
    import pyarrow as pa
    import pyarrow.csv as pa_csv

    # Arrow's writer (float32 as their shortest text): np.savetxt takes minutes at 10⁷ rows.
    columns = {name: x[:, i] for i, name in enumerate(FEATURES)} | {"y": y}
    options = pa_csv.WriteOptions(quoting_header="none")
    pa_csv.write_csv(pa.table(columns), str(path), write_options=options)


PEAK_RSS_MB: dict[str, list[float]] = {}  # per command label, each run's peak


def timed(command: list[str], cwd: Path, label: str = "") -> float:
    """Wall seconds of a whole process; its peak RSS (its own, by wait4) goes to PEAK_RSS_MB."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - start
        if process.returncode != 0:
            log.seek(0)
            tail = log.read().decode(errors="replace")[-3000:]
            raise SystemExit(f"failed: {' '.join(command)}\n{tail}")
    PEAK_RSS_MB.setdefault(label, []).append(usage.ru_maxrss / 1024)  # Linux: KiB
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    python = sys.executable
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        write_table(root / "train.csv", 1000, seed=0)
        big = root / "big.csv"
        write_table(big, args.rows, seed=1)
        size_mb = big.stat().st_size / 1e6
        train = [
            python,
            str(REPO / "flows" / "train_flow.py"),
            "--data",
            str(root / "train.csv"),
            "--epochs",
            "5",
            "--runs-dir",
            str(root / "runs"),
            "--run-name",
            "model",
        ]
        timed(train, root)
        model = root / "runs" / "model"
        predict = [
            python,
            str(REPO / "flows" / "predict_flow.py"),
            "--model",
            str(model),
            "--data",
            str(big),
            "--out",
            str(root / "p.csv"),
        ]
        bare = [python, "-c", BARE_LOOP, str(model / "model.pt2"), str(big), str(root / "b.csv")]
        timed(predict, root)  # fills the score cache (and starts a server if the CLI needs one)
        times: dict[str, list[float]] = {"bare": [], "cold": [], "cached": []}
        for _ in range(args.repeat):
            times["bare"].append(timed(bare, root, "bare"))
            times["cold"].append(timed([*predict, "--no-cache"], root, "cold"))
            times["cached"].append(timed(predict, root, "cached"))
    bare_s = statistics.median(times["bare"])
    print(
        f"batch prediction, {args.rows:,} rows x {len(FEATURES)} features ({size_mb:.0f} MB CSV), "
        f"whole processes, median of {args.repeat}, {os.cpu_count()} cores"
    )
    print(
        f"{'command':<28} {'seconds (min-max)':>20} {'rows/s':>12} {'vs bare loop':>13} "
        f"{'peak RSS MB':>12}"
    )
    labels = {
        "bare": "bare torch.export loop",
        "cold": "predict, --no-cache",
        "cached": "predict, score cached",
    }
    for kind, values in times.items():
        median = statistics.median(values)
        spread = f"{median:.2f} ({min(values):.2f}-{max(values):.2f})"
        print(
            f"{labels[kind]:<28} {spread:>20} {args.rows / median:>12,.0f} "
            f"{bare_s / median:>12.2f}x {max(PEAK_RSS_MB[kind]):>12,.0f}"
        )
    print(
        "\nbare loop: python -c <BARE_LOOP> model.pt2 big.csv out.csv\n"
        f"predict: {' '.join(predict[1:])}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
