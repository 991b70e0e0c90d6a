"""The run folder's curves (tasks/runs/curves.py): what TensorBoard's own writer would have
written, each point on disk once a second has passed since the last write, and all of them
when a run stops, written by the thread that adds them."""

import math
import threading
import time

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto.event_pb2 import Event
from torch.utils.tensorboard import SummaryWriter

from trainflow.tasks.runs.curves import Curves

from ..disks import fill, tmpfs

# Values a float32 holds exactly: TensorBoard stores simple_value as a float32.
TRAIN, VAL = [0.75, 0.5, 0.25], [1.0, 0.625, 0.375]
HISTORY = (TRAIN, VAL, {"val_mae": [0.875, 0.5, 0.125], "lr": [0.5] * 3})


def _read(run_dir) -> dict[str, list[tuple[int, float, float]]]:
    """Every scalar under the folder, by sub-folder and tag: (step, value, wall time)."""
    found = {}
    for sub in ("", "loss_training", "loss_validation"):
        events = EventAccumulator(str(run_dir / sub)).Reload()
        for tag in events.Tags()["scalars"]:
            found[f"{sub}/{tag}"] = [(e.step, e.value, e.wall_time) for e in events.Scalars(tag)]
    return found


def test_the_curves_read_back_as_summary_writers_own(tmp_path):
    """The layout and values of `add_scalars("loss", …)` and `add_scalar` per metric."""
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    Curves(ours, *HISTORY).close()
    with SummaryWriter(str(theirs)) as writer:
        train, val, metrics = HISTORY
        for epoch in range(3):
            writer.add_scalars("loss", {"training": train[epoch], "validation": val[epoch]}, epoch)
            for name, values in metrics.items():
                writer.add_scalar(name, values[epoch], epoch)

    def without_time(found):
        return {key: [(step, value) for step, value, _ in points] for key, points in found.items()}

    assert without_time(_read(ours)) == without_time(_read(theirs))
    assert set(_read(ours)) == {"/val_mae", "/lr", "loss_training/loss", "loss_validation/loss"}


def test_a_rewritten_folder_holds_each_epoch_once_and_keeps_export_graphs_files(tmp_path):
    kept = tmp_path / "events.out.tfevents.0.graph"
    kept.write_bytes(b"")
    Curves(tmp_path, [9.0] * 5, [9.0] * 5).close()  # an earlier attempt's longer curves
    Curves(tmp_path, *HISTORY).close()
    found = _read(tmp_path)
    assert [value for _, value, _ in found["loss_training/loss"]] == HISTORY[0]
    assert kept.exists()


def test_points_are_held_under_the_flush_interval_then_written_with_their_epochs_time(
    tmp_path, monkeypatch
):
    curves = Curves(tmp_path, [], [])
    monkeypatch.setattr(curves, "FLUSH_EVERY_S", 3600.0)
    spans = []
    try:
        for epoch in range(3):
            if epoch == 2:
                monkeypatch.setattr(curves, "FLUSH_EVERY_S", 0.0)  # the interval has passed
            written = [step for step, _, _ in _read(tmp_path).get("loss_training/loss", [])]
            assert written == ([] if epoch == 0 else [0]), epoch  # the first at once, then held
            before = time.time()
            curves(epoch, 1.0 / (epoch + 1), 1.0, {"lr": 0.1})
            spans.append((before, time.time()))
        found = _read(tmp_path)  # the files are still open: on disk, not only at close
        for key in ("loss_training/loss", "loss_validation/loss", "/lr"):
            assert [step for step, _, _ in found[key]] == [0, 1, 2], key
            for (_, _, wall), (before, after) in zip(found[key], spans, strict=True):
                assert before - 1e-3 <= wall <= after + 1e-3, key  # wall_time is a double
    finally:
        curves.close()


def test_an_interrupted_run_leaves_every_epoch_it_finished(tmp_path):
    with pytest.raises(KeyboardInterrupt), Curves(tmp_path, [0.9], [1.0]) as curves:
        curves(1, 0.5, 0.6, {})
        curves(2, 0.25, 0.3, {})
        raise KeyboardInterrupt
    assert [s for s, _, _ in _read(tmp_path)["loss_training/loss"]] == [0, 1, 2]


def test_a_folder_that_cannot_be_written_closes_what_it_opened(tmp_path, monkeypatch):
    """The error reaches the caller (train-epochs reports it, naming the run folder), and no
    file stays open."""
    opened = []
    real_open = open

    def recording_open(path, mode="r", *args, **kwargs):
        file = real_open(path, mode, *args, **kwargs)
        opened.append(file)
        return file

    monkeypatch.setattr("builtins.open", recording_open)
    (tmp_path / "loss_validation").write_text("a file where a folder goes")
    with pytest.raises(OSError):
        Curves(tmp_path, *HISTORY)
    assert len(opened) == 2 and all(file.closed for file in opened)


def _events(folder) -> list[Event]:
    """The folder's one event file, record by record, as TensorBoard's reader reads it (it
    checks each record's length and data checksums), each wall time zeroed."""
    [path] = folder.glob("events.out.tfevents.*")
    events = [Event.FromString(record) for record in RawEventFileLoader(str(path)).Load()]
    for event in events:
        event.wall_time = 0.0
    return events


# Values and steps off the easy path: float32's edges and beyond, inf, NaN, a negative zero,
# and steps whose encodings take one to six bytes.
EDGES = [0.1, -0.0, 1 / 3, 1e-45, 3.4028234663852886e38, 3.5e38, -1e39, math.inf, -math.inf]
EDGES += [math.nan, -1.5]
STEPS = [0, 1, 127, 128, 16_384, 2**31, 2**40, 3, 4, 5, 6]


def test_each_record_is_the_event_summary_writer_writes_for_it(tmp_path):
    """Record by record, after the version record: the bytes of the event `add_scalars`
    writes for the same point; in the metrics file, one event per epoch holding, in order,
    the values of the events `add_scalar` writes for it (a non-ASCII tag too)."""
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    with Curves(ours, [], []) as curves:
        for step, value in zip(STEPS, EDGES, strict=True):
            curves(step, value, -value, {"état": value, "lr": -value})
    with SummaryWriter(str(theirs)) as writer:
        for step, value in zip(STEPS, EDGES, strict=True):
            writer.add_scalars("loss", {"training": value, "validation": -value}, step)
            writer.add_scalar("état", value, step)
            writer.add_scalar("lr", -value, step)
    for folder in ("", "loss_training", "loss_validation"):
        mine, summary_writers = _events(ours / folder), _events(theirs / folder)
        assert mine[0].file_version == summary_writers[0].file_version == "brain.Event:2"
        if not folder:  # SummaryWriter's two events a step, as one
            merged = []
            pairs = zip(summary_writers[1::2], summary_writers[2::2], strict=True)
            for first, second in pairs:
                assert first.step == second.step
                first.summary.value.extend(second.summary.value)
                merged.append(first)
            summary_writers[1:] = merged
        assert [e.SerializeToString() for e in mine[1:]] == [
            e.SerializeToString() for e in summary_writers[1:]
        ], folder
        assert len(mine) == len(STEPS) + 1


def test_the_points_are_written_in_the_thread_that_adds_them(tmp_path, monkeypatch):
    """No writer thread: each point is written by the caller (a thread handed each event
    would trade the GIL with training at every backward pass)."""
    started = []
    monkeypatch.setattr(threading.Thread, "start", lambda self: started.append(self))
    with Curves(tmp_path, *HISTORY) as curves:
        monkeypatch.setattr(curves, "FLUSH_EVERY_S", 0.0)
        curves(3, 0.125, 0.25, {"lr": 0.5})
        assert [s for s, _, _ in _read(tmp_path)["loss_training/loss"]] == [0, 1, 2, 3]
    assert started == []


def test_a_rewrite_that_fails_leaves_the_curves_the_folder_had(tmp_path):
    """A resumed or restarted run rewrites the curves from its history; on a disk too full
    for that, the error reaches the caller and the points already there stay readable."""
    with tmpfs(tmp_path / "disk", "64k") as disk:
        Curves(disk, *HISTORY).close()
        before = _read(disk)
        fill(disk)
        longer = ([0.5] * 2000, [0.5] * 2000, {"lr": [0.1] * 2000})
        with pytest.raises(OSError):
            Curves(disk, *longer).close()
        assert _read(disk) == before
        assert sorted(p.parent.name for p in disk.rglob("events.out.tfevents.*")) == sorted(
            ["disk", "loss_training", "loss_validation"]
        )  # the failed rewrite's own files are gone
