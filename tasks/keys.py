"""Cache keys: what a stage's output depends on, as one stable hash.

A key covers the stage's name, the code that computes it (every project function, class and
constant reachable from it, as a normalized AST: comments and formatting don't count), torch's
major.minor version, and the named inputs: files by their content, upstream outputs by their own
key, plain values as they are. It never covers a path, a process or a clock.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import enum
import functools
import hashlib
import importlib
import inspect
import json
import linecache
import os
import re
import sys
import textwrap
import threading
import time
import types
from collections.abc import Callable, Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
import xxhash
from torch import Tensor

PROJECT_PACKAGES = ("tasks", "flows")
FORMAT = 2  # of the cache's records; part of every key, so a new format never reads an old one
CHUNK = 1 << 24
# A file changed within this many seconds of being hashed may change again within the same
# timestamp tick (ext4 ticks are ~4 ms, others up to 2 s): such a digest is never memoised.
SETTLE_S = 2.0


def _memo_dir() -> Path | None:
    """Where parsed sources are memoised (_definitions): derived data, safe to delete.
    TRAINFLOW_CODE_MEMO_DIR if set (the tests keep theirs in their session folder)."""
    if chosen := os.environ.get("TRAINFLOW_CODE_MEMO_DIR"):
        return Path(chosen)
    try:
        return (
            Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "trainflow" / "code"
        )
    except RuntimeError:  # no home directory: no memo
        return None


MEMO_DIR = _memo_dir()
# This module's own code: how a source is normalized, part of every memo's digest.
_NORMALIZER = Path(__file__).read_text()


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


def torch_version() -> str:
    """major.minor: a patch release does not change what a stage computes."""
    return ".".join(version("torch").split("+")[0].split(".")[:2])


def stage_key(stage: str, fn: Callable[..., Any], inputs: dict[str, Any]) -> str:
    """`<stage>-<hash>`: what `fn(**inputs)` returns, for the stage named `stage`."""
    payload = {
        "stage": stage,
        "code": code_fingerprint(fn),
        "torch": torch_version(),
        "inputs": fingerprint(inputs),
        "format": FORMAT,
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return f"{stage}-{digest[:40]}"


# --- code ---------------------------------------------------------------------------------


def code_fingerprint(fn: Callable[..., Any], packages: tuple[str, ...] = PROJECT_PACKAGES) -> str:
    """Hash of `fn`'s code and of every function, class and constant of `packages` it reaches.

    Editing a helper changes the fingerprint of exactly the stages that reach it, directly or
    through other helpers, constants or base classes. Library code is named, not read: a
    constant that maps a name to `torch.nn.L1Loss` changes the key when it maps to another
    class; what L1Loss computes is covered by the torch version.
    """
    return _code_fingerprint(_canonical(inspect.unwrap(getattr(fn, "fn", fn))), packages)


def _is_project(obj: Any, packages: tuple[str, ...]) -> bool:
    module = obj.__name__ if isinstance(obj, types.ModuleType) else getattr(obj, "__module__", "")
    return isinstance(module, str) and module.split(".")[0] in packages


def _canonical(obj: Any) -> Any:
    """The object its module defines under its name.

    A function shipped to a Dask or Ray worker can arrive rebuilt, with no source file to
    read; the module's own copy, imported there, has one.
    """
    try:
        target: Any = importlib.import_module(obj.__module__)
        for part in obj.__qualname__.split("."):
            target = getattr(target, part)
    except (AttributeError, ImportError, TypeError):
        return obj  # e.g. a function defined inside another: keep what we were given
    target = getattr(target, "fn", target)  # a Prefect task stands for its function
    target = getattr(target, "fget", target)  # a property, for its getter
    return inspect.unwrap(getattr(target, "__func__", target))  # a class/static method


class _DropDocstrings(ast.NodeTransformer):
    def _strip(self, node: Any) -> Any:
        self.generic_visit(node)
        first = node.body[0] if node.body else None
        value = first.value if isinstance(first, ast.Expr) else None
        if isinstance(value, ast.Constant) and isinstance(value.value, str):  # a docstring
            node.body = node.body[1:] or [ast.Pass()]
        return node

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = visit_Module = _strip


def normalized_source(obj: Any) -> str:
    """The AST of `obj`'s source without comments, formatting or docstrings."""
    found = _definition(obj)
    if found is not None:
        return found
    try:
        source = textwrap.dedent(inspect.getsource(obj))
    except (OSError, TypeError):
        return ""  # built at run time (e.g. a dataclass __init__): its class's source covers it
    try:
        tree = ast.parse(source)
    except SyntaxError:  # a lambda's source line can hold more than the lambda
        return source
    return ast.dump(_DropDocstrings().visit(tree), annotate_fields=False)


def _definition(obj: Any) -> str | None:
    """normalized_source of a function or class, from its file parsed once per process (and
    per version of the file) rather than once per object, as inspect.getsource does: a third
    of a cached run's key time. None where the file doesn't say (a lambda, no file)."""
    try:
        filename = inspect.getsourcefile(obj)
        qualname = obj.__qualname__
    except (AttributeError, TypeError):
        return None
    if not filename:
        return None
    linecache.checkcache(filename)  # what inspect.getsource reads, as fresh as it has it
    candidates = _definitions(filename, "".join(linecache.getlines(filename))).get(qualname, [])
    if inspect.isclass(obj):  # the first class of that name, as inspect.getsource finds it
        return candidates[0][1] if candidates else None
    first_line = getattr(getattr(obj, "__code__", None), "co_firstlineno", None)
    return next((dump for line, dump in candidates if line == first_line), None)


@functools.lru_cache(maxsize=64)
def _definitions(filename: str, text: str) -> dict[str, list[tuple[int, str]]]:
    """Each def and class of a module's text, normalized (docstrings dropped, as an AST dump),
    by qualified name, with its first line (decorators included).

    Parsing and dumping the 14 files a cached run's keys read is ≈ 0.3 s, so the result is
    also kept on disk (MEMO_DIR, one memo per source path), under a digest of everything it is
    a function of: the text itself, the Python that parses it and this module's code, which
    normalizes it. A memo made from any other text, Python or normalizer is never used
    (tests/test_keys.py); an unreadable or unwritable memo costs the time, never the key.
    """
    if MEMO_DIR is None:
        return _parse_definitions(text)
    memo = MEMO_DIR / f"{_digest(filename)[:32]}.json"
    digest = _digest(sys.version, _NORMALIZER, text)
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        stored = json.loads(memo.read_text())
        if stored["digest"] == digest:
            return {
                name: [(line, dump) for line, dump in found]
                for name, found in stored["definitions"].items()
            }
    found = _parse_definitions(text)
    with contextlib.suppress(OSError):
        MEMO_DIR.mkdir(parents=True, exist_ok=True)
        scratch = memo.with_name(f"{memo.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        scratch.write_text(json.dumps({"digest": digest, "file": filename, "definitions": found}))
        os.replace(scratch, memo)  # whole or absent: a reader never sees half a memo
        _prune_memos(MEMO_DIR)
    return found


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode("utf-8", "surrogatepass")).hexdigest()


def _prune_memos(folder: Path, keep: int = 512) -> None:
    """The newest `keep` memos: one per source path, but throwaway paths (tests) add up."""
    memos = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in memos[keep:]:
        old.unlink(missing_ok=True)


def _parse_definitions(text: str) -> dict[str, list[tuple[int, str]]]:
    try:
        tree = _DropDocstrings().visit(ast.parse(text))
    except SyntaxError:
        return {}
    found: dict[str, list[tuple[int, str]]] = {}

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                qualname = prefix + node.name
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                dump = ast.dump(ast.Module(body=[node], type_ignores=[]), annotate_fields=False)
                found.setdefault(qualname, []).append((first, dump))
                inner = ".<locals>." if not isinstance(node, ast.ClassDef) else "."
                visit(node.body, qualname + inner)

    visit(tree.body, "")
    return found


def _code_objects(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_objects(const)


def _functions_of(obj: Any) -> list[types.FunctionType]:
    if inspect.isclass(obj):
        members = [getattr(m, "__func__", getattr(m, "fget", m)) for m in vars(obj).values()]
        return [inspect.unwrap(m) for m in members if inspect.isfunction(m)]
    return [inspect.unwrap(obj)] if inspect.isfunction(obj) else []


def _named(value: Any) -> str:
    return f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', repr(value))}"


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _describe(
    value: Any, names: tuple[str, ...], packages: tuple[str, ...], follow: list[Any]
) -> str:
    """A stable description of what a global name holds; project code it holds is appended to
    `follow`, to be read in turn."""

    def inner(item: Any) -> str:
        return _describe(item, (), packages, follow)

    if hasattr(value, "fn") and callable(value.fn):  # a Prefect task: its function
        value = value.fn
    if isinstance(value, types.ModuleType):
        if not _is_project(value, packages):
            return f"module {value.__name__}"
        # `module.helper`: the attributes the code names
        return (
            "{"
            + ", ".join(f"{n}={inner(getattr(value, n))}" for n in names if hasattr(value, n))
            + "}"
        )
    if inspect.isfunction(value) or inspect.isclass(value):
        if _is_project(value, packages):
            follow.append(value)
        return _named(value)
    if isinstance(value, functools.partial):
        return f"partial({inner(value.func)}, {inner(value.args)}, {inner(value.keywords)})"
    if isinstance(value, dict):
        items = sorted(value.items(), key=lambda kv: repr(kv[0]))
        return "{" + ", ".join(f"{inner(k)}: {inner(v)}" for k, v in items) + "}"
    if isinstance(value, set | frozenset):
        return "{" + ", ".join(sorted(map(inner, value))) + "}"
    if isinstance(value, tuple | list):
        return "[" + ", ".join(map(inner, value)) + "]"
    if isinstance(value, enum.Enum | bool | int | float | str | bytes) or value is None:
        return repr(value)
    if callable(value) and hasattr(value, "__qualname__"):  # builtins, bound methods
        return _named(value)
    described = repr(value)  # torch.float32, a compiled regex, a device…
    if _ADDRESS.search(described):  # an address differs in every process: describe the state
        return f"{_named(type(value))}({inner(dict(getattr(value, '__dict__', {})))})"
    return described


@functools.cache
def _code_fingerprint(fn: Callable[..., Any], packages: tuple[str, ...]) -> str:
    sources: dict[str, str] = {}
    constants: set[str] = set()
    pending: list[Any] = [fn]
    while pending:
        obj = pending.pop()
        name = _named(obj)
        if name in sources:
            continue
        sources[name] = normalized_source(obj)
        if inspect.isclass(obj):  # a base class's methods and attributes are this class's too
            pending += [base for base in obj.__mro__[1:] if _is_project(base, packages)]
            constants |= {f"{name} base {_named(b)}" for b in obj.__mro__[1:]}
        for function in map(_canonical, _functions_of(obj)):
            names = tuple(n for c in _code_objects(function.__code__) for n in c.co_names)
            for global_name in dict.fromkeys(names):
                if global_name in function.__globals__:
                    held = _describe(function.__globals__[global_name], names, packages, pending)
                    constants.add(f"{function.__module__}.{global_name} = {held}")
    payload = json.dumps([sorted(sources.items()), sorted(constants)])
    return hashlib.sha256(payload.encode()).hexdigest()
