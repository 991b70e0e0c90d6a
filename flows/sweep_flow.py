"""Hyperparameter sweeps: one `train` flow run per point of a grid, run concurrently.

python flows/sweep_flow.py --grid lr=0.01,0.1,0.3 --grid batch_size=16,32 --epochs 50
python flows/sweep_flow.py --grid lr=0.01,0.03,0.1,0.3 --random 2 --seed 7 --runner dask
"""

import itertools
import os
import random
import re
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import torch
from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import ValidationError

from trainflow.flows.cli import build_parser, describe
from trainflow.flows.config import RUN_NAME, TrainConfig
from trainflow.flows.session.runtime import command_line_run, run_url
from trainflow.flows.session.server import ServerError
from trainflow.flows.train_flow import train_flow
from trainflow.tasks.errors import InputError, quiet_input_errors
from trainflow.tasks.files import write_json

Runner = Literal["threads", "dask", "ray"]
TABLE_COLUMNS = ("rank", "run_name", "status", "final_val_loss", "final_train_loss", "error")


def parse_grid(specs: list[str]) -> dict[str, list[str]]:
    """`lr=0.01,0.1` → {"lr": ["0.01", "0.1"]}; for list fields, `;` separates the values:
    `hidden=8;16,16` → {"hidden": ["8", "16,16"]}."""
    grid: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, values = spec.partition("=")
        field = name.strip().replace("-", "_")
        if not sep or field not in TrainConfig.model_fields:
            raise InputError(f"--grid {spec!r}: expected FIELD=V1,V2,… with a TrainConfig field")
        if field in ("runs_dir", "run_name", "cache_dir"):
            raise InputError(f"--grid {spec!r}: {field} is set by the sweep itself")
        parts = values.split(";" if ";" in values else ",")
        grid[field] = [v.strip() for v in parts if v.strip()]
        if not grid[field]:
            raise InputError(f"--grid {spec!r}: no values")
    return grid


def plan_points(grid: dict[str, list[str]], sample: int | None, seed: int) -> list[dict[str, str]]:
    """Every point of the grid, or a seeded random sample of them, in a stable order."""
    points = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    if sample is not None and sample < len(points):
        points = sorted(random.Random(seed).sample(points, sample), key=points.index)
    return points


def trial_name(index: int, point: dict[str, str]) -> str:
    label = "-".join(f"{k}{v}" for k, v in point.items())
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in label)[:100]
    return f"trial-{index:03d}-{safe}" if safe else f"trial-{index:03d}"


def trial_configs(
    base: TrainConfig, points: list[dict[str, str]], sweep_dir: Path
) -> list[TrainConfig]:
    configs = []
    for index, point in enumerate(points):
        values = {
            **base.model_dump(),
            **point,
            "runs_dir": str(sweep_dir),
            "run_name": trial_name(index, point),
        }
        try:
            configs.append(TrainConfig(**values))
        except ValidationError as exc:
            raise InputError(f"--grid point {point}: {describe(exc)}") from None
    return configs


def torch_threads_per_trial(concurrency: int) -> int:
    """Trials side by side must not oversubscribe the cores between them."""
    return max(1, (os.cpu_count() or 1) // max(1, concurrency))


@task(name="trial")
def run_trial(config: TrainConfig, torch_threads: int) -> dict[str, Any]:
    """One point: the `train` flow itself, as a subflow. A failure is a row, not a crash."""
    torch.set_num_threads(torch_threads)  # per process: matters on Dask/Ray workers
    row: dict[str, Any] = {"run_name": config.run_name, "run_dir": None}
    try:
        summary = train_flow.with_options(retries=0)(config)
    except Exception as exc:
        return {**row, "status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    states = {s["name"]: s["state"] for s in summary.stages}
    return {
        **row,
        "status": "completed",
        "run_dir": summary.run_dir,
        "final_train_loss": summary.final_train_loss,
        "final_val_loss": summary.final_val_loss,
        "stages": states,
    }


def rank(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Completed trials by final validation loss, then the failed ones."""
    done = sorted(
        (r for r in rows if r["status"] == "completed"), key=lambda r: r["final_val_loss"]
    )
    return [{"rank": i + 1, **r} for i, r in enumerate(done)] + [
        {"rank": None, **r} for r in rows if r["status"] != "completed"
    ]


def task_runner(runner: Runner, max_concurrency: int, address: str | None) -> Any:
    if runner == "threads":
        return ThreadPoolTaskRunner(max_workers=max_concurrency)
    if runner == "dask":
        from prefect_dask import DaskTaskRunner

        if address:
            return DaskTaskRunner(address=address)
        import dask

        # A trial with --nproc > 1 starts its ranks from its worker, which a daemonic process
        # may not do. Not daemonic, a worker still exits with its nanny: Dask watches the pipe.
        dask.config.set({"distributed.worker.daemon": False})
        workers = {"n_workers": max_concurrency, "threads_per_worker": 1, "processes": True}
        return DaskTaskRunner(cluster_kwargs=workers)
    try:
        from prefect_ray import RayTaskRunner
    except ImportError:
        raise InputError("--runner ray needs the ray extra: pip install 'trainflow[ray]'") from None
    return RayTaskRunner(address=address) if address else RayTaskRunner()


def check_sweep_name(name: str | None) -> None:
    """The sweep's folder is made inside --runs-dir from its name: a plain name, as a run's."""
    if name is not None and not re.fullmatch(RUN_NAME, name):
        raise InputError(
            f"--sweep-name {name!r}: must be 1-128 letters, digits, '.', '_' or '-', starting "
            "with a letter or digit (a folder inside --runs-dir)"
        )


@flow(name="sweep")
def sweep_flow(
    base: TrainConfig = TrainConfig(),  # noqa: B008
    grid: dict[str, list[str]] | None = None,
    random_points: int | None = None,
    seed: int = 0,
    max_concurrency: int = 2,
    sweep_name: str | None = None,
) -> list[dict[str, Any]]:
    check_sweep_name(sweep_name)
    name = sweep_name or f"sweep-{datetime.now():%Y%m%d-%H%M%S}"
    sweep_dir = Path(base.runs_dir).absolute() / name
    configs = trial_configs(base, plan_points(grid or {}, random_points, seed), sweep_dir)
    threads = torch_threads_per_trial(max_concurrency)
    torch.set_num_threads(threads)  # threads runner: the trials share this process
    # The first trial runs alone: it fills the cache with the stages every trial shares
    # (data, split, initial weights), so the others find them there instead of racing.
    rows = [run_trial(configs[0], threads)] if configs else []
    futures = [run_trial.submit(config, threads) for config in configs[1:]]
    rows += [future.result() for future in futures]
    ranked = rank(rows)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    record = {"name": name, "grid": grid, "random_points": random_points, "seed": seed}
    write_json(sweep_dir / "sweep.json", {**record, "trials": ranked})
    create_table_artifact(
        key="sweep-ranking",
        description=f"Trials of {name} by final validation loss (tensorboard --logdir {sweep_dir})",
        table=[{k: r.get(k) for k in TABLE_COLUMNS} for r in ranked],
    )
    return ranked


def main(argv: list[str] | None = None, prog: str = "sweep_flow.py") -> int:
    parser = build_parser(TrainConfig, prog, "A sweep over TrainConfig's fields.")
    sweep = parser.add_argument_group("sweep")
    sweep.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="FIELD=V1,V2",
        help="values of one field (repeatable); ';' separates list values",
    )
    sweep.add_argument("--random", type=int, metavar="N", help="a seeded sample of N points")
    sweep.add_argument("--seed", type=int, default=0, help="seed of --random (default: 0)")
    sweep.add_argument("--runner", choices=("threads", "dask", "ray"), default="threads")
    sweep.add_argument("--max-concurrency", type=int, default=2, help="trials at once")
    sweep.add_argument("--dask-address", help="an existing Dask scheduler (default: local)")
    sweep.add_argument("--ray-address", help="an existing Ray cluster (default: local)")
    sweep.add_argument("--sweep-name", help="folder under --runs-dir (default: generated)")
    args = vars(parser.parse_args(argv))
    options = {
        k: args.pop(k)
        for k in (
            "grid",
            "random",
            "seed",
            "runner",
            "max_concurrency",
            "dask_address",
            "ray_address",
            "sweep_name",
        )
    }
    try:
        base = TrainConfig(**args)
        grid = parse_grid(options["grid"])
        if not grid:
            raise InputError("--grid: give at least one FIELD=V1,V2,…")
        if options["max_concurrency"] < 1 or (
            options["random"] is not None and options["random"] < 1
        ):
            raise InputError("--max-concurrency and --random must be at least 1")
        check_sweep_name(options["sweep_name"])
        trial_configs(base, plan_points(grid, options["random"], options["seed"]), Path("."))
    except ValidationError as exc:
        parser.error(describe(exc))
    except InputError as exc:
        parser.error(str(exc))
    address = options["dask_address"] if options["runner"] == "dask" else options["ray_address"]
    runner = task_runner(options["runner"], options["max_concurrency"], address)
    quiet_input_errors()
    try:
        # Inside: the runner's worker processes start with the server's address in their
        # environment, whichever runner it is.
        with command_line_run():
            state = sweep_flow.with_options(task_runner=runner)(
                base,
                grid,
                options["random"],
                options["seed"],
                options["max_concurrency"],
                options["sweep_name"],
                return_state=True,
            )
            url = run_url(state)
            ranked = state.result()
    except ServerError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    for r in ranked:
        loss = f"{r['final_val_loss']:.6f}" if r["status"] == "completed" else r["error"]
        print(f"{r['rank'] or '-':>4}  {r['run_name']:<40} {loss}")
    completed = [r for r in ranked if r["status"] == "completed"]
    if completed:
        print(f"tensorboard --logdir {Path(completed[0]['run_dir']).parent}")
    print(f"Prefect UI: {url}")
    return 0 if completed else 1


if __name__ == "__main__":
    sys.exit(main())
