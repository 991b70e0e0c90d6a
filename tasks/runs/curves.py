"""A run folder's TensorBoard curves: the `loss` chart (training and validation) and one
chart per metric and for the lr, one point per epoch, written by the training thread.

The files are laid out as torch's `SummaryWriter` lays them out (`add_scalars("loss", …)`
into `loss_training/` and `loss_validation/`, `add_scalar` into the folder's own file), each
an `Event` framed and checksummed by TensorBoard's own `RecordWriter`; an epoch's metrics and
lr are one event of several values rather than one event each (TensorBoard reads them alike).
What differs is who writes them, and when: `SummaryWriter` hands every event to a thread of
its own, woken once per event, which then trades the GIL with the training thread at every
backward pass (which releases it); at a small model's scale that hand-off costs more than the
epoch's points. Here the training thread writes them itself, a batch at most once a second.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import socket
import time
from pathlib import Path

from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.summary.writer.record_writer import RecordWriter

# What `add_scalars("loss", {"training": …, "validation": …})` names its folders and tag.
LOSS_TAG, CURVES = "loss", {"training": "loss_training", "validation": "loss_validation"}
PREFIX = "events.out.tfevents."
_file_ids = itertools.count()  # two files of one second and process get distinct names


class ScalarEventFile:
    """One event file of scalars in `folder`, named and framed as TensorBoard's own writer
    does (`events.out.tfevents.<time>.<host>.<pid>.<n>`, its version record first), written
    in the caller's thread."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        host, pid, n = socket.gethostname(), os.getpid(), next(_file_ids)
        self.path = folder / f"{PREFIX}{int(time.time()):010d}.{host}.{pid}.{n}"
        # RecordWriter frames each record (length, data, their masked CRC-32Cs) into the file.
        self.records = RecordWriter(open(self.path, "xb"))  # noqa: SIM115 (closed by close())
        self._write(Event(wall_time=time.time(), file_version="brain.Event:2"))

    def add(self, values: dict[str, float], step: int, walltime: float) -> None:
        """One event holding a point of each tag at `step`: TensorBoard reads every value of
        an event's summary as its tag's point (as it reads TensorFlow's merged summaries),
        and each event costs a record's framing and two checksums."""
        summary = Summary(value=[Summary.Value(tag=k, simple_value=v) for k, v in values.items()])
        self._write(Event(wall_time=walltime, step=step, summary=summary))

    def _write(self, event: Event) -> None:
        self.records.write(event.SerializeToString())

    def flush(self) -> None:
        self.records.flush()

    def close(self) -> None:
        self.records.close()


def curve_files(run_dir: Path) -> list[Path]:
    """The folder's curves: a resumed or cached run may reuse a folder that has some (a retry,
    a repeated --run-name), which its own supersede. Not export-graph's graph and hparams
    files, under fixed ".0." names."""
    found = [old for curve in CURVES.values() for old in (run_dir / curve).glob(f"{PREFIX}*")]
    return found + [
        old for old in run_dir.glob(f"{PREFIX}*") if not old.name.startswith(f"{PREFIX}0.")
    ]


class Curves:
    """The run folder's curves, holding exactly the history given and the epochs added since:
    each epoch once. The first epoch added is written at once; later points reach the files
    at the first epoch that ends a second or more after the last write, so within two seconds
    of their epoch (`flush`, `close`, and an interrupted run's exit write the rest), each
    stamped with its epoch's own time (the history's with the time it is written: a
    checkpoint keeps no times); SummaryWriter held them for up to two minutes.
    """

    FLUSH_EVERY_S = 1.0

    def __init__(
        self,
        run_dir: Path,
        train_loss: list[float],
        val_loss: list[float],
        metrics: dict[str, list[float]] | None = None,
        *,
        flush_every_s: float = FLUSH_EVERY_S,
    ):
        self.FLUSH_EVERY_S = flush_every_s  # 0: every epoch's points as it ends
        # Removed only once this history is on disk: a rewrite that fails (a full disk)
        # leaves the curves the folder had.
        older = curve_files(run_dir)
        self.files: list[ScalarEventFile] = []
        metrics = metrics or {}
        now = time.time()
        self.held = [
            (epoch, *losses, {k: v[epoch] for k, v in metrics.items()}, now)
            for epoch, losses in enumerate(zip(train_loss, val_loss, strict=True))
        ]
        try:
            self.metrics_file = self._open(run_dir)
            self.loss_files = [self._open(run_dir / folder) for folder in CURVES.values()]
            self.flush()
        except BaseException:
            with contextlib.suppress(OSError):  # the first error is the one to report
                self._close_files()
            for file in self.files:
                with contextlib.suppress(OSError):
                    file.path.unlink()
            raise
        for old in older:
            old.unlink(missing_ok=True)
        # The first epoch added is written at once: a run shows in TensorBoard as soon as it
        # has a point, whatever the cadence after it.
        self.last_flush = -math.inf

    def _open(self, folder: Path) -> ScalarEventFile:
        self.files.append(ScalarEventFile(folder))
        return self.files[-1]

    def __call__(
        self, epoch: int, train_loss: float, val_loss: float, values: dict[str, float]
    ) -> None:
        """Add an epoch's points; the hook train-epochs' loop calls after each epoch."""
        self.held.append((epoch, train_loss, val_loss, values, time.time()))
        if time.monotonic() - self.last_flush >= self.FLUSH_EVERY_S:
            self.flush()

    def flush(self) -> None:
        held, self.held = self.held, []
        train_file, val_file = self.loss_files
        for epoch, train_loss, val_loss, values, walltime in held:
            train_file.add({LOSS_TAG: train_loss}, epoch, walltime)
            val_file.add({LOSS_TAG: val_loss}, epoch, walltime)
            if values:
                self.metrics_file.add(values, epoch, walltime)
        for file in self.files:
            file.flush()
        self.last_flush = time.monotonic()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._close_files()

    def _close_files(self) -> None:
        errors = []
        for file in self.files:  # each of them, whichever fails
            try:
                file.close()
            except OSError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def __enter__(self) -> Curves:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
