"""The source text each module was compiled from, as this process imported it.

A cache key must describe the code that runs, not the file on disk now: a long-lived process
(a Dask or Ray worker, a served deployment) may have imported a module that has been edited
since. Installed first thing by the `tasks` and `flows` packages, `record_imports()` puts a
finder in front of the import system that compiles every module whose source can change
without a version change (not the standard library, not an installed distribution) from the
bytes it read, and keeps those bytes. Only the standard library: importing it is free.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import os
import site
import sys
import sysconfig
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any


@dataclass(frozen=True)
class Imported:
    """A module's source as compiled. `vouched`: read by the import itself, or read later from
    a file untouched since this process started; otherwise the file may have changed between
    the import and the reading, and nothing computed from it is stored."""

    path: str
    text: bytes
    vouched: bool
    # The module object the bytes were executed in: a module imported again by another loader
    # (a finder put in front of the recorder later) is not described by an older record.
    module: weakref.ref[ModuleType] | None = None


_sources: dict[str, Imported] = {}
# The modules the recorder loaded, in order: what a stage imported while it ran is what was
# added after its key was made (tasks/cache/code_keys.py: stale_sources).
_loaded: list[str] = []
_lock = threading.Lock()


def _library_roots() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    roots = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    roots.update(site.getsitepackages() if hasattr(site, "getsitepackages") else [])
    if user := site.getusersitepackages():
        roots.add(user)
    # As spelled and as resolved: a module's path is compared as a string, with no system call
    # (this runs for every module imported); a path spelled neither way counts as editable.
    spelled = {os.path.abspath(r) for r in roots} | {os.path.realpath(r) for r in roots}
    return tuple(sorted(os.path.join(r, "") for r in spelled))


LIBRARY_ROOTS = _library_roots()
OWN_PACKAGE = __name__.partition(".")[0]


def is_library_file(path: str | None) -> bool:
    """In the standard library or an installed distribution: code that changes only with a
    Python or a distribution's version. A file-less module (built in, frozen) is one too."""
    return path is None or os.path.abspath(path).startswith(LIBRARY_ROOTS)


def _record(module: ModuleType, path: str, data: bytes) -> None:
    with _lock:
        _sources[module.__name__] = Imported(path, data, True, weakref.ref(module))
        _loaded.append(module.__name__)


class _RecordingSource:
    """Mixed into a source loader's class (the standard one, or a subclass another library
    installed, such as beartype's): keeps the bytes its import compiles. Without a bytecode
    cache, which is the point: a .pyc is trusted by its source's size and mtime to the second,
    and a same-size edit within that second would run code other than the bytes read."""

    path: str

    def exec_module(self, module: ModuleType) -> None:
        self.module = module
        super().exec_module(module)  # type: ignore[misc]

    def path_stats(self, path: str) -> Any:
        raise OSError("no bytecode cache: compile the source read")  # get_code reads it then

    def get_data(self, path: str) -> bytes:
        data = super().get_data(path)  # type: ignore[misc]
        if path == self.path and getattr(self, "module", None) is not None:
            _record(self.module, path, data)
        return data


class _RecordingExtension:
    """Mixed into an extension loader's class: a compiled extension outside the installed
    libraries, its bytes read just before the dynamic loader maps the same file."""

    path: str

    def create_module(self, spec: Any) -> Any:
        self.data = Path(self.path).read_bytes()
        return super().create_module(spec)  # type: ignore[misc]

    def exec_module(self, module: ModuleType) -> None:
        _record(module, self.path, self.data)
        super().exec_module(module)  # type: ignore[misc]


_recording_classes: dict[type, type] = {}


def _recording(loader: Any) -> Any:
    """A loader like `loader` that records what it loads, or `loader` itself where it is no
    file loader of source or of an extension."""
    cls = type(loader)
    if isinstance(loader, importlib.machinery.SourceFileLoader):
        mixin: type = _RecordingSource
    elif isinstance(loader, importlib.machinery.ExtensionFileLoader):
        mixin = _RecordingExtension
    else:
        return loader
    if cls not in _recording_classes:
        _recording_classes[cls] = type(f"Recording{cls.__name__}", (mixin, cls), {})
    try:
        return _recording_classes[cls](loader.name, loader.path)
    except TypeError:  # a subclass built otherwise: unrecorded (source_of reads it later)
        return loader


class _Recorder(importlib.abc.MetaPathFinder):
    """Asks the finders behind it and swaps in a recording loader for editable source."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        for finder in sys.meta_path[sys.meta_path.index(self) + 1 :]:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find else None
            if spec is None:
                continue
            # trainflow's own modules are recorded wherever installed (a wheel's too): its
            # cache keys count them by their text, never by its version.
            own = fullname.partition(".")[0] == OWN_PACKAGE
            if own or not is_library_file(spec.origin):
                spec.loader = _recording(spec.loader)
            return spec
        return None


_start: float | None = None


def _started() -> float:
    """When this process started, on the wall clock, never later than it did; a forked child
    keeps its parent's (it runs the code its parent read), so the parent reads it before it
    forks.

    On Linux, to the clock tick: the process's start in ticks after boot (/proc/self/stat, the
    caller itself whatever the pid namespace) against the boot clock. psutil's value counts
    from the boot's whole second there (up to a second early: a script generated and run at
    once would read as changed after the start); it serves where /proc does not exist."""
    global _start
    if _start is None:
        _start = _read_start()
    return _start


def _read_start() -> float:
    with contextlib.suppress(OSError, ValueError, AttributeError, IndexError):
        now = time.time()  # read first: the skew between the two reads makes it earlier
        since_boot = time.clock_gettime(time.CLOCK_BOOTTIME)
        # starttime, field 22: the 20th after the command name's closing parenthesis
        fields = Path("/proc/self/stat").read_text().rpartition(")")[2].split()
        start = now - (since_boot - int(fields[19]) / os.sysconf("SC_CLK_TCK"))
        if start <= now:
            return start
    import psutil  # only here: most processes never need it

    return psutil.Process().create_time()


os.register_at_fork(before=_started)


def record_imports(package: ModuleType | None = None) -> None:
    """Puts the recorder first among the finders (again, if one was put in front of it since).
    `package` (whose __init__ is running this), this module and the packages it sits in were
    imported just before: their bytes are read now. Other modules imported before the
    recorder are read at first use, with the file-age check of `source_of`."""
    if not sys.meta_path or not isinstance(sys.meta_path[0], _Recorder):
        recorders = [f for f in sys.meta_path if isinstance(f, _Recorder)]
        for recorder in recorders:
            sys.meta_path.remove(recorder)
        sys.meta_path.insert(0, recorders[0] if recorders else _Recorder())
    parts = __name__.split(".")
    parents = [sys.modules.get(".".join(parts[:i])) for i in range(1, len(parts))]
    for module in (sys.modules[__name__], *parents, package):
        path = getattr(module, "__file__", None)
        if module is not None and path and module.__name__ not in _sources:
            with contextlib.suppress(OSError), _lock:
                text = Path(path).read_bytes()
                _sources[module.__name__] = Imported(path, text, True, weakref.ref(module))


def loaded_count() -> int:
    with _lock:
        return len(_loaded)


def loaded_since(count: int) -> list[str]:
    """The modules the recorder loaded after `loaded_count()` returned `count`."""
    with _lock:
        return _loaded[count:]


def source_of(module: ModuleType) -> Imported | None:
    """What `module` was compiled (or, an extension, loaded) from; None for a module with no
    file."""
    name = module.__name__
    path = getattr(module, "__file__", None)
    with _lock:
        known = _sources.get(name)
    if known is not None and known.path == path and known.module and known.module() is module:
        return known
    if not path:
        return None
    try:
        before = os.stat(path)
        data = Path(path).read_bytes()
        after = os.stat(path)
    except OSError:
        return None
    # Imported before the recorder, or a module object made by hand: trusted only if the file
    # has not changed since this process started (any import of it read these bytes), nor
    # while it was read here.
    same = (before.st_mtime_ns, before.st_ctime_ns, before.st_size, before.st_ino) == (
        after.st_mtime_ns,
        after.st_ctime_ns,
        after.st_size,
        after.st_ino,
    )
    vouched = same and max(after.st_mtime, after.st_ctime) < _started()
    imported = Imported(path, data, vouched, weakref.ref(module))
    with _lock:
        _sources[name] = imported
        return imported
