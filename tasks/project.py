"""The user's own project: the models, losses, metrics and augmentations its owner registers by
name in the project's trainflow.toml, or in the [tool.trainflow] table of its pyproject.toml.

    [tool.trainflow.models]
    digits_cnn = "digits_model:build"     # build(spec) -> nn.Module

A run parameter names a registered name, never an import path: the file is the owner's, and
the names it offers are the config's choices (the command line's and the UI form's). The project
is found from the working folder up to the first folder that holds a trainflow.toml, a
pyproject.toml or a .git (the project's root), and its modules are imported from that folder and
nowhere else. A registry file owned by another user is refused, as git refuses such a
repository: whoever can plant a file in a shared folder must not choose the code a run imports.

Standard library only: the command line reads the names before it loads torch.
"""

from __future__ import annotations

import importlib.machinery
import os
import re
import sys
import threading
import tomllib
from dataclasses import dataclass
from importlib.metadata import EntryPoint
from pathlib import Path
from types import ModuleType
from typing import Any

from trainflow.tasks.errors import InputError
from trainflow.tasks.names import AUGMENTATIONS, BUILTIN_MODELS, LOSSES

KINDS = ("models", "losses", "metrics", "augmentations")
REGISTRY_FILES = ("trainflow.toml", "pyproject.toml")
BUILT_IN = {
    "models": BUILTIN_MODELS,
    "losses": LOSSES,
    "metrics": (),
    "augmentations": AUGMENTATIONS,
}
# module.path:attribute, as entry points write them; nothing else is ever imported.
TARGET = re.compile(r"^([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):([A-Za-z_]\w*)$")
NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
_IMPORTING = threading.Lock()  # sys.path is the process's: one project import at a time


@dataclass(frozen=True)
class Registered:
    """One name the project's owner registered: what it points at, and where that was said."""

    kind: str
    name: str
    module: str
    attribute: str
    root: str  # the project folder its module is imported from
    file: str  # the registry file that says so

    @property
    def target(self) -> str:
        return f"{self.module}:{self.attribute}"

    def describe(self) -> str:
        return f"{self.file}: {self.kind}.{self.name} = {self.target!r}"


def project_root(start: Path | None = None) -> Path | None:
    """The nearest folder from `start` (the working folder) up that holds a registry file or
    a .git: the project's root. None outside any project."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if any((folder / name).is_file() for name in REGISTRY_FILES) or (folder / ".git").exists():
            return folder
    return None


def registry(start: Path | None = None) -> dict[str, dict[str, Registered]]:
    """Every registered name by kind: empty where the project registers none."""
    root = project_root(start)
    found: dict[str, dict[str, Registered]] = {kind: {} for kind in KINDS}
    if root is None:
        return found
    for file_name in REGISTRY_FILES:
        path = root / file_name
        table = _trainflow_table(path, file_name == "pyproject.toml")
        if table is None:
            continue
        for kind, entries in _entries(table, path):
            for name, target in entries.items():
                if name in BUILT_IN[kind]:
                    raise InputError(f"{path}: {kind}.{name}: {name!r} is a built-in name")
                if name in found[kind]:
                    raise InputError(
                        f"{path}: {kind}.{name} is registered in {found[kind][name].file} too"
                    )
                module, attribute = _parsed_target(target, f"{path}: {kind}.{name}")
                found[kind][name] = Registered(kind, name, module, attribute, str(root), str(path))
    return found


def registered_names(kind: str, start: Path | None = None) -> tuple[str, ...]:
    """The names the project registers for `kind`, sorted; none if its file can't be read (the
    run that names one says why)."""
    try:
        return tuple(sorted(registry(start)[kind]))
    except InputError:
        return ()


def lookup(kind: str, name: str) -> Registered | None:
    return registry()[kind].get(name)


def load(item: Registered) -> Any:
    """The registered object, imported from the project folder (and only from there)."""
    top = item.module.split(".")[0]
    if top in sys.stdlib_module_names:  # it would replace the standard library's everywhere
        raise InputError(
            f"{item.describe()}: {top!r} is a standard-library module's name; rename the "
            "project's module"
        )
    with _IMPORTING:
        loaded = sys.modules.get(top)
        origin = _location(loaded) if loaded is not None else None
        if loaded is not None and not _inside(origin, item.root):
            raise InputError(
                f"{item.describe()}: a module named {top!r} is already imported from "
                f"{origin or 'a built-in'}; rename the project's module"
            )
        if loaded is None and importlib.machinery.PathFinder.find_spec(top, [item.root]) is None:
            raise InputError(f"{item.describe()}: no module {top!r} in the project {item.root}")
        sys.path.insert(0, item.root)
        try:
            # An entry point of the project's own, loaded as installed ones are: the import
            # by name is the standard library's, whose code the cache keys by version.
            EntryPoint(item.name, item.target, f"trainflow.{item.kind}").load()
            module = sys.modules[item.module]
        except Exception as exc:
            raise InputError(f"{item.describe()}: cannot import it ({_one_line(exc)})") from None
        finally:
            # Kept, last: a deferred import in the project's code finds its modules later, and
            # never shadows an installed one.
            sys.path.remove(item.root)
            if item.root not in sys.path:
                sys.path.append(item.root)
    if not _inside(_location(module), item.root):
        raise InputError(f"{item.describe()}: {item.module!r} is not in the project {item.root}")
    try:
        return getattr(module, item.attribute)
    except AttributeError:
        raise InputError(
            f"{item.describe()}: module {item.module!r} has no {item.attribute!r}"
        ) from None


def _trainflow_table(path: Path, in_pyproject: bool) -> dict[str, Any] | None:
    try:
        with path.open("rb") as f:
            owner = os.fstat(f.fileno()).st_uid
            text = f.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        document = tomllib.loads(text.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid TOML ({_one_line(exc)})") from None
    tool = document.get("tool", {}) if in_pyproject else {"trainflow": document}
    if not isinstance(tool, dict):
        raise InputError(f"{path}: 'tool' must be a table")
    table = tool.get("trainflow")
    if table is None:
        return None
    if owner != os.getuid():
        raise InputError(
            f"{path}: owned by another user; trainflow imports code only from a project "
            "file that you own"
        )
    if not isinstance(table, dict):
        raise InputError(f"{path}: the trainflow table must be a table")
    return table


def _entries(table: dict[str, Any], path: Path) -> list[tuple[str, dict[str, str]]]:
    unknown = [key for key in table if key not in KINDS]
    if unknown:
        raise InputError(
            f"{path}: unknown table(s) {', '.join(unknown)} (known: {', '.join(KINDS)})"
        )
    entries = []
    for kind in KINDS:
        section = table.get(kind, {})
        if not isinstance(section, dict):
            raise InputError(f'{path}: {kind} must be a table of name = "module:attribute"')
        for name, target in section.items():
            if not NAME.fullmatch(name):
                raise InputError(
                    f"{path}: {kind}.{name}: a name is letters, digits, '_' and '-', "
                    "starting with a letter"
                )
            if not isinstance(target, str):
                raise InputError(f'{path}: {kind}.{name} must be a string "module:attribute"')
        entries.append((kind, section))
    return entries


def _parsed_target(target: str, where: str) -> tuple[str, str]:
    match = TARGET.fullmatch(target)
    if match is None:
        raise InputError(f'{where} = {target!r}: expected "module.path:attribute"')
    return match.group(1), match.group(2)


def _location(module: ModuleType) -> str | None:
    """Where a module's code is: its file, or a namespace package's folder."""
    path = getattr(module, "__file__", None)
    if path is None and (folders := list(getattr(module, "__path__", []))):
        path = folders[0]
    return path


def _inside(path: str | None, root: str) -> bool:
    if path is None:
        return False
    resolved, folder = Path(path).resolve(), Path(root).resolve()
    return resolved == folder or folder in resolved.parents


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
