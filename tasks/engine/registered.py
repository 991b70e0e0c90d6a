"""The project's own models, losses, metrics and augmentations (tasks/project.py), loaded by
name, with what a cache key must know of their code."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from trainflow.tasks.cache.code_keys import code_fingerprint, code_key, plugin_loaded
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


def source_files(item: Registered) -> dict[str, bytes]:
    """The project's code the registered object reaches (its module, the packages above it, the
    helpers it imports), as this process compiled it, by path in the project: what the run
    folder keeps beside the weights; the same modules its cache key counts."""
    obj = load_registered(item)
    root = Path(item.root).resolve()
    found: dict[str, bytes] = {}
    for source in code_key(obj, sys.modules[item.module]).sources:
        module = sys.modules.get(source.module)
        imported = source_of(module) if module is not None else None
        if imported is None or not imported.path.endswith(".py"):
            continue
        try:
            where = Path(imported.path).resolve().relative_to(root)
        except ValueError:  # not the project's: trainflow's, or an installed library's
            continue
        found[where.as_posix()] = imported.text
    return found


def project_sources(named: list[tuple[str, str]]) -> dict[str, bytes]:
    """The project code of each (kind, name) the project registers, by its path in the project."""
    sources: dict[str, bytes] = {}
    for kind, name in named:
        if (item := registered(kind, name)) is not None:
            sources |= source_files(item)
    return sources
