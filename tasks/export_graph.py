"""export-graph: graph, weights, a torch.export program and metrics into the run folder."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import xxhash
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from trainflow.tasks import files
from trainflow.tasks.cache.stage import cache_entry, stage
from trainflow.tasks.data.splits import Split
from trainflow.tasks.engine.fit import Trained
from trainflow.tasks.engine.models import instantiate
from trainflow.tasks.engine.registered import project_sources
from trainflow.tasks.errors import writing
from trainflow.tasks.runs.folder import (
    COLUMNS,
    GRAPH_EVENTS,
    HPARAMS_EVENTS,
    METRICS,
    MODEL,
    PROGRAM,
    RUN_FOLDER_ARTIFACT,
    SOURCE,
    SPEC,
    SPLIT,
    model_digest,
)

if TYPE_CHECKING:  # imported where a writer is made: a run that writes no events skips it
    from torch.utils.tensorboard import SummaryWriter

MAX_TABLE_ROWS = 200


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


def event_bytes(write: Callable[[SummaryWriter], None]) -> bytes:
    """What `write` logs, as the bytes of one event file that can go into any folder.

    TensorBoard's event files are sequences of self-delimiting records, so the files a
    writer leaves (add_hparams adds one of its own) concatenate into one valid file.
    """
    from torch.utils.tensorboard import SummaryWriter  # here: only a run that writes events

    with tempfile.TemporaryDirectory() as scratch:
        with SummaryWriter(scratch) as writer:
            write(writer)
        paths = sorted(Path(scratch).rglob("events.out.tfevents.*"))
        return b"".join(path.read_bytes() for path in paths)


SAMPLE_IMAGES = 64  # shown in TensorBoard's IMAGES tab for image data


def is_images(sample: Tensor) -> bool:
    """uint8 N×C×H×W with 1 or 3 channels (an image folder's, or an array file of images)."""
    return sample.dtype == torch.uint8 and sample.ndim == 4 and sample.shape[1] in (1, 3)


def graph_event_file(model: nn.Module, sample: Tensor) -> bytes:
    def add_graph(writer: SummaryWriter) -> None:
        with warnings.catch_warnings():
            # add_graph traces with torch.jit, which warns it is deprecated; nothing to act on.
            warnings.simplefilter("ignore", DeprecationWarning)
            writer.add_graph(model, sample)
        if is_images(sample):
            writer.add_images("training samples", sample[:SAMPLE_IMAGES], dataformats="NCHW")

    return event_bytes(add_graph)


def export_model(trained: Trained, sample: Tensor) -> Exported:
    model = instantiate(trained.spec, trained.state).eval()
    program = export_program(model, sample)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return Exported(buffer.getvalue(), graph_event_file(model, sample))


def metrics_record(trained: Trained) -> dict[str, Any]:
    """Per-epoch lists (epoch indices are 0-based, like TensorBoard's steps)."""
    return {
        "epochs": len(trained.train_loss),
        "epochs_trained": trained.epochs_trained,
        "resumed_from": trained.resumed_from,
        "final_train_loss": trained.train_loss[-1],
        "final_val_loss": trained.val_loss[-1],
        "train_loss": trained.train_loss,
        "val_loss": trained.val_loss,
        **trained.metrics,
        "best_epoch": trained.best_epoch,
        "stopped_early_at": trained.stopped_early_at,
    }


def final_values(trained: Trained) -> dict[str, float]:
    """The run's last losses and metrics, as the hparams record and the summary show them."""
    final = {"train_loss": trained.train_loss[-1], "val_loss": trained.val_loss[-1]}
    return final | {name: values[-1] for name, values in trained.metrics.items() if name != "lr"}


def hparams(config: dict[str, Any]) -> dict[str, Any]:
    """TensorBoard's HPARAMS tab takes scalars and strings only."""
    return {
        key: value if isinstance(value, int | float | str | bool) else str(value)
        for key, value in config.items()
        if value is not None
    }


def write_outputs(
    exported: Exported,
    trained: Trained,
    parts: Split,
    run_dir: Path,
    config: dict[str, Any],
    columns: dict[str, list[str]],
    sources: dict[str, bytes] | None = None,
) -> str:
    """Every file of the run folder that export-graph owns, on a miss and on a hit alike.
    Returns the digest of the model written (`model_digest`). `sources`: the project's code
    the run used, by its path in the project, copied under source/."""
    with writing(f"the run folder {str(run_dir)!r}"):
        write_sources(run_dir / SOURCE, sources or {})
        metrics = metrics_record(trained)
        final = {f"final/{name}": value for name, value in final_values(trained).items()}
        files.atomic_write(run_dir / GRAPH_EVENTS, exported.graph_events)
        # run_name ".": the record belongs to this folder's run, not to a sub-run of its own.
        record = event_bytes(lambda w: w.add_hparams(hparams(config), final, run_name="."))
        files.atomic_write(run_dir / HPARAMS_EVENTS, record)
        # In memory, unlike the split: the digest is of the very bytes written, and the
        # weights are what predict reads whole anyway.
        weights = safetensors_bytes({k: v.contiguous() for k, v in trained.state.items()})
        files.atomic_write(run_dir / MODEL, weights)
        files.atomic_write(run_dir / PROGRAM, exported.program)
        spec = dataclasses.asdict(trained.spec)
        files.write_json(run_dir / SPEC, spec)
        files.write_safetensors(run_dir / SPLIT, {"train": parts.train, "val": parts.val})
        files.write_json(run_dir / COLUMNS, columns)
        files.write_json(run_dir / METRICS, metrics)  # last: a run folder with it is complete
    # As the files read back: tuples are JSON lists.
    spec, columns = json.loads(json.dumps(spec)), json.loads(json.dumps(columns))
    return model_digest(xxhash.xxh3_128_hexdigest(weights), spec, columns, config["loss"])


def write_sources(folder: Path, sources: dict[str, bytes]) -> None:
    """`sources` under `folder`, and nothing else: a folder, or a link, left there by an
    earlier run into this run folder is replaced, never followed out of it."""
    if folder.is_symlink() or folder.is_file():
        folder.unlink()
    elif folder.is_dir():
        shutil.rmtree(folder)
    for relative, text in sources.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        files.atomic_write(path, text)


def thinned(values: list[float], max_rows: int = MAX_TABLE_ROWS) -> list[int]:
    """Epoch indices to show: evenly spaced, always including the first and the last."""
    n = len(values)
    if n <= max_rows:
        return list(range(n))
    step = (n - 1) / (max_rows - 1)
    return sorted({round(i * step) for i in range(max_rows)})


def publish(trained: Trained, run_dir: Path, model: str, cache: str) -> None:
    """The run as Prefect UI artifacts: a summary card, a table of the losses, and the run
    folder's absolute path with the digest of the model exported there and the run's cache
    (what predict looks up by flow run id). A retried flow run records them again: predict
    reads the newest."""
    create_table_artifact(
        key=RUN_FOLDER_ARTIFACT,
        description="The run folder this flow run wrote, the model it exported, its cache",
        table=[{"run_folder": str(Path(run_dir).absolute()), "model": model, "cache": cache}],
    )
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
            + "".join(
                f"| final {name.replace('_', ' ')} | {value:.6g} |\n"
                for name, value in final_values(trained).items()
                if name not in ("train_loss", "val_loss")
            )
            + _epoch_notes(trained)
            + f"| run directory | `{run_dir}` |\n\n"
            f"Open TensorBoard: `tensorboard --logdir {run_dir}`\n"
        ),
    )
    create_table_artifact(
        key="train-losses",
        description="Per-epoch losses, metrics and lr (evenly thinned for long runs)",
        table=[
            {
                "epoch": i,
                "training": trained.train_loss[i],
                "validation": trained.val_loss[i],
                **{name: values[i] for name, values in trained.metrics.items()},
            }
            for i in thinned(trained.train_loss)
        ],
    )


def _epoch_notes(trained: Trained) -> str:
    notes = ""
    if trained.best_epoch is not None:
        notes += f"| exported weights | best epoch, {trained.best_epoch} |\n"
    if trained.stopped_early_at is not None:
        notes += f"| stopped early | after epoch {trained.stopped_early_at} |\n"
    return notes


@stage(name="export-graph")
def export_graph(
    trained: Trained,
    parts: Split,
    sample: Tensor,
    run_dir: Path,
    config: dict[str, Any],
    columns: dict[str, list[str]],
    cache: str,
) -> Exported:
    """The program and graph are cached; the run folder's files and the UI artifacts are
    written on a hit as on a miss. `cache`: the run's stage cache, absolute, for the record."""
    entry = cache_entry("export-graph", export_model, trained=trained, sample=sample)
    exported = entry.load(Exported)
    hit = exported is not None
    if exported is None:
        exported = entry.keep(export_model(trained, sample))
    named = [
        ("models", trained.spec.name),
        ("losses", config["loss"]),
        *(("metrics", name) for name in config.get("extra_metrics", ())),
        *(("augmentations", name) for name in config.get("augment", ())),
    ]
    sources = project_sources(named)
    model = write_outputs(exported, trained, parts, run_dir, config, columns, sources)
    publish(trained, run_dir, model, cache)
    return entry.cached(exported) if hit else exported
