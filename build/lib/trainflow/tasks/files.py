"""Atomic, durable file writes: a crash never leaves a half-written file under its final name,
and once a write returns, a power loss does not take the file back (where the filesystem
honours fsync)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from safetensors.torch import save_file as safetensors_save_file
from torch import Tensor


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # mkstemp makes 0600 files; give them the usual mode


def fsync_dir(folder: Path | str) -> None:
    """Make the names created, renamed or removed in `folder` survive a power loss.

    A rename is an update of the folder, not of the file: without this, the file's bytes are
    on disk but its new name may not be. Filesystems that can't fsync a folder (some network
    mounts; Windows can't even open one) are left to their own guarantees.
    """
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # EINVAL and friends: this filesystem does not sync folders
        pass
    finally:
        os.close(fd)


def make_dirs(folder: Path | str) -> None:
    """`os.makedirs(folder, exist_ok=True)`, durably: each folder it creates is synced into
    its parent, so a file later written inside can't vanish with a folder lost to a crash."""
    folder = Path(os.path.abspath(folder))
    missing = []
    while not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    for new in reversed(missing):
        try:
            new.mkdir()
        except FileExistsError:  # another process made it meanwhile: as good
            if not new.is_dir():
                raise
        fsync_dir(new.parent)


@contextmanager
def atomic_file(path: Path | str) -> Iterator[BinaryIO]:
    """A file to write `path`'s new bytes into, at a temporary name in the same folder; when
    the block ends: fsync, rename over `path`, fsync the folder. A reader sees the old file or
    the new one, never a mix; an error leaves no temporary file behind."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)
        os.close(fd)
        with open(tmp, "wb") as f:  # by name: `f.name` is the temporary file's path
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write(path: Path | str, data: bytes) -> None:
    """`data` as `path`'s content, whole or not at all (`atomic_file`)."""
    with atomic_file(path) as f:
        f.write(data)


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, (json.dumps(obj, indent=2) + "\n").encode())


def write_safetensors(path: Path, tensors: dict[str, Tensor]) -> None:
    """`atomic_write` of a safetensors file, streamed from the tensors to the temporary file:
    safetensors' `save()` builds the file's bytes in memory first (twice the tensors' size
    at its peak: 470 MB for a 30M-row split)."""
    with atomic_file(path) as f:
        safetensors_save_file({k: v.contiguous() for k, v in tensors.items()}, f.name)
