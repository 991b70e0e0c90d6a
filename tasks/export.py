"""export-graph: graph, weights, a torch.export program and metrics into the run folder."""

from __future__ import annotations

import io
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from torch import Tensor, nn

from tasks import files, rundir
from tasks.cache import StageCache, cacheable
from tasks.errors import writing
from tasks.model import instantiate
from tasks.rundir import on_cache_hit
from tasks.split import Split
from tasks.train import Trained

MAX_TABLE_ROWS = 200


@cacheable
@dataclass(frozen=True)
class Exported:
    """The expensive part of export-graph, kept as the files' bytes."""

    program: bytes  # torch.export.save of the trained model
    graph_events: bytes  # a TensorBoard event file holding add_graph's graph
    cache_key: str = field(default="", compare=False)

    def to_cache(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        def as_tensor(data: bytes) -> Tensor:  # frombuffer refuses an empty buffer
            return (
                torch.frombuffer(bytearray(data), dtype=torch.uint8)
                if data
                else torch.empty(0, dtype=torch.uint8)
            )

        return {
            "program": as_tensor(self.program),
            "graph_events": as_tensor(self.graph_events),
        }, {}

    @classmethod
    def from_cache(cls, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Exported:
        return cls(tensors["program"].numpy().tobytes(), tensors["graph_events"].numpy().tobytes())


def export_program(model: nn.Module, sample: Tensor) -> torch.export.ExportedProgram:
    """torch.export with a dynamic batch dimension, so the program predicts any number of rows."""
    if sample.shape[0] < 2:
        sample = sample.expand(2, *sample.shape[1:])  # export specialises a batch of 1
    batch = torch.export.Dim("batch", min=1)
    return torch.export.export(model.eval(), (sample,), dynamic_shapes=({0: batch},))


def graph_event_file(model: nn.Module, sample: Tensor) -> bytes:
    """add_graph into a scratch folder; the event file's bytes can go into any run folder."""
    from torch.utils.tensorboard import SummaryWriter  # here: only a run that writes events

    with tempfile.TemporaryDirectory() as scratch:
        with SummaryWriter(scratch) as writer, warnings.catch_warnings():
            # add_graph traces with torch.jit, which warns it is deprecated; nothing to act on.
            warnings.simplefilter("ignore", DeprecationWarning)
            writer.add_graph(model, sample)
        (event_file,) = Path(scratch).glob("events.out.tfevents.*")
        return event_file.read_bytes()


def export_model(trained: Trained, sample: Tensor) -> Exported:
    model = instantiate(trained.spec, trained.state).eval()
    program = export_program(model, sample)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return Exported(buffer.getvalue(), graph_event_file(model, sample))


def metrics_record(trained: Trained) -> dict[str, Any]:
    return {
        "epochs": len(trained.train_loss),
        "epochs_trained": trained.epochs_trained,
        "resumed_from": trained.resumed_from,
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


def write_outputs(
    exported: Exported, trained: Trained, parts: Split, run_dir: Path, config: dict[str, Any]
) -> None:
    """Every file of the run folder that export-graph owns, on a miss and on a hit alike."""
    with writing(f"the run folder {str(run_dir)!r}"):
        _write_outputs(exported, trained, parts, run_dir, config)


def _write_outputs(
    exported: Exported, trained: Trained, parts: Split, run_dir: Path, config: dict[str, Any]
) -> None:
    from torch.utils.tensorboard import SummaryWriter  # here: only a run that writes events

    metrics = metrics_record(trained)
    files.atomic_write(
        run_dir / f"events.out.tfevents.{time.time():.0f}.graph", exported.graph_events
    )
    with SummaryWriter(str(run_dir)) as writer:
        final = {"final/train_loss": metrics["final_train_loss"],
                 "final/val_loss": metrics["final_val_loss"]}  # fmt: skip
        writer.add_hparams(hparams(config), final, run_name=".")  # ".": this run, no sub-run
    files.write_safetensors(run_dir / rundir.MODEL, trained.state)
    files.atomic_write(run_dir / rundir.PROGRAM, exported.program)
    files.write_safetensors(run_dir / rundir.SPLIT, {"train": parts.train, "val": parts.val})
    files.write_json(run_dir / rundir.METRICS, metrics)


def thinned(values: list[float], max_rows: int = MAX_TABLE_ROWS) -> list[int]:
    """Epoch indices to show: evenly spaced, always including the first and the last."""
    n = len(values)
    if n <= max_rows:
        return list(range(n))
    step = (n - 1) / (max_rows - 1)
    return sorted({round(i * step) for i in range(max_rows)})


def publish(trained: Trained, run_dir: Path) -> None:
    """The run as Prefect UI artifacts: a summary card and a table of the losses."""
    create_markdown_artifact(
        key="train-summary",
        description="Final losses and where the run's files are",
        markdown=(
            f"## Training run\n\n"
            f"| | |\n|---|---|\n"
            f"| epochs | {len(trained.train_loss)} "
            f"({trained.epochs_trained} trained in this run) |\n"
            f"| final training loss | {trained.train_loss[-1]:.6g} |\n"
            f"| final validation loss | {trained.val_loss[-1]:.6g} |\n"
            f"| run directory | `{run_dir}` |\n\n"
            f"Open TensorBoard: `tensorboard --logdir {run_dir}`\n"
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


def export_identity(inputs: dict[str, Any]) -> dict[str, Any]:
    # The exported files depend on the weights and the sample batch, not on where they go.
    return {"trained": inputs["trained"], "sample": inputs["sample"]}


@task(name="export-graph", cache_policy=StageCache(identity=export_identity))
def export_graph(
    trained: Trained, parts: Split, sample: Tensor, run_dir: Path, config: dict[str, Any]
) -> Exported:
    return deliver(export_model(trained, sample), trained, parts, run_dir, config)


@on_cache_hit(export_graph)
def deliver(
    exported: Exported,
    trained: Trained,
    parts: Split,
    run_dir: Path,
    config: dict[str, Any],
    **_: Any,
) -> Exported:
    """Write the run folder's files and the UI artifacts: after an export, or a cache hit."""
    write_outputs(exported, trained, parts, run_dir, config)
    publish(trained, run_dir)
    return exported
