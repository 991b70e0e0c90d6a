"""The stage cache: content-addressed keys, safetensors + JSON entries, never a pickle.

Prefect does the bookkeeping (a hit is a `Cached` task state); this module decides what a
key covers (`StageCache`), how an output becomes bytes (`ArtifactSerializer`: tensors to a
checksummed safetensors blob, the rest to JSON) and where bytes go (`CacheStorage`: any
fsspec URL, atomic writes, and only records of our own format are ever handed to Prefect).

Layout under the cache root:
    records/<stage>-<hash>        Prefect's result record (JSON) holding our manifest
    blobs/<xxh3-128>.safetensors  the tensors of one entry, named by their checksum
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import json
import logging
import os
import re
import tempfile
import time
import types
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, Self, TypeVar

import fsspec
import torch
import xxhash
from fsspec.implementations.local import LocalFileSystem
from prefect import get_run_logger
from prefect.cache_policies import CachePolicy
from prefect.exceptions import MissingContextError
from prefect.filesystems import WritableFileSystem
from prefect.serializers import Serializer
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import load_file as safetensors_load_file
from safetensors.torch import save as safetensors_save
from safetensors.torch import save_file as safetensors_save_file
from torch import Tensor

from tasks.errors import writing
from tasks.files import FILE_MODE, atomic_write
from tasks.rules import DEFAULT_CACHE_DIR

log = logging.getLogger("trainflow.cache")

PROJECT_PACKAGES = ("tasks", "flows")
SERIALIZER_TYPE = "trainflow-artifact"
FORMAT = 1
KEY_PATTERN = re.compile(r"[a-z][a-z-]*-[0-9a-f]{40}")
CHUNK = 1 << 24


class NoCacheKey(Exception):
    """The inputs can't be fingerprinted (e.g. the data file is unreadable): don't cache."""


# --- fingerprints -------------------------------------------------------------------------


def torch_version() -> str:
    """major.minor: a patch release does not change what a stage computes."""
    return ".".join(torch.__version__.split("+")[0].split(".")[:2])


def _digest_stream(chunks: Iterator[bytes]) -> str:
    h = xxhash.xxh3_128()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


def _file_chunks(f: Any) -> Iterator[bytes]:
    while chunk := f.read(CHUNK):
        yield chunk


@lru_cache(maxsize=256)
def _local_digest(path: str, size: int, mtime_ns: int, inode: int) -> str:
    # Memoised per process only, by (size, mtime, inode): the key itself is always content.
    with open(path, "rb") as f:
        return _digest_stream(_file_chunks(f))


def content_digest(url: str) -> str:
    """xxh3-128 of a file's bytes (≈10 GB/s): the data's identity, whatever its name."""
    try:
        fs, path = fsspec.core.url_to_fs(url)
        if isinstance(fs, LocalFileSystem):
            st = os.stat(path)
            return _local_digest(path, st.st_size, st.st_mtime_ns, st.st_ino)
        with fs.open(path, "rb") as f:
            return _digest_stream(_file_chunks(f))
    except (OSError, ValueError) as exc:
        raise NoCacheKey(f"cannot read {url!r}: {exc}") from exc


def tensor_digest(tensor: Tensor) -> str:
    data = tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy()
    return xxhash.xxh3_128_hexdigest(memoryview(data))


def fingerprint(value: Any) -> Any:
    """A JSON-able, process-independent stand-in for a task input."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, tuple | list):
        return [fingerprint(v) for v in value]
    if isinstance(value, dict):
        return {str(k): fingerprint(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, Tensor):
        return {"dtype": str(value.dtype), "shape": list(value.shape), "xxh3": tensor_digest(value)}
    if getattr(value, "cache_key", None):  # an upstream stage's output: its key stands for it
        return {"artifact": value.cache_key}
    if isinstance(value, Path | torch.device):
        return str(value)
    if dataclasses.is_dataclass(value):
        return {"type": type(value).__qualname__,
                **{f.name: fingerprint(getattr(value, f.name)) for f in dataclasses.fields(value)
                   if f.name != "cache_key"}}  # fmt: skip
    raise NoCacheKey(f"no stable fingerprint for {type(value).__qualname__}")


def _is_project(obj: Any, packages: tuple[str, ...]) -> bool:
    module = obj.__name__ if isinstance(obj, types.ModuleType) else getattr(obj, "__module__", "")
    return isinstance(module, str) and module.split(".")[0] in packages


def _code_objects(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_objects(const)


def _functions_of(obj: Any) -> list[types.FunctionType]:
    if inspect.isclass(obj):
        members = [getattr(m, "__func__", m) for m in vars(obj).values()]
        return [inspect.unwrap(m) for m in members if inspect.isfunction(m)]
    return [inspect.unwrap(obj)] if inspect.isfunction(obj) else []


def _named_values(value: Any, names: tuple[str, ...], packages: tuple[str, ...]) -> Iterator[Any]:
    """What a global name contributes: project code to follow, or a constant's repr."""
    if hasattr(value, "fn") and callable(value.fn):  # a Prefect Task: follow its function
        value = value.fn
    if isinstance(value, types.ModuleType):
        if _is_project(value, packages):  # `module.helper` access: the attributes it names
            for name in names:
                yield from _named_values(getattr(value, name, None), (), packages)
    elif inspect.isfunction(value) or inspect.isclass(value):
        if _is_project(value, packages):
            yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield repr(key)
            yield from _named_values(item, names, packages)
    elif isinstance(value, tuple | list | frozenset | set):
        for item in value:
            yield from _named_values(item, names, packages)
    elif value is None or isinstance(value, bool | int | float | str | bytes):
        yield repr(value)


def code_fingerprint(fn: Callable[..., Any], packages: tuple[str, ...] = PROJECT_PACKAGES) -> str:
    """Hash of `fn`'s source and every project function, class and constant it reaches.

    Editing a helper in tasks/ changes the fingerprint of exactly the stages that call it,
    directly or through other helpers; library code is covered by the torch version instead.
    """
    return _code_fingerprint(_canonical(inspect.unwrap(getattr(fn, "fn", fn))), packages)


def _canonical(obj: Any) -> Any:
    """The object its module defines under its name.

    A function shipped to a Dask or Ray worker can arrive rebuilt, with no source file to
    read (`<dynamic-code>`); the module's own copy, imported there, has one.
    """
    try:
        target: Any = importlib.import_module(obj.__module__)
        for part in obj.__qualname__.split("."):
            target = getattr(target, part)
    except (AttributeError, ImportError, TypeError):
        return obj  # e.g. a function defined inside another: keep what we were given
    return inspect.unwrap(getattr(target, "fn", target))  # a Task stands for its function


@cache
def _code_fingerprint(fn: Callable[..., Any], packages: tuple[str, ...]) -> str:
    sources: dict[str, str] = {}
    constants: set[str] = set()
    pending: list[Any] = [fn]
    while pending:
        obj = pending.pop()
        name = f"{obj.__module__}.{obj.__qualname__}"
        if name in sources:
            continue
        try:
            sources[name] = inspect.getsource(obj)
        except (OSError, TypeError):
            sources[name] = ""  # built at run time (e.g. a dataclass __init__): no source
        for function in map(_canonical, _functions_of(obj)):
            names = tuple(n for c in _code_objects(function.__code__) for n in c.co_names)
            for global_name in dict.fromkeys(names):
                if global_name not in function.__globals__:
                    continue
                for found in _named_values(function.__globals__[global_name], names, packages):
                    if isinstance(found, str):
                        constants.add(f"{global_name}={found}")
                    else:
                        pending.append(found)
    payload = json.dumps([sorted(sources.items()), sorted(constants)])
    return hashlib.sha256(payload.encode()).hexdigest()


def stage_key(stage: str, fn: Callable[..., Any], inputs: dict[str, Any]) -> str:
    """`<stage>-<hash>` over the stage's code, torch major.minor and what its output depends on."""
    payload = json.dumps(
        {"stage": stage, "code": code_fingerprint(fn), "torch": torch_version(),
         "inputs": fingerprint(inputs), "format": FORMAT},
        sort_keys=True,
    )  # fmt: skip
    return f"{stage}-{hashlib.sha256(payload.encode()).hexdigest()[:40]}"


@dataclass
class StageCache(CachePolicy):
    """A Prefect cache policy: key = stage_key over the inputs that `identity` keeps.

    `identity` maps the task's inputs to what its output depends on (dropping the run
    folder, replacing a path by the file's content digest…); by default, all of them.
    """

    identity: Callable[[dict[str, Any]], dict[str, Any]] | None = None

    def key_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return self.identity(dict(inputs)) if self.identity else dict(inputs)

    def key_for(self, task: Any, inputs: dict[str, Any]) -> str | None:
        try:
            return stage_key(task.name, task.fn, self.key_inputs(inputs))
        except NoCacheKey as exc:
            log.info("%s: not cached (%s)", task.name, exc)
            return None

    def compute_key(
        self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str | None:
        return self.key_for(task_ctx.task, inputs)


@dataclass
class KnownKey(CachePolicy):
    """A key computed already (by Run.call, which needs it too): hashing a large remote data
    file once per stage call is enough."""

    key: str = ""

    def compute_key(
        self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str | None:
        return self.key


# --- what an entry holds ------------------------------------------------------------------


class Cacheable(Protocol):
    """A stage output: tensors go to safetensors, everything else to JSON."""

    cache_key: str

    def to_cache(self) -> tuple[dict[str, Tensor], dict[str, Any]]: ...

    @classmethod
    def from_cache(cls, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Self: ...


ARTIFACTS: dict[str, type] = {}


C = TypeVar("C", bound=type)


def cacheable(cls: C) -> C:
    """Register a stage output class: only registered names are ever rebuilt from a record."""
    ARTIFACTS[cls.__qualname__] = cls
    return cls


def with_key(value: Any, key: str | None) -> Any:
    if key and dataclasses.is_dataclass(value) and hasattr(value, "cache_key"):
        return dataclasses.replace(value, cache_key=key)
    return value


# --- storage ------------------------------------------------------------------------------


class CorruptEntry(ValueError):
    pass


def warn(message: str) -> None:
    """To the task run's log (the terminal and the Prefect UI) when there is one."""
    try:
        get_run_logger().warning(message)
    except MissingContextError:
        log.warning(message)


class CacheStore:
    """The cache root on any fsspec filesystem; every write is atomic."""

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
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write(path, data)

    def read(self, path: str) -> bytes:
        return self.fs.cat_file(path)

    def put_blob(self, tensors: dict[str, Tensor]) -> dict[str, Any]:
        """Write tensors as safetensors named by their xxh3-128; returns the manifest entry."""
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        if self.local:
            os.makedirs(self.path("blobs"), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path("blobs"), prefix=".tmp-")
            os.fchmod(fd, FILE_MODE)  # readable by the other users of a shared cache
            os.close(fd)
            try:
                safetensors_save_file(tensors, tmp)  # streamed to disk: no second copy in memory
                with open(tmp, "rb") as f:
                    checksum = _digest_stream(_file_chunks(f))
                    os.fsync(f.fileno())
                size = os.path.getsize(tmp)
                os.replace(tmp, self.path("blobs", f"{checksum}.safetensors"))
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        else:
            data = safetensors_save(tensors)
            checksum, size = xxhash.xxh3_128_hexdigest(data), len(data)
            self.write(self.path("blobs", f"{checksum}.safetensors"), data)
        return {"xxh3": checksum, "size": size}

    def get_blob(self, xxh3: str, size: int) -> dict[str, Tensor]:
        """Verify and load a blob; local blobs are memory-mapped (a hit costs no copy)."""
        if not re.fullmatch(r"[0-9a-f]{32}", xxh3):
            raise CorruptEntry(f"bad blob name {xxh3!r}")
        path = self.path("blobs", f"{xxh3}.safetensors")
        if self.local:
            _verify_local_blob(path, xxh3, size, *_stat(path))
            return safetensors_load_file(path)
        data = self.read(path)
        if len(data) != size or xxhash.xxh3_128_hexdigest(data) != xxh3:
            raise CorruptEntry(f"blob {xxh3} is truncated or corrupted")
        return safetensors_load(data)


def _stat(path: str) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ino


@lru_cache(maxsize=1024)
def _verify_local_blob(
    path: str, xxh3: str, size: int, actual_size: int, mtime_ns: int, inode: int
) -> None:
    # Prefect reads a record twice per hit (exists, then read): verify each blob once.
    if actual_size != size:
        raise CorruptEntry(f"blob {xxh3} is truncated ({actual_size} of {size} bytes)")
    with open(path, "rb") as f:
        if _digest_stream(_file_chunks(f)) != xxh3:
            raise CorruptEntry(f"blob {xxh3} is corrupted (checksum mismatch)")


class ArtifactSerializer(Serializer):
    """Stage outputs as a JSON manifest plus a safetensors blob; nothing is ever unpickled."""

    type: Literal["trainflow-artifact"] = SERIALIZER_TYPE
    root: str = DEFAULT_CACHE_DIR

    def dumps(self, obj: Cacheable) -> bytes:  # type: ignore[override]
        name = type(obj).__qualname__
        if ARTIFACTS.get(name) is not type(obj):
            raise TypeError(f"{name} is not a registered cacheable stage output")
        tensors, meta = obj.to_cache()
        with writing(f"the cache at {self.root!r} (the run goes on without this entry)"):
            blob = CacheStore(self.root).put_blob(tensors)
        manifest = {"format": FORMAT, "artifact": name, "meta": meta, "blob": blob,
                    "created": time.time()}  # fmt: skip
        return json.dumps(manifest).encode()

    def loads(self, blob: bytes) -> Any:
        try:
            manifest = json.loads(blob)
            if (
                not isinstance(manifest, dict)
                or manifest.get("format") != FORMAT
                or (manifest.get("artifact") not in ARTIFACTS)
            ):
                raise CorruptEntry("not a trainflow cache manifest")
            tensors = CacheStore(self.root).get_blob(**manifest["blob"])
        except (CorruptEntry, OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
            # Prefect turns this into a miss: the stage recomputes and replaces the entry.
            warn(f"unusable cache entry, recomputing it: {exc}")
            raise CorruptEntry(str(exc)) from exc
        return ARTIFACTS[manifest["artifact"]].from_cache(tensors, manifest["meta"])


class CacheStorage(WritableFileSystem):
    """Prefect result storage over CacheStore: atomic writes, and reads that refuse anything
    but a record of our own serializer, so Prefect's pickle fallback is never reached."""

    _block_type_name: ClassVar[str] = "Trainflow Cache"
    root: str = DEFAULT_CACHE_DIR

    def _store(self) -> CacheStore:
        return CacheStore(self.root)

    def _resolve_path(self, path: str) -> str:
        # Prefect names a record by this full path and stores it relative to _resolve_path("").
        store = self._store()
        return store.path("records", path) if path else store.path("records")

    def read_path(self, path: str, **_: Any) -> bytes:  # _sync: Prefect's calling convention
        store = self._store()
        key = os.path.basename(path)
        data = store.read(store.path("records", key))  # FileNotFoundError: a plain miss
        try:
            record = json.loads(data)
            serializer = record["metadata"]["serializer"]["type"]
        except (ValueError, KeyError, TypeError):
            serializer = None
        if not KEY_PATTERN.fullmatch(key) or serializer != SERIALIZER_TYPE:
            warn(f"cache entry {key} is not a trainflow record; ignoring it")
            raise CorruptEntry(f"cache entry {key} is not a trainflow record")
        return data

    def write_path(self, path: str, content: bytes, **_: Any) -> str:
        store = self._store()
        target = store.path("records", os.path.basename(path))
        with writing(f"the cache at {self.root!r} (the run goes on without this entry)"):
            store.write(target, content)
        return target

    async def aread_path(self, path: str) -> bytes:
        return self.read_path(path)

    async def awrite_path(self, path: str, content: bytes) -> str:
        return self.write_path(path, content)


# --- listing and pruning ------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    key: str
    created: float
    record_size: int
    blob: str | None
    blob_size: int = 0

    @property
    def size(self) -> int:
        return self.record_size + self.blob_size


def _checkpoint_entries(store: CacheStore) -> list[Entry]:
    """Checkpoint files, as entries keyed by their path under the cache root."""
    if not store.fs.exists(store.path("checkpoints")):
        return []
    entries = []
    for path in store.fs.find(store.path("checkpoints")):
        relative = path[len(store.root) :].lstrip("/")
        modified = store.fs.modified(path).timestamp()
        entries.append(Entry(relative, modified, store.fs.size(path), None))
    return entries


def list_entries(url: str) -> list[Entry]:
    """Cache entries and checkpoint files, oldest first."""
    store = CacheStore(url)
    entries = _checkpoint_entries(store)
    if not store.fs.exists(store.path("records")):
        return sorted(entries, key=lambda e: e.created)
    for info in store.fs.ls(store.path("records"), detail=True):
        key = os.path.basename(info["name"])
        if not KEY_PATTERN.fullmatch(key):
            continue
        try:
            record = json.loads(store.read(info["name"]))
            manifest = json.loads(record["result"])
            blob = manifest["blob"]
            entry = Entry(key, float(manifest["created"]), info["size"], blob["xxh3"], blob["size"])
        except (ValueError, KeyError, TypeError, OSError):
            entry = Entry(key, 0.0, info["size"], None)  # unreadable: oldest, pruned first
        entries.append(entry)
    return sorted(entries, key=lambda e: e.created)


def prune(url: str, older_than_s: float | None = None, max_bytes: int | None = None) -> list[Entry]:
    """Remove the oldest entries: all older than `older_than_s`, then until ≤ `max_bytes`.

    A record goes before its blob, so a concurrent reader sees a miss, never half an entry;
    a blob still named by a kept record (equal outputs share one) stays, and counts once.
    """
    store = CacheStore(url)
    entries = list_entries(url)
    users = Counter(e.blob for e in entries if e.blob)
    blob_sizes = {e.blob: e.blob_size for e in entries if e.blob}
    total = sum(e.record_size for e in entries) + sum(blob_sizes.values())
    now = time.time()
    doomed = []
    for entry in entries:
        too_old = older_than_s is not None and now - entry.created > older_than_s
        too_big = max_bytes is not None and total > max_bytes
        if not (too_old or too_big):
            continue
        doomed.append(entry)
        is_checkpoint = entry.key.startswith("checkpoints/")
        store.fs.rm_file(
            store.path(entry.key) if is_checkpoint else store.path("records", entry.key)
        )
        total -= entry.record_size
        if entry.blob:
            users[entry.blob] -= 1
            if users[entry.blob] == 0:
                total -= entry.blob_size
                blob = store.path("blobs", f"{entry.blob}.safetensors")
                if store.fs.exists(blob):
                    store.fs.rm_file(blob)
    return doomed
