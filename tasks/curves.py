"""A run folder's TensorBoard curves: the `loss` chart (training and validation) and one
chart per metric and for the lr, one point per epoch, written by the training thread.

torch's `SummaryWriter` hands every event to a thread of its own, woken once per event. At
the seed's scale, where an epoch of training takes ≈ 2.5 ms, that thread and the training
thread trade the GIL at every backward (which releases it): the five points of an epoch
cost ≈ 1.6–2.2 ms here. These files are written as that writer lays them out
(`add_scalars("loss", …)` into `loss_training/` and `loss_validation/`, `add_scalar` into
the folder's own file) and framed as TFRecords, byte for byte, in this thread, a batch at
most once a second (`benchmarks/run.py --sections overhead`: ≈ 0.03 ms an epoch).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import socket
import struct
import sys
import time
from pathlib import Path
from typing import BinaryIO

import numpy as np
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import CRC_TABLE

# What `add_scalars("loss", {"training": …, "validation": …})` names its folders and tag.
LOSS_TAG, CURVES = "loss", {"training": "loss_training", "validation": "loss_validation"}
PREFIX = "events.out.tfevents."
_file_ids = itertools.count()  # two files of one second and process get distinct names


class ScalarEventFile:
    """One event file of scalars in `folder`, named and framed as TensorBoard's own writer
    does (`events.out.tfevents.<time>.<host>.<pid>.<n>`, its version record first)."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        host, pid, n = socket.gethostname(), os.getpid(), next(_file_ids)
        self.path = folder / f"{PREFIX}{int(time.time()):010d}.{host}.{pid}.{n}"
        self.file: BinaryIO = open(self.path, "xb")  # noqa: SIM115 (closed by close())
        version = Event(wall_time=time.time(), file_version="brain.Event:2")
        self._record(version.SerializeToString())

    def add(self, tag: str, value: float, step: int, walltime: float) -> None:
        self._record(scalar_event(tag, value, step, walltime))

    def _record(self, data: bytes) -> None:
        # A TFRecord: length, its masked CRC-32C, the data, the data's masked CRC-32C.
        crc = struct.pack("<I", masked_crc32c(data))
        self.file.write(_length_header(len(data)) + data + crc)

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def scalar_event(tag: str, value: float, step: int, walltime: float) -> bytes:
    """`Event(wall_time, step, summary=Summary(value=[Value(tag, simple_value)]))`, serialized
    byte for byte as protobuf does (fields in number order; a zero step left out), without
    building message objects (tests/test_curves.py compares the two)."""
    if not -_FLOAT32_MAX <= value <= _FLOAT32_MAX:  # inf, NaN, or rounds to inf in float32
        summary = Summary(value=[Summary.Value(tag=tag, simple_value=value)])
        return Event(wall_time=walltime, step=step, summary=summary).SerializeToString()
    head = struct.pack("<Bd", 0x09, walltime)
    if step:
        head += b"\x10" + _varint(step)
    return head + _scalar_summary_head(tag) + struct.pack("<f", value)


# Beyond it (and for inf and NaN), protobuf's own path: float32 rounding of an out-of-range
# double is protobuf's to decide, and `struct` refuses one that rounds to inf.
_FLOAT32_MAX = 3.4028234663852886e38


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1  # a negative int64 is its two's complement, ten bytes
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


@functools.cache
def _scalar_summary_head(tag: str) -> bytes:
    # summary (field 5) > value (field 1) > tag (field 1), then simple_value's key (field 2).
    name = tag.encode()
    value = b"\x0a" + _varint(len(name)) + name + b"\x15"
    summary = b"\x0a" + _varint(len(value) + 4) + value
    return b"\x2a" + _varint(len(summary) + 4) + summary


# CRC-32C two bytes a step, from TensorBoard's byte table (its own `masked_crc32c` takes a
# step a byte; half the Python iterations). Entry i: the low byte of i, then the high one,
# fed through the byte table; built with numpy, since a Python loop over 65,536 entries
# would cost every process that imports this module tens of ms.
def _pair_table() -> tuple[int, ...]:
    table, pair = np.array(CRC_TABLE, dtype=np.uint32), np.arange(1 << 16, dtype=np.uint32)
    low = table[pair & 0xFF]
    return tuple((table[(low ^ (pair >> 8)) & 0xFF] ^ (low >> 8)).tolist())


_PAIR_TABLE = _pair_table()


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC-32C of `data`, as TensorBoard's `masked_crc32c` computes it."""
    crc, table = 0xFFFFFFFF, _PAIR_TABLE
    # Pairs read as native 16-bit words, which put the first byte low only on little-endian.
    paired = len(data) & ~1 if sys.byteorder == "little" else 0
    for pair in memoryview(data)[:paired].cast("H"):
        crc = table[(crc ^ pair) & 0xFFFF] ^ (crc >> 16)
    for byte in data[paired:]:
        crc = CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


@functools.cache
def _length_header(length: int) -> bytes:
    # A scalar event is one of a few lengths: its header's CRC (Python code, ≈ 6 µs) once each.
    header = struct.pack("<Q", length)
    return header + struct.pack("<I", masked_crc32c(header))


def clear(run_dir: Path) -> None:
    """Remove the folder's curves, so that they can be rewritten from a run's history: a
    resumed or cached run may reuse a folder that has some (a retry, a repeated --run-name).
    Kept: export-graph's graph and hparams files, under fixed ".0." names."""
    for curve in CURVES.values():
        for old in (run_dir / curve).glob(f"{PREFIX}*"):
            old.unlink()
    for old in run_dir.glob(f"{PREFIX}*"):
        if not old.name.startswith(f"{PREFIX}0."):
            old.unlink()


class Curves:
    """The run folder's curves, holding exactly the history given and the epochs added since:
    each epoch once. Held points reach the files at the first epoch that ends a second or
    more after the last write, so within two seconds of their epoch (`flush`, `close`, and
    an interrupted run's exit write the rest), each stamped with its epoch's own time;
    SummaryWriter held them for up to two minutes.
    """

    FLUSH_EVERY_S = 1.0

    def __init__(
        self,
        run_dir: Path,
        train_loss: list[float],
        val_loss: list[float],
        metrics: dict[str, list[float]] | None = None,
    ):
        clear(run_dir)
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
            raise

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
            train_file.add(LOSS_TAG, train_loss, epoch, walltime)
            val_file.add(LOSS_TAG, val_loss, epoch, walltime)
            for name, value in values.items():
                self.metrics_file.add(name, value, epoch, walltime)
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
