"""The code part of a cache key: every module a stage's code can reach, as this process
imported it.

Reach is counted by module. It starts from the stage's module, the modules of the values it
is given and a plugin's module, and follows every import written anywhere in a module's text
(at the top, inside a function, under `TYPE_CHECKING`), transitively. That is coarser than
following names (an edit anywhere in a reached module changes the key, even in a function the
stage never calls), and it is what makes the key true: code reached through an instance, a
callback, a deferred import or a plugin's helper package is in it.

A reached module is read, as its AST without comments, docstrings or formatting, unless it
belongs to the standard library or an installed distribution: those count by the Python
version and the distribution's version. An editable install is read; a compiled extension
counts by its bytes; code in no readable file (a zip) makes the stage uncached. A plugin's own
module is read wherever it is installed, and its distribution counts with its requirements'
versions; once loaded, a plugin is in every key the process makes. An import by a name
computed at run time makes the key count every editable module loaded.

The text read is the one the module was compiled from (tasks/cache/imported.py); a module not yet
imported is read from disk. `stale_sources` tells, before an output is stored, whether any of
those texts differs from what the process has imported since or from the file now, or whether
the computation imported a module outside its key: then the output may not be the keyed
code's, and it is not stored.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import platform
import sys
import sysconfig
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import FunctionType, MethodType, ModuleType
from typing import Any

from trainflow.tasks.cache.imported import (
    is_library_file,
    loaded_count,
    loaded_since,
    record_imports,
    source_of,
)


def _memo_dir() -> Path | None:
    """Where parsed sources are memoised: derived data, safe to delete.
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


class UnreadableCode(Exception):
    """A reached module's code is not in a readable file: no key can describe it."""


_plugins: set[str] = set()  # modules of the plugins this process has loaded


def plugin_loaded(module: str) -> None:
    """A plugin's module, or one a stage imported outside its key, loaded: from now on every
    key of this process covers it. Later stages may run it again (train-epochs rebuilds the
    model build-model built), and its import may have changed what other code computes
    (patched torch, filled a registry); a key made without it would not say so."""
    _plugins.add(module)


@dataclass(frozen=True)
class Source:
    module: str
    path: str
    digest: str  # of the bytes read
    vouched: (
        bool  # False: the file changed after this process started (trainflow.tasks.cache.imported)
    )


@dataclass(frozen=True)
class CodeKey:
    digest: str
    sources: tuple[Source, ...]
    loaded_before: int = 0  # trainflow.tasks.cache.imported.loaded_count() when the key was made


def code_key(*roots: Any, value_types: Iterable[type] = ()) -> CodeKey:
    """The code that `roots` (functions, classes, modules or their instances) can reach, and
    the classes of a stage's input values. A value's class from an installed library (a
    `torch.dtype`) counts by the library's version, as an import of it does: reading the
    library's own modules would make the key depend on what else the process has loaded."""
    record_imports()  # first among the finders again, should another have been put in front
    loaded_before = loaded_count()
    walk = _Walk()
    for kind in value_types:
        top = kind.__module__.partition(".")[0]
        if top in sys.stdlib_module_names or top == "builtins":
            continue
        if _is_library(top) and (pin := _pin(top)) is not None:
            walk.libraries.add(pin)
        else:
            walk.root(kind)
    for root in (*roots, *(sys.modules[m] for m in sorted(_plugins) if m in sys.modules)):
        walk.root(root)
    if walk.dynamic:
        # An import by a name computed at run time may reach any module: every editable
        # module this process has imported counts (what it imports later, stale_sources sees).
        for name, module in list(sys.modules.items()):
            path = getattr(module, "__file__", None)
            own = name.partition(".")[0] == OWN_PACKAGE
            if path and (own or not is_library_file(path)) and name not in walk.seen:
                walk.root(module)
    payload = {
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "modules": sorted(walk.read.items()),
        "libraries": sorted(walk.libraries),
        "missing": sorted(walk.missing),
        "dynamic": sorted(walk.dynamic),
    }
    digest = hashlib.sha256(json.dumps(payload).encode()).hexdigest()
    sources = tuple(walk.sources[name] for name in sorted(walk.sources))
    return CodeKey(digest, sources, loaded_before)


def code_fingerprint(*roots: Any) -> str:
    return code_key(*roots).digest


def stale_sources(key: CodeKey, loaded_until: int | None = None) -> str | None:
    """Why an output computed under `key` may not be the keyed code's, or None: a module of
    the key imported since with other code, a file changed since it was read, or a module
    outside the key imported while the output was computed (reached by a route the walk can't
    see: an import by a computed name, a registry). `loaded_until`: `loaded_count()` when the
    computation ended; what was imported after it is a later computation's."""
    if (differs := differs_from_imported(key)) is not None:
        return differs
    for source in key.sources:
        if not source.vouched:
            return f"{source.path} changed after this process started"
        try:
            now = Path(source.path).read_bytes()
        except OSError:
            return f"{source.path} is gone"
        if _bytes_digest(now) != source.digest:
            return f"{source.path} changed since this process imported it"
    if outside := loaded_outside(key, loaded_until):
        return f"module {outside[0]} was imported while it was computed, outside the key"
    return None


def loaded_outside(key: CodeKey, loaded_until: int | None = None) -> list[str]:
    """The modules imported while an output was computed under `key` that the key does not
    cover: reached by a route the walk can't see (an import by a computed name, a registry,
    a plugin's `EntryPoint.load()`). `loaded_until`: `loaded_count()` when it ended."""
    keyed = {source.module for source in key.sources}
    loaded = loaded_since(key.loaded_before)
    if loaded_until is not None:  # what the computation itself imported, not what came after
        loaded = loaded[: max(0, loaded_until - key.loaded_before)]
    return [name for name in loaded if name not in keyed]


def differs_from_imported(key: CodeKey) -> str | None:
    """Whether this process's code differs from the key's: a module of the key that it
    imported (or, not imported yet, would import) from other bytes. What a rank of a DDP job,
    a process of its own, checks before it computes anything under its launcher's key."""
    for source in key.sources:
        module = sys.modules.get(source.module)
        imported = source_of(module) if module is not None else None
        if imported is not None and _bytes_digest(imported.text) != source.digest:
            return f"{source.path} was imported with other code than the key's"
        if imported is None and _bytes_digest(_read_file(source.path) or b"") != source.digest:
            return f"{source.path} changed since the key was made"
    return None


def loaded_sources() -> tuple[Source, ...]:
    """Every module this process has loaded whose source can change without a version change
    (trainflow's own, a project's, the main script as `__main__`), key or not: a DDP rank,
    started later, imports them afresh (spawn re-runs the main script), and must run what
    this process ran."""
    found = {}
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if not path or not path.endswith(".py"):
            continue
        if name.partition(".")[0] != OWN_PACKAGE and is_library_file(path):
            continue
        imported = source_of(module)
        if imported is not None:
            main = "__main__" if name in ("__main__", "__mp_main__") else name
            digest = _bytes_digest(imported.text)
            found[main] = Source(main, imported.path, digest, imported.vouched)
    return tuple(found[name] for name in sorted(found))


def differs_from_loaded(sources: tuple[Source, ...]) -> str | None:
    """Whether this process runs other code than `sources` (`loaded_sources()` of the process
    that started it) in a module both imported: from other bytes, or from a file that changed
    after the starting process imported it (what that one ran is not known). A module only
    the starter imported (a long-lived worker's earlier work) is not this process's code."""
    for source in sources:
        module = sys.modules.get(source.module)
        imported = source_of(module) if module is not None else None
        if imported is None:
            continue
        if not source.vouched:
            return f"{source.path} changed after its launcher imported it"
        if _bytes_digest(imported.text) != source.digest:
            return f"{source.path} was imported with other code than its launcher's"
    return None


# --- the walk -----------------------------------------------------------------------------


class _Walk:
    def __init__(self) -> None:
        self.read: dict[str, str] = {}  # module -> digest of its normalized AST
        self.sources: dict[str, Source] = {}
        self.libraries: set[str] = set()
        self.missing: set[str] = set()
        self.dynamic: set[str] = set()  # modules that import by a name computed at run time
        self.seen: set[str] = set()

    def root(self, obj: Any) -> None:
        for name in dict.fromkeys(_modules_holding(obj)):
            if name not in self.seen:
                self._root_module(name)

    def _root_module(self, name: str) -> None:
        if _is_stdlib(name):
            return  # a builtin's or the standard library's: the Python version counts for it
        # Importing `a.b.c` runs a/__init__.py and a/b/__init__.py first: their code too.
        parts = name.split(".")
        for i in range(1, len(parts)):
            self.visit(".".join(parts[:i]), optional=False)
        module = sys.modules.get(name) or _import_spec(name)
        if module is None:
            self.missing.add(name)
            return
        dist = _distribution_of(name.partition(".")[0]) if _is_library(name) else None
        if dist is not None:  # a plugin installed as a distribution: it and what it requires
            self.libraries |= _with_requirements(dist)
        self._read(name, module)

    def visit(self, name: str, optional: bool) -> None:
        if name in self.seen:
            return
        top = name.partition(".")[0]
        if _is_stdlib(name):
            return  # the Python version counts for it
        if _is_library(top) and (pin := _pin(top)) is not None:
            self.libraries.add(pin)
            return
        module = sys.modules.get(name) or _import_spec(name)
        if module is None:
            if not optional:
                self.missing.add(name)
            return
        self._read(name, module)

    def _read(self, name: str, module: ModuleType | importlib.machinery.ModuleSpec) -> None:
        self.seen.add(name)
        if isinstance(module, ModuleType):
            imported = source_of(module)
            text, path, vouched = (
                (imported.text, imported.path, imported.vouched) if imported else (None, "", True)
            )
            package = module.__package__ or ""
            is_package = hasattr(module, "__path__")
            spec = module.__spec__
        else:  # not imported (yet): what an import would read now
            path = module.origin if module.has_location and module.origin else ""
            text = _read_file(path)
            vouched = True
            package = module.parent or ""
            is_package = module.submodule_search_locations is not None
            spec = module
        if text is None:
            if spec is not None and spec.has_location and spec.origin:
                # Code from a place that is no plain file (a zip, a custom loader): what ran
                # can't be read, so nothing computed from it can be keyed.
                raise UnreadableCode(f"the source of module {name} ({spec.origin}) can't be read")
            self.read[name] = "no source"  # a namespace package: no code of its own
            return
        if not path.endswith(".py"):  # a compiled extension: its bytes are its code
            self.read[name] = _bytes_digest(text)
            self.sources[name] = Source(name, path, _bytes_digest(text), vouched)
            return
        ast_digest, imports, dynamic = _parsed(text)
        if dynamic:
            self.dynamic.add(name)
        self.read[name] = ast_digest
        self.sources[name] = Source(name, path, _bytes_digest(text), vouched)
        base = name if is_package else package
        for level, target, names in imports:
            absolute = _resolve(level, target, base)
            if absolute is None:
                self.missing.add(f"{'.' * level}{target} from {name}")
                continue
            parts = absolute.split(".") if absolute else []
            for i in range(1, len(parts) + 1):
                self.visit(".".join(parts[:i]), optional=False)
            for item in names:  # `from package import module`, or just a name
                if item != "*" and absolute:
                    self.visit(f"{absolute}.{item}", optional=True)


def _modules_holding(obj: Any, depth: int = 0) -> Iterator[str]:
    """The modules whose code `obj` runs when called or used: a function's (and what its
    closure holds), a partial's function and arguments, a method's function and instance,
    an instance's class."""
    if depth > 8:  # a cycle of closures
        return
    obj = getattr(obj, "fn", obj)  # a Prefect task stands for its function
    if isinstance(obj, ModuleType):
        yield obj.__name__
    elif isinstance(obj, functools.partial):
        for part in (obj.func, *obj.args, *obj.keywords.values()):
            yield from _modules_holding(part, depth + 1)
    elif isinstance(obj, MethodType):
        yield from _modules_holding(obj.__func__, depth + 1)
        yield from _modules_holding(obj.__self__, depth + 1)
    elif isinstance(obj, FunctionType):
        yield obj.__module__
        for cell in obj.__closure__ or ():
            with contextlib.suppress(ValueError):  # an empty cell
                yield from _modules_holding(cell.cell_contents, depth + 1)
    elif isinstance(obj, type):
        yield obj.__module__
    elif not isinstance(obj, bool | int | float | str | bytes | type(None)):
        yield type(obj).__module__


def _resolve(level: int, target: str, package: str) -> str | None:
    if level == 0:
        return target
    try:
        return importlib.util.resolve_name("." * level + target, package)
    except (ImportError, ValueError):
        return None


def _import_spec(name: str) -> importlib.machinery.ModuleSpec | None:
    """The spec an import of `name` would use, found without importing anything (not even its
    parent packages: the key must not run code the stage would only run later, or never)."""
    parent, _, _ = name.rpartition(".")
    try:
        if not parent:
            return importlib.util.find_spec(name)
        above = sys.modules.get(parent) or _import_spec(parent)
        if above is None:
            return None
        if isinstance(above, ModuleType):
            locations = getattr(above, "__path__", None)
        else:
            locations = above.submodule_search_locations
        if locations is None:  # `from module import name`: a name, not a module
            return None
        return importlib.machinery.PathFinder.find_spec(name, list(locations))
    except (ImportError, ValueError, AttributeError):
        return None


# Where the standard library lives: a module named like one of its modules but found
# elsewhere (a project's `mailbox.py`) is code of its own, read like any other.
_STDLIB_DIRS = tuple(
    {os.path.realpath(sysconfig.get_paths()[key]) + os.sep for key in ("stdlib", "platstdlib")}
)


def _is_stdlib(name: str) -> bool:
    """Whether `name` is the standard library's (or a builtin), by where it is, not its name."""
    top = name.partition(".")[0]
    if top not in sys.stdlib_module_names and top != "__future__":
        return False
    module = sys.modules.get(top)
    if module is not None:
        origin = getattr(module, "__file__", None)
    else:
        spec = _import_spec(top)
        origin = spec.origin if spec is not None and spec.has_location else None
    return origin is None or os.path.realpath(origin).startswith(_STDLIB_DIRS)


def _read_file(path: str) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError:
        return None


def _bytes_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# trainflow itself counts by its text wherever it is installed: a wheel of any commit has the
# same version, and two commits must never share a key.
OWN_PACKAGE = __name__.partition(".")[0]


@functools.cache
def _is_library(top: str) -> bool:
    if top == OWN_PACKAGE:
        return False
    module = sys.modules.get(top)
    if module is not None:
        path = getattr(module, "__file__", None)
        locations = list(getattr(module, "__path__", []) or [])
    else:
        spec = _import_spec(top)
        if spec is None:
            return False
        path = spec.origin if spec.has_location else None
        locations = list(spec.submodule_search_locations or [])
    if path is None and locations:  # a namespace package: where its parts are
        return all(is_library_file(location) for location in locations)
    return is_library_file(path)


@functools.cache
def _distribution_of(top: str) -> str | None:
    """The installed distribution that provides import name `top`."""
    with contextlib.suppress(metadata.PackageNotFoundError):
        dist = metadata.distribution(top)
        provided = (dist.read_text("top_level.txt") or "").split()
        if top in provided or any(
            f.parts and f.parts[0] in (top, f"{top}.py") for f in dist.files or ()
        ):
            return dist.metadata["Name"]
    names = metadata.packages_distributions().get(top, [])
    return names[0] if names else None


@functools.cache
def _pin(top: str) -> str | None:
    """`dist==version` of the installed distribution that provides import name `top`."""
    dist = _distribution_of(top)
    return f"{_canonical_name(dist)}=={metadata.version(dist)}" if dist else None


@functools.cache
def _with_requirements(dist: str) -> frozenset[str]:
    """`dist==version` for `dist` and every installed distribution it requires, transitively."""
    found: set[str] = set()
    pending = [dist]
    while pending:
        name = pending.pop()
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        pin = f"{_canonical_name(name)}=={version}"
        if pin in found:
            continue
        found.add(pin)
        for requirement in metadata.requires(name) or []:
            if "extra ==" in requirement:
                continue  # an optional extra's requirement
            pending.append(_requirement_name(requirement))
    return frozenset(found)


def _canonical_name(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _requirement_name(requirement: str) -> str:
    end = len(requirement)
    for stop in " ;<>=!~[(":
        if (at := requirement.find(stop)) != -1:
            end = min(end, at)
    return requirement[:end]


# --- parsing ------------------------------------------------------------------------------

Import = tuple[int, str, tuple[str, ...]]  # (level, module, names): one import statement
Parsed = tuple[str, tuple[Import, ...], bool]  # AST digest, imports, imports a computed name
_parses: dict[str, Parsed] = {}
# Calls that import or run code by a name or text given at run time. With a literal module
# name the import is followed like a statement; anything else makes the key coarse.
_IMPORTERS = {"__import__", "import_module", "pkgutil.resolve_name"}
_IMPORT_MODULES = {"importlib", "pkgutil", "builtins", "runpy"}
_LOADERS = {
    "spec_from_file_location",
    "spec_from_loader",
    "module_from_spec",
    "run_path",
    "run_module",
    "load_module",
    "load_source",
}
_parses_lock = threading.Lock()


class _DropDocstrings(ast.NodeTransformer):
    def _strip(self, node: Any) -> Any:
        self.generic_visit(node)
        first = node.body[0] if node.body else None
        value = first.value if isinstance(first, ast.Expr) else None
        if isinstance(value, ast.Constant) and isinstance(value.value, str):  # a docstring
            node.body = node.body[1:] or [ast.Pass()]
        return node

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = visit_Module = _strip


def parse_module(text: bytes) -> Parsed:
    """A digest of the module's AST without comments, formatting or docstrings; every import
    in it (statements, and `import_module`/`__import__`/`pkgutil.resolve_name` of a literal
    name); and whether it imports or runs code by a name computed at run time: any other use
    of those functions or of a module loader (an alias, a reference passed on,
    `getattr(importlib, "import_module")`), or `exec`/`eval` of text that is not literal."""
    try:
        tree = ast.parse(text)
    except SyntaxError:  # compiled by another Python? count every byte
        return _bytes_digest(text), (), True
    imports: list[Import] = []
    dynamic = False
    direct: set[int] = set()  # the function nodes of calls with a literal name, followed
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imports += [(0, alias.name, ()) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = tuple(alias.name for alias in node.names)
            imports.append((node.level, node.module or "", names))
            # Under another name (or pkgutil's, bare) a call can't be told from any other.
            renamed = [a.name for a in node.names if a.asname and a.asname != a.name]
            bare = [a.name for a in node.names if node.module == "pkgutil"]
            dynamic |= any(
                _qualified(node.module or "", n) in _IMPORTERS for n in (*renamed, *bare)
            )
        elif isinstance(node, ast.Call) and (called := _called_name(node)):
            first = node.args[0] if node.args else None
            literal = isinstance(first, ast.Constant) and isinstance(first.value, str)
            if called in _IMPORTERS and literal and not first.value.startswith("."):
                imports.append((0, first.value.partition(":")[0], ()))
                direct.add(id(node.func))
            elif called in ("exec", "eval") and literal:
                direct.add(id(node.func))  # the text run is in the key
            elif called == "getattr" and len(node.args) > 1:  # getattr(importlib, name)
                held, name = node.args[0], node.args[1]
                named = isinstance(name, ast.Constant) and isinstance(name.value, str)
                of_importer = isinstance(held, ast.Name) and held.id in _IMPORT_MODULES
                found = named and _qualified("", name.value) in _IMPORTERS | _LOADERS
                dynamic |= found or (of_importer and not named)
    for node in ast.walk(tree):
        used = _identifier(node)
        if used in _IMPORTERS | _LOADERS | {"exec", "eval"} and id(node) not in direct:
            dynamic = True
    dump = ast.dump(_DropDocstrings().visit(tree), annotate_fields=False)
    return hashlib.sha256(dump.encode()).hexdigest(), tuple(imports), dynamic


def _identifier(node: ast.AST) -> str | None:
    """The name a Name or an attribute access uses (`pkgutil.resolve_name` with its module:
    importlib.util's function of that name computes a name and imports nothing); a method
    named `eval` or `exec` (`model.eval()`) is not the builtin."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and node.attr not in ("eval", "exec"):
        held = node.value.id if isinstance(node.value, ast.Name) else ""
        return _qualified(held, node.attr)
    return None


def _qualified(module: str, name: str) -> str:
    return f"pkgutil.{name}" if name == "resolve_name" and module == "pkgutil" else name


def _called_name(call: ast.Call) -> str | None:
    """`f` of `f(…)`, and `import_module` of `importlib.import_module(…)`."""
    return _identifier(call.func)


def _parsed(text: bytes) -> Parsed:
    """parse_module, memoised in memory and on disk (MEMO_DIR) under a digest of everything
    it is a function of: the text, the Python that parses it and this module's code. A memo
    made from any other text, Python or normalizer is never used; an unreadable or
    unwritable memo costs the time, never the key."""
    digest = hashlib.sha256(
        b"\0".join([sys.version.encode(), _NORMALIZER.encode(), text])
    ).hexdigest()
    with _parses_lock:
        if digest in _parses:
            return _parses[digest]
    found = _read_memo(digest)
    if found is None:
        found = parse_module(text)
        _write_memo(digest, found)
    with _parses_lock:
        _parses[digest] = found
    return found


def _memo_path(digest: str) -> Path | None:
    return MEMO_DIR / f"{digest[:40]}.json" if MEMO_DIR is not None else None


def _read_memo(digest: str) -> Parsed | None:
    memo = _memo_path(digest)
    if memo is None:
        return None
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        stored = json.loads(memo.read_text())
        if stored["digest"] == digest:
            imports = tuple((int(lv), str(m), tuple(map(str, n))) for lv, m, n in stored["imports"])
            return str(stored["ast"]), imports, bool(stored["dynamic"])
    return None


def _write_memo(digest: str, found: Parsed) -> None:
    memo = _memo_path(digest)
    if memo is None:
        return
    with contextlib.suppress(OSError):
        memo.parent.mkdir(parents=True, exist_ok=True)
        scratch = memo.with_name(f"{memo.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        ast_digest, imports, dynamic = found
        parsed = {"digest": digest, "ast": ast_digest, "imports": imports, "dynamic": dynamic}
        scratch.write_text(json.dumps(parsed))
        os.replace(scratch, memo)  # whole or absent: a reader never sees half a memo
        _prune_memos(memo.parent)


def _prune_memos(folder: Path, keep: int = 512) -> None:
    """The newest `keep` memos: one per version of a source, and throwaway ones add up."""
    memos = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in memos[keep:]:
        old.unlink(missing_ok=True)
