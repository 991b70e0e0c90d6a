"""The cache's bytes: JSON records and checksummed safetensors blobs, on any fsspec filesystem.

    <root>/records/<key>.json           what an entry is: its type, plain fields, blob name
    <root>/blobs/<xxh3-128>.safetensors its tensors, named by their checksum

A record names its blob by checksum alone, never by a path: a cache folder that is moved,
copied, or mounted at different paths by different workers reads the same. Every write is
atomic (a temporary name, then a rename), so a reader sees a whole entry or none; nothing is
ever unpickled.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Self, TypeVar

import fsspec
import xxhash
from fsspec.implementations.local import LocalFileSystem
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import load_file as safetensors_load_file
from safetensors.torch import save as safetensors_save
from safetensors.torch import save_file as safetensors_save_file
from torch import Tensor

from trainflow.tasks.cache.keys import FORMAT, digest_stream, file_chunks, file_digest
from trainflow.tasks.files import FILE_MODE, atomic_write, fsync_dir, make_dirs

KEY = re.compile(r"[a-z][a-z-]*-[0-9a-f]{40}")
BLOB = re.compile(r"[0-9a-f]{32}")
# What a killed writer leaves: a blob's `.tmp-…` (`.tmp-mapped-…` for a conversion), and
# atomic_write's `.<name>.<random>.tmp` (a record, a checkpoint).
TEMPORARY = re.compile(r"\.tmp-.*|\..+\.tmp")
# A leftover modified this recently may be a writer's at work (a conversion still appending,
# a blob renamed whose record is being written): prune leaves it alone.
LEFTOVER_AGE_S = 3600.0


class CorruptEntry(ValueError):
    """A record or blob that is not what it claims to be: treated as a miss, never loaded."""


class Cacheable(Protocol):
    """A stage output: its tensors go to a safetensors blob, the rest to the JSON record."""

    cache_key: str

    def to_cache(self) -> tuple[dict[str, Tensor], dict[str, Any]]: ...

    @classmethod
    def from_cache(cls, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Self: ...


C = TypeVar("C", bound=Cacheable)


@dataclass(frozen=True)
class Entry:
    """One thing in the cache, as `list` shows it."""

    key: str  # a record's key, or a checkpoint's or leftover's path under the root
    created: float  # a file's: its modification time
    record_size: int  # a file's: its size
    blob: str | None
    blob_size: int = 0
    leftover: str = ""  # why no run can use it: a killed writer's temporary file, an unnamed blob

    @property
    def size(self) -> int:
        return self.record_size + self.blob_size


class CacheStore:
    """The cache root on a local disk or any fsspec filesystem."""

    def __init__(self, url: str):
        self.fs, root = fsspec.core.url_to_fs(url)
        self.local = isinstance(self.fs, LocalFileSystem)
        self.root = os.path.abspath(root) if self.local else root.rstrip("/")
        self.url = self.root if self.local else url.rstrip("/")

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def write(self, path: str, data: bytes) -> None:
        if not self.local:
            self.fs.pipe_file(path, data)  # object stores replace a key in one PUT
            return
        make_dirs(os.path.dirname(path))
        atomic_write(path, data)

    def read(self, path: str) -> bytes:
        return self.fs.cat_file(path)

    # --- entries --------------------------------------------------------------------------

    def put(self, key: str, value: Cacheable) -> None:
        """Blob first, then the record that names it: a reader never finds a record whose
        blob is missing (short of pruning, which removes records first)."""
        if hasattr(value, "to_cache_file"):  # a file written already (tasks/mapped.py)
            path, meta = value.to_cache_file()
            blob = self._adopt_blob(path)
            value.cache_file_moved(self.path("blobs", f"{blob['xxh3']}.safetensors"))
        else:
            tensors, meta = value.to_cache()
            blob = self._put_blob(tensors)
        record = {
            "format": FORMAT,
            "artifact": type(value).__qualname__,
            "meta": meta,
            "blob": blob,
            "created": time.time(),
        }
        self.write(self.path("records", f"{key}.json"), json.dumps(record).encode())

    def get(self, key: str, kind: type[C]) -> C | None:
        """The entry under `key` as a `kind`, None if there is none; CorruptEntry if there is
        one that can't be trusted (the caller recomputes and replaces it)."""
        try:
            data = self.read(self.path("records", f"{key}.json"))
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            record = json.loads(data)
            if not isinstance(record, dict) or record.get("format") != FORMAT:
                raise CorruptEntry("not a trainflow cache record")
            if record.get("artifact") != kind.__qualname__:
                raise CorruptEntry(f"holds a {record.get('artifact')!r}, not a {kind.__qualname__}")
            if hasattr(kind, "from_cache_file"):  # mapped, not loaded: verified, then opened
                return kind.from_cache_file(self._blob_path(**record["blob"]), record["meta"])
            tensors = self._get_blob(**record["blob"])
            return kind.from_cache(tensors, record["meta"])
        except CorruptEntry:
            raise
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
            raise CorruptEntry(str(exc)) from exc

    def _put_blob(self, tensors: dict[str, Tensor]) -> dict[str, Any]:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        if not self.local:
            data = safetensors_save(tensors)
            checksum = xxhash.xxh3_128_hexdigest(data)
            self.write(self.path("blobs", f"{checksum}.safetensors"), data)
            return {"xxh3": checksum, "size": len(data)}
        folder = self.path("blobs")
        make_dirs(folder)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
        os.fchmod(fd, FILE_MODE)  # readable by the other users of a shared cache
        os.close(fd)
        try:
            safetensors_save_file(tensors, tmp)  # streamed to disk: no second copy in memory
            with open(tmp, "rb") as f:
                checksum = digest_stream(file_chunks(f))
                os.fsync(f.fileno())
            size = os.path.getsize(tmp)
            os.replace(tmp, self.path("blobs", f"{checksum}.safetensors"))
            fsync_dir(folder)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return {"xxh3": checksum, "size": size}

    def _adopt_blob(self, path: str) -> dict[str, Any]:
        """A finished local file in this cache's blob folder becomes a blob: checksummed, then
        renamed to its checksum (atomic; the same folder, so the same filesystem)."""
        if not self.local or os.path.dirname(os.path.abspath(path)) != self.path("blobs"):
            raise ValueError(f"{path!r} is not a file in {self.path('blobs')!r}")
        with open(path, "rb") as f:
            checksum = digest_stream(file_chunks(f))
        size = os.path.getsize(path)
        os.replace(path, self.path("blobs", f"{checksum}.safetensors"))
        fsync_dir(self.path("blobs"))
        return {"xxh3": checksum, "size": size}

    def _blob_path(self, xxh3: str, size: int) -> str:
        """A local blob's path once its size and checksum are verified."""
        if not self.local:
            raise CorruptEntry("a memory-mapped entry in a remote cache")
        if not isinstance(xxh3, str) or not BLOB.fullmatch(xxh3):
            raise CorruptEntry(f"bad blob name {xxh3!r}")
        path = self.path("blobs", f"{xxh3}.safetensors")
        actual = os.path.getsize(path)
        if actual != size:
            raise CorruptEntry(f"blob {xxh3} is truncated ({actual} of {size} bytes)")
        if file_digest(path) != xxh3:
            raise CorruptEntry(f"blob {xxh3} is corrupted (checksum mismatch)")
        return path

    def _get_blob(self, xxh3: str, size: int) -> dict[str, Tensor]:
        """Verify, then load; a local blob is memory-mapped, so a hit costs no copy."""
        if self.local:
            return safetensors_load_file(self._blob_path(xxh3, size))
        if not isinstance(xxh3, str) or not BLOB.fullmatch(xxh3):
            raise CorruptEntry(f"bad blob name {xxh3!r}")
        path = self.path("blobs", f"{xxh3}.safetensors")
        data = self.read(path)
        if len(data) != size or xxhash.xxh3_128_hexdigest(data) != xxh3:
            raise CorruptEntry(f"blob {xxh3} is truncated or corrupted")
        return safetensors_load(data)

    # --- listing --------------------------------------------------------------------------

    def entries(self) -> Iterator[Entry]:
        """Every record (an unreadable one too: created 0, so pruned first), checkpoint and
        leftover: a killed writer's temporary file, a blob that no record names (a writer
        killed between the blob and its record). Other names are not ours: never listed."""
        named: set[str] = set()
        for info in self._ls("records"):
            name = os.path.basename(info["name"])
            if name.endswith(".json") and KEY.fullmatch(name[: -len(".json")]):
                entry = self._entry(name[: -len(".json")], info)
                if entry.blob:
                    named.add(entry.blob)
                yield entry
            elif TEMPORARY.fullmatch(name):
                yield from self._file(info["name"], "a killed writer's temporary file")
        if self.fs.exists(self.path("checkpoints")):
            for path in self.fs.find(self.path("checkpoints")):
                temporary = TEMPORARY.fullmatch(os.path.basename(path))
                yield from self._file(path, "a killed writer's temporary file" if temporary else "")
        # Listed after the records: a blob renamed since then has a new mtime, so it is young.
        for info in self._ls("blobs"):
            name = os.path.basename(info["name"])
            blob = name.removesuffix(".safetensors")
            if TEMPORARY.fullmatch(name):
                yield from self._file(info["name"], "a killed writer's temporary file")
            elif blob != name and BLOB.fullmatch(blob) and blob not in named:
                yield from self._file(info["name"], "a blob no record names")

    def _ls(self, folder: str) -> list[dict[str, Any]]:
        path = self.path(folder)
        return self.fs.ls(path, detail=True) if self.fs.exists(path) else []

    def _file(self, path: str, leftover: str) -> Iterator[Entry]:
        relative = path[len(self.root) :].lstrip("/")
        with suppress(FileNotFoundError):  # renamed or deleted since the listing: not there
            modified = self.fs.modified(path).timestamp()
            yield Entry(relative, modified, self.fs.size(path), None, leftover=leftover)

    def changed(self, entry: Entry) -> bool:
        """Whether a file listed as `entry` was rewritten (a new mtime) or removed since."""
        try:
            return self.fs.modified(self.path(entry.key)).timestamp() != entry.created
        except FileNotFoundError:
            return True

    def _entry(self, key: str, info: dict[str, Any]) -> Entry:
        try:
            record = json.loads(self.read(info["name"]))
            blob = record["blob"]
            return Entry(key, float(record["created"]), info["size"], blob["xxh3"], blob["size"])
        except (ValueError, KeyError, TypeError, OSError):
            return Entry(key, 0.0, info["size"], None)

    def remove(self, entry: Entry) -> None:
        """Remove a record (not its blob, which other records may share), a checkpoint or a
        leftover."""
        if "/" in entry.key:  # a file's path; a record's key never holds one
            path = self.path(entry.key)
        else:
            path = self.path("records", f"{entry.key}.json")
        with suppress(FileNotFoundError):  # another prune got there first
            self.fs.rm_file(path)

    def remove_blob(self, xxh3: str) -> None:
        with suppress(FileNotFoundError):
            self.fs.rm_file(self.path("blobs", f"{xxh3}.safetensors"))
