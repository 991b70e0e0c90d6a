"""Data files by local path or fsspec URL: checked once, read from a remote store at most once.

A remote file is downloaded into a local temporary file the first time anything needs its
bytes, hashed along the way, so its content key and its loading share one transfer. With
`--data-identity version` a remote file's key comes from the store's own version metadata
(ETag, version id, or size and modification time) and a cache hit downloads nothing.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import IO, Any, Literal

import fsspec
import xxhash
from fsspec.implementations.local import LocalFileSystem

from trainflow.tasks.cache.keys import CHUNK, file_digest
from trainflow.tasks.errors import InputError

Identity = Literal["content", "version"]
# fsspec's info() fields that name one version of an object, most specific first.
VERSION_FIELDS = ("VersionId", "version_id", "generation", "ETag", "etag", "md5Hash", "md5")
# Else a size and a modification time (S3, Azure, GCS, local, in-memory).
MODIFIED_FIELDS = ("LastModified", "last_modified", "updated", "mtime", "created")


def suffix_of(url: str) -> str:
    return PurePosixPath(url.split("?", 1)[0]).suffix.lower()


class DataFile:
    """One data file; use as a context manager, so a downloaded copy is removed afterwards."""

    def __init__(self, url: str):
        self.url = url
        try:
            self.fs, self.path = fsspec.core.url_to_fs(url)
            info = self.fs.info(self.path)
        except FileNotFoundError:
            raise InputError(f"data file {url!r}: not found") from None
        except PermissionError:
            raise InputError(f"data file {url!r}: permission denied") from None
        except (OSError, ValueError, ImportError) as exc:
            raise InputError(f"data file {url!r}: cannot read ({_reason(exc)})") from None
        if info.get("type") == "directory":
            raise InputError(f"data file {url!r}: is a directory, not a file")
        if not info.get("size"):
            raise InputError(f"data file {url!r}: file is empty")
        self.info = info
        self.local = isinstance(self.fs, LocalFileSystem)
        self._copy: str | None = None
        self._digest: str | None = None

    def __enter__(self) -> DataFile:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._copy is not None:
            Path(self._copy).unlink(missing_ok=True)
            self._copy = None

    @property
    def size(self) -> int:
        return int(self.info["size"])

    def local_path(self) -> str:
        """A local path to the bytes: the file itself, or a copy downloaded (once) now."""
        if self.local:
            return self.path
        if self._copy is None:
            self._download()
        assert self._copy is not None
        return self._copy

    def open(self) -> IO[bytes]:
        """The bytes, as a binary file; an OS error is a one-line InputError naming the file."""
        with self._reading():
            return open(self.local_path(), "rb")

    @contextmanager
    def _reading(self) -> Iterator[None]:
        try:
            yield
        except PermissionError:
            raise InputError(f"data file {self.url!r}: permission denied") from None
        except OSError as exc:
            raise InputError(f"data file {self.url!r}: cannot read ({_reason(exc)})") from None

    def identity(self, how: Identity) -> dict[str, Any]:
        """What the file's data is, for a cache key: its bytes, or its version in the store."""
        if self.local:
            with self._reading():
                return {"content": file_digest(self.path)}
        if how == "version":
            for field in VERSION_FIELDS:
                if self.info.get(field):
                    return {"version": f"{field}={self.info[field]}", "url": self.url}
            for field in MODIFIED_FIELDS:
                if self.info.get(field):
                    stamp = f"size={self.size},{field}={self.info[field]}"
                    return {"version": stamp, "url": self.url}
            # Nothing names a version: fall through to the content, which always does.
        self.local_path()
        return {"content": self._digest}

    def _download(self) -> None:
        fd, tmp = tempfile.mkstemp(prefix="trainflow-data-", suffix=suffix_of(self.url))
        digest = xxhash.xxh3_128()
        try:
            with self._reading(), os.fdopen(fd, "wb") as out, self.fs.open(self.path, "rb") as f:
                while chunk := f.read(CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._copy, self._digest = tmp, digest.hexdigest()


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
