"""Writing predictions: a table (CSV, Parquet, Feather) a block of rows at a time, to a local
path through a temporary file held open and renamed into place, or to any fsspec URL."""

from __future__ import annotations

import fcntl
import glob
import io
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from trainflow.tasks import files
from trainflow.tasks.data.sources import suffix_of
from trainflow.tasks.errors import InputError, writing


def write_blocks(f: BinaryIO, blocks: Iterable[dict[str, np.ndarray]], suffix: str) -> None:
    """The output file, block by block. CSV and Parquet by Arrow's C++ writers (`np.savetxt`
    formats a row at a time in Python and took ten times as long as scoring a 10⁶-row file);
    .npz is a zip of whole arrays, so it is built in memory."""
    blocks = iter(blocks)
    if suffix == ".npz":
        parts = list(blocks)
        np.savez(f, **{name: np.concatenate([p[name] for p in parts]) for name in parts[0]})
        return
    import pyarrow as pa  # only where a table is written: a cached training run never loads it

    first = pa.table(next(blocks))
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        writer: Any = pq.ParquetWriter(f, first.schema)
    else:
        import pyarrow.csv as pa_csv

        # Floats as the shortest text that reads back to the same float64 (what %.17g promised,
        # shorter); the header unquoted unless a name needs quotes, as a spreadsheet writes it.
        plain = all(not set(name) & set(',"\r\n') for name in first.column_names)
        options = pa_csv.WriteOptions(quoting_header="none" if plain else "needed")
        writer = pa_csv.CSVWriter(f, first.schema, write_options=options)
    with writer:
        writer.write_table(first)
        for block in blocks:
            writer.write_table(pa.table(block))


def output_bytes(columns: dict[str, np.ndarray], suffix: str) -> bytes:
    """One block's output file, in memory."""
    buffer = io.BytesIO()
    write_blocks(buffer, [columns], suffix)
    return buffer.getvalue()


def output_location(url: str) -> tuple[Any, str]:
    """`--out`'s filesystem and path, refused (before anything is scored) where the file could
    not be kept: a filesystem that lives in this process's memory is gone when predict exits."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url)
    except (ValueError, ImportError) as exc:  # an unknown protocol, or its package missing
        raise InputError(f"--out {url}: {exc}") from None
    if _in_process(fs):
        raise InputError(
            f"--out {url}: that filesystem keeps its files in this process's memory, gone when "
            "predict exits; write to a local path or a store that outlives the process"
        )
    return fs, path


def _in_process(fs: Any) -> bool:
    from fsspec.implementations.memory import MemoryFileSystem

    while fs is not None:  # a caching or folder wrapper keeps its files where its target does
        if isinstance(fs, MemoryFileSystem):
            return True
        fs = getattr(fs, "fs", None)
    return False


def _is_local(fs: Any) -> bool:
    return fs.protocol in ("file", "local") or "file" in fs.protocol


def write_output(url: str, blocks: Iterable[dict[str, np.ndarray]]) -> None:
    """Whole or not at all: a local file by atomic rename; an object store by one upload of a
    finished local file."""
    suffix = suffix_of(url)
    fs, path = output_location(url)
    with writing(f"the output {url!r}"):
        if _is_local(fs):
            files.make_dirs(Path(path).parent)
            remove_leftovers(Path(path))
            with held_temporary(Path(path)) as f:
                write_blocks(f, blocks, suffix)
        else:
            with tempfile.TemporaryDirectory() as scratch:
                local = Path(scratch) / f"predictions{suffix}"
                with local.open("wb") as f:
                    write_blocks(f, blocks, suffix)
                fs.put_file(str(local), path)


# A temporary output file, named `.<output>.<random>.predict.tmp` beside the output, is held
# under an advisory lock (flock) by its writer from creation to rename. The kernel drops the
# lock when the writer dies, however it dies (SIGKILL too), so a temporary file nobody holds is
# a dead writer's leftover, never a live one's, whatever its age and however many predicts
# write that output at once.
LEFTOVER_SUFFIX = ".predict.tmp"


@contextmanager
def held_temporary(path: Path) -> Iterator[BinaryIO]:
    """A file for `path`'s new bytes, renamed over `path` when the block ends (fsynced, then
    the folder too); an error removes it. Held under its lock until renamed."""
    while True:
        fd, name = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.", suffix=LEFTOVER_SUFFIX
        )
        fcntl.flock(fd, fcntl.LOCK_EX)
        # remove_leftovers may have taken it for a dead writer's between mkstemp and flock.
        if _names(name, fd):
            break
        os.close(fd)
    tmp = Path(name)
    try:
        os.fchmod(fd, files.FILE_MODE)
        with open(fd, "wb", closefd=False) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # still held: no sweep can take it before the rename
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    files.fsync_dir(path.parent)


def remove_leftovers(path: Path) -> list[Path]:
    """Remove the temporary files of `path` that no live writer holds: what a predict killed
    while writing `path` left. Returns them."""
    removed = []
    pattern = f".{glob.escape(path.name)}.*{LEFTOVER_SUFFIX}"
    for candidate in path.parent.glob(pattern):
        try:
            fd = os.open(candidate, os.O_RDONLY)
        except OSError:  # gone meanwhile: renamed by its writer, or removed by another sweep
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _names(str(candidate), fd):
                candidate.unlink()
                removed.append(candidate)
        except OSError:  # held: a live writer's (BlockingIOError), or gone meanwhile
            pass
        finally:
            os.close(fd)
    return removed


def _names(name: str, fd: int) -> bool:
    """Whether `name` is still the file open as `fd`."""
    try:
        return os.path.samestat(os.stat(name), os.fstat(fd))
    except FileNotFoundError:
        return False
