"""The project's own models, losses, metrics and augmentations (tasks/project.py), loaded by
name, with what a cache key must know of their code."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from trainflow.tasks.cache.code_keys import code_fingerprint, plugin_loaded
from trainflow.tasks.cache.imported import source_of
from trainflow.tasks.project import Registered, load, lookup


def registered(kind: str, name: str) -> Registered | None:
    """The project's entry for `name`, if it registers one."""
    return lookup(kind, name)


def load_registered(item: Registered) -> Any:
    obj = load(item)
    plugin_loaded(item.module)  # every key made from now on covers it
    return obj


def registered_code(kind: str, name: str) -> dict[str, Any] | None:
    """What a key covers of a project's `name`: where it is registered and its code (an edit
    re-trains, a comment does not). None for a name the project doesn't register."""
    item = registered(kind, name)
    if item is None:
        return None
    obj = load_registered(item)
    return {"target": item.target, "code": code_fingerprint(obj, sys.modules[item.module])}


def source_file(item: Registered) -> tuple[str, bytes] | None:
    """The registered module's source as this process compiled it, and its path in the
    project: the run folder keeps a copy beside the weights. None for a module in no file."""
    load_registered(item)
    module = sys.modules[item.module]
    imported = source_of(module)
    if imported is None or not imported.path.endswith(".py"):
        return None
    try:
        where = Path(imported.path).resolve().relative_to(Path(item.root).resolve())
    except ValueError:
        return None
    return where.as_posix(), imported.text


def project_sources(named: list[tuple[str, str]]) -> dict[str, bytes]:
    """The source of each (kind, name) the project registers, by its path in the project."""
    sources: dict[str, bytes] = {}
    for kind, name in named:
        item = registered(kind, name)
        if item is not None and (found := source_file(item)) is not None:
            sources[found[0]] = found[1]
    return sources
