"""train-epochs: the training engine (tasks/engine/) run through the stage cache, on one
process or many, with the fence handed in, and the losses in TensorBoard and the log."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

from prefect import get_run_logger

from trainflow.tasks.cache.code_keys import loaded_sources
from trainflow.tasks.cache.stage import cache_entry, stage, warn
from trainflow.tasks.data.batches import Loaders
from trainflow.tasks.device import resolve_device
from trainflow.tasks.engine.checkpoint import CheckpointSettings
from trainflow.tasks.engine.fit import Progress, Trained, train_model
from trainflow.tasks.engine.launch import Job, check_launch, default_threads, launch_ranks
from trainflow.tasks.engine.models import InitialModel
from trainflow.tasks.engine.options import Launch, TrainingOptions
from trainflow.tasks.engine.ranks import SingleProcess
from trainflow.tasks.engine.registered import registered_code
from trainflow.tasks.engine.stops import Interrupted as Interrupted  # raised to the callers
from trainflow.tasks.engine.stops import StopSignals
from trainflow.tasks.errors import is_final, writing
from trainflow.tasks.runs import fence
from trainflow.tasks.runs.curves import Curves


def write_curves(
    run_dir: Path, train_loss: list[float], val_loss: list[float], metrics: dict[str, list[float]]
) -> None:
    """The run folder's curves from a whole history: a cache hit's, or the ranks'."""
    with writing(f"the run folder {str(run_dir)!r}"):
        Curves(run_dir, train_loss, val_loss, metrics).close()


def project_code(loss: str, options: TrainingOptions) -> dict[str, Any]:
    """What the key covers of the project's own code this training runs, by name."""
    named = [
        ("losses", loss),
        *(("metrics", name) for name in options.extra_metrics),
        *(("augmentations", name) for name in options.augment),
    ]
    found = {f"{kind}.{name}": registered_code(kind, name) for kind, name in named}
    return {key: code for key, code in found.items() if code is not None}


def _worth_retrying(task: Any, task_run: Any, state: Any) -> bool:
    # Bad input, a diverging loss and a full disk fail the same way again: don't retry those.
    return not is_final(state.result(raise_on_failure=False))


@stage(
    name="train-epochs",
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=_worth_retrying,
)
def train_epochs(
    initial: InitialModel,
    loaders: Loaders,
    optimizer: str,
    lr: float,
    momentum: float,
    weight_decay: float,
    loss: str,
    epochs: int,
    device: str,
    run_dir: Path,
    checkpointing: CheckpointSettings | None = None,
    options: TrainingOptions = TrainingOptions(),  # noqa: B008 (frozen)
    launch: Launch = Launch(),  # noqa: B008 (frozen)
) -> Trained:
    # What the weights depend on: the device's type (CPU and CUDA kernels round differently),
    # not its name or index; momentum only where SGD uses it; never the run folder.
    recipe = {
        "initial": initial,
        "loaders": loaders,
        "optimizer": optimizer,
        "lr": lr,
        "momentum": momentum if optimizer == "sgd" else None,
        "weight_decay": weight_decay,
        "loss": loss,
        "device": resolve_device(device).type,
        "options": options.normalized(),
    }
    if own_code := project_code(loss, options):
        recipe["project"] = own_code  # the project's loss, metrics, augmentations: their code
    if launch.distributed:
        check_launch(launch, device)
        # More ranks reduce in another order: another result, and another lineage (never a
        # wrong resume). One process keeps the key it always had.
        recipe["world_size"] = launch.world_size
    entry = cache_entry("train-epochs", train_model, epochs=epochs, **recipe)
    if (hit := entry.load(Trained)) is not None:
        # a hit still gets its curves
        write_curves(run_dir, hit.train_loss, hit.val_loss, hit.metrics)
        return entry.cached(dataclasses.replace(hit, epochs_trained=0, resumed_from=None))
    # The first N epochs are the same whatever a run's length, so checkpoints are filed under
    # the key without `epochs` (the lineage): a longer run of the config continues a shorter.
    # Not so for a schedule shaped by the run's length (cosine, onecycle): its lineage keeps
    # `epochs`, and a longer run is a new schedule from epoch 0 (README: "Schedules").
    length = {"epochs": epochs} if options.schedule_needs_length else {}
    lineage_entry = cache_entry("train-epochs", train_model, **recipe, **length)
    lineage = lineage_entry.key
    # The run folder says whose checkpoints these are: a retry or a re-run into the same folder
    # takes over the files it wrote, and never touches another run's.
    checkpoints = (
        checkpointing.open(lineage, str(run_dir), warn=warn) if checkpointing and lineage else None
    )
    resume = checkpoints.latest(epochs) if checkpoints and checkpointing.resume else None
    history = (resume.train_loss, resume.val_loss, resume.metrics) if resume else ([], [], {})
    logger = get_run_logger()
    if launch.distributed:
        inputs = {
            "initial": initial,
            "loaders": loaders,
            "optimizer": optimizer,
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "loss": loss,
            "options": options,
        }
        job = Job(
            inputs,
            epochs,
            device,
            checkpointing,
            lineage,
            str(run_dir),
            progress="",  # set by the launcher
            threads=default_threads(launch.nproc),
            hang_timeout=launch.hang_timeout,
            # Rank 0 asks on this process's behalf before a checkpoint.
            fence=functools.partial(fence.hold, owner) if (owner := fence.owner()) else None,
            code=lineage_entry.code,
            loaded=loaded_sources(),
            # Every epoch's points written as it ends: a rank stopped by the launcher dies
            # at once, with nothing held.
            curves=functools.partial(Curves, run_dir, flush_every_s=0.0),
        )
        # A folder that can't be written fails here, before the ranks start, as one process's.
        write_curves(run_dir, *history)
        report = launch_ranks(launch, job, logger.info, fence.exit_now)
        trained = report.trained
        # Rank 0 wrote them as it trained, each point with its epoch's time; any other
        # node's folder, or one where rank 0's writes failed, gets them from the history.
        if not (report.rank == 0 and report.curves_written):
            write_curves(run_dir, trained.train_loss, trained.val_loss, trained.metrics)
        return entry.keep(trained)
    if resume is not None:
        logger.info(f"resumed from epoch {resume.epoch}, batch {resume.batch}")
    progress = Progress(logger.info, epochs, len(loaders.train))
    # A full or read-only run folder is reported as such, whichever write meets it.
    with (
        writing(f"the run folder {str(run_dir)!r}"),
        Curves(run_dir, *history) as curves,
        StopSignals() as stop,
    ):

        def on_epoch(epoch: int, train_loss: float, val_loss: float, values: dict) -> None:
            curves(epoch, train_loss, val_loss, values)
            progress(epoch, train_loss, val_loss, values)

        trained = train_model(
            initial,
            loaders,
            optimizer,
            lr,
            momentum,
            weight_decay,
            loss,
            epochs,
            resolve_device(device),
            on_epoch,
            checkpoints,
            resume,
            stop,
            options=options,
            # The split-brain fence before each checkpoint; a UI cancellation reported as such.
            ranks=SingleProcess(hold=fence.hold, cancellation=fence.cancellation),
        )
    return entry.keep(trained)
