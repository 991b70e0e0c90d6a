"""Cache keys: what a stage's output depends on, as one stable hash.

A key covers the stage's name, the code that computes it (tasks/cache/code_keys.py: every module
the stage's code and the values it is given can reach, as this process imported them; the
Python version and the version of every installed library they import), and the named
inputs: files by their content, upstream outputs by their own key, plain values as they are.
It never covers a path, a process or a clock.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import xxhash
from torch import Tensor

from trainflow.tasks.cache.code_keys import CodeKey, UnreadableCode, code_key

# The format of the cache's records and keys, part of every key: an entry of another format is
# never read. Bumped whenever a key or a record changes meaning (module names included).
FORMAT = 3
CHUNK = 1 << 24
# A file changed within this many seconds of being hashed may change again within the same
# timestamp tick (ext4 ticks are ~4 ms, others up to 2 s): such a digest is never memoised.
SETTLE_S = 2.0


class NoCacheKey(Exception):
    """The inputs can't be fingerprinted (e.g. the data file is unreadable): don't cache."""


# --- file contents ------------------------------------------------------------------------


def digest_stream(chunks: Iterator[bytes]) -> str:
    h = xxhash.xxh3_128()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


def file_chunks(f: Any) -> Iterator[bytes]:
    while chunk := f.read(CHUNK):
        yield chunk


_digests: dict[tuple[int, int, int, int, int], str] = {}


def file_digest(path: str | Path) -> str:
    """xxh3-128 of a local file's bytes (≈10 GB/s), memoised per process.

    The memo is keyed by (device, inode, size, mtime, ctime). ctime moves on every write and
    can't be set back (`os.utime` sets mtime only), so a same-size edit with its mtime
    restored still misses; and, as git does with its "racy" entries, a file that changed
    within SETTLE_S of being hashed isn't memoised at all, since a second edit in the same
    timestamp tick would leave every field as it was.
    """
    before = os.stat(path)
    ident = (before.st_dev, before.st_ino, before.st_size, before.st_mtime_ns, before.st_ctime_ns)
    if ident in _digests:
        return _digests[ident]
    with open(path, "rb") as f:
        digest = digest_stream(file_chunks(f))
    after = os.stat(path)
    unchanged = ident == (
        after.st_dev,
        after.st_ino,
        after.st_size,
        after.st_mtime_ns,
        after.st_ctime_ns,
    )
    if unchanged and time.time() - max(after.st_mtime, after.st_ctime) > SETTLE_S:
        if len(_digests) > 4096:  # one entry per file version seen: bound a long process's
            _digests.clear()
        _digests[ident] = digest
    return digest


def tensor_digest(tensor: Tensor) -> str:
    data = tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy()
    return xxhash.xxh3_128_hexdigest(memoryview(data))


# --- inputs -------------------------------------------------------------------------------


def fingerprint(value: Any) -> Any:
    """A JSON-able, process-independent stand-in for a key input."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, tuple | list):
        return [fingerprint(v) for v in value]
    if isinstance(value, dict):
        return {str(k): fingerprint(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if getattr(value, "cache_key", None):  # an upstream stage's output: its key stands for it
        return {"artifact": value.cache_key}
    if isinstance(value, Tensor):
        return {"dtype": str(value.dtype), "shape": list(value.shape), "xxh3": tensor_digest(value)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = (f.name for f in dataclasses.fields(value) if f.name != "cache_key")
        return {
            "type": type(value).__qualname__,
            **{n: fingerprint(getattr(value, n)) for n in fields},
        }
    raise NoCacheKey(f"no stable fingerprint for {type(value).__qualname__}")


def value_types(value: Any) -> list[type]:
    """The classes of the objects among a key's inputs: their methods may run in the stage, so
    their modules are part of its code (tasks/cache/code_keys.py)."""
    if value is None or isinstance(value, bool | int | float | str | bytes | Tensor):
        return []
    if isinstance(value, tuple | list):
        return [t for v in value for t in value_types(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in value_types(v)]
    found = [type(value)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            found += value_types(getattr(value, f.name))
    return found


def keyed(
    stage: str, fn: Callable[..., Any], inputs: dict[str, Any], *also: Any
) -> tuple[str, CodeKey]:
    """`<stage>-<hash>` for what `fn(**inputs)` returns as stage `stage`, and the code it
    covers (to check, before storing, that the code has not changed since: code_keys); `also`,
    more code the output depends on (the stage's own module: what its body runs besides `fn`)."""
    try:
        code = code_key(fn, *also, value_types=dict.fromkeys(value_types(inputs)))
    except UnreadableCode as exc:
        raise NoCacheKey(str(exc)) from None
    payload = {
        "stage": stage,
        "code": code.digest,
        "inputs": fingerprint(inputs),
        "format": FORMAT,
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return f"{stage}-{digest[:40]}", code


def stage_key(stage: str, fn: Callable[..., Any], inputs: dict[str, Any]) -> str:
    return keyed(stage, fn, inputs)[0]
