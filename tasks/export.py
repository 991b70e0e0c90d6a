"""export-graph: graph, weights, a torch.export program and metrics into the run folder."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from torch import Tensor, nn
from torch.utils.tensorboard import SummaryWriter

from tasks import rundir
from tasks.model import instantiate
from tasks.rundir import RunDir
from tasks.split import Split
from tasks.train import Trained

MAX_TABLE_ROWS = 200


@dataclass(frozen=True)
class RunSummary:
    run_dir: str
    epochs: int
    final_train_loss: float
    final_val_loss: float


def export_program(model: nn.Module, sample: Tensor) -> torch.export.ExportedProgram:
    """torch.export with a dynamic batch dimension, so the program predicts any number of rows."""
    if sample.shape[0] < 2:
        sample = sample.expand(2, *sample.shape[1:])  # export specialises a batch of 1
    batch = torch.export.Dim("batch", min=1)
    return torch.export.export(model.eval(), (sample,), dynamic_shapes=({0: batch},))


def metrics_record(trained: Trained) -> dict[str, Any]:
    return {
        "epochs": len(trained.train_loss),
        "epochs_trained": trained.epochs_trained,
        "final_train_loss": trained.train_loss[-1],
        "final_val_loss": trained.val_loss[-1],
        "train_loss": trained.train_loss,
        "val_loss": trained.val_loss,
    }


def hparams(config: dict[str, Any]) -> dict[str, Any]:
    """TensorBoard's HPARAMS tab takes scalars and strings only."""
    return {
        key: value if isinstance(value, int | float | str | bool) else str(value)
        for key, value in config.items()
        if value is not None
    }


def write_outputs(trained: Trained, parts: Split, sample: Tensor, run: RunDir) -> RunSummary:
    model = instantiate(trained.spec, trained.state).eval()
    with SummaryWriter(str(run.path)) as writer:
        with warnings.catch_warnings():
            # add_graph traces with torch.jit, which warns it is deprecated; nothing to act on.
            warnings.simplefilter("ignore", DeprecationWarning)
            writer.add_graph(model, sample)
        metrics = metrics_record(trained)
        writer.add_hparams(
            hparams(run.config),
            {
                "final/train_loss": metrics["final_train_loss"],
                "final/val_loss": metrics["final_val_loss"],
            },
            run_name=".",  # same run folder, not a timestamped sub-run
        )
    rundir.write_safetensors(run.path / rundir.MODEL, trained.state)
    program = export_program(model, sample)
    rundir.write_with(run.path / rundir.PROGRAM, lambda f: torch.export.save(program, f))
    rundir.write_safetensors(run.path / rundir.SPLIT, {"train": parts.train, "val": parts.val})
    rundir.write_json(run.path / rundir.METRICS, metrics)
    return RunSummary(
        str(run.path), metrics["epochs"], metrics["final_train_loss"], metrics["final_val_loss"]
    )


def thinned(values: list[float], max_rows: int = MAX_TABLE_ROWS) -> list[int]:
    """Epoch indices to show: evenly spaced, always including the first and the last."""
    n = len(values)
    if n <= max_rows:
        return list(range(n))
    step = (n - 1) / (max_rows - 1)
    return sorted({round(i * step) for i in range(max_rows)})


def publish(summary: RunSummary, trained: Trained) -> None:
    """The run as Prefect UI artifacts: a summary card and a table of the losses."""
    create_markdown_artifact(
        key="train-summary",
        description="Final losses and where the run's files are",
        markdown=(
            f"## Training run\n\n"
            f"| | |\n|---|---|\n"
            f"| epochs | {summary.epochs} |\n"
            f"| final training loss | {summary.final_train_loss:.6g} |\n"
            f"| final validation loss | {summary.final_val_loss:.6g} |\n"
            f"| run directory | `{summary.run_dir}` |\n\n"
            f"Open TensorBoard: `tensorboard --logdir {summary.run_dir}`\n"
        ),
    )
    create_table_artifact(
        key="train-losses",
        description="Per-epoch losses (evenly thinned for long runs)",
        table=[
            {"epoch": i, "training": trained.train_loss[i], "validation": trained.val_loss[i]}
            for i in thinned(trained.train_loss)
        ],
    )


@task(name="export-graph")
def export_graph(trained: Trained, parts: Split, sample: Tensor, run: RunDir) -> RunSummary:
    summary = write_outputs(trained, parts, sample, run)
    publish(summary, trained)
    return summary
