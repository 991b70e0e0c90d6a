"""Rules shared by TrainConfig and the stages, in a module light enough to import first
(the command line validates its flags before it loads torch)."""

from __future__ import annotations

import re
from decimal import Decimal
from importlib.metadata import entry_points

from trainflow.tasks.names import AUGMENTATIONS, BUILTIN_MODELS, LOSSES, MODEL_ENTRY_POINTS
from trainflow.tasks.project import registered_names

DEFAULT_CACHE_DIR = ".trainflow/cache"  # relative to the working folder, beside runs/


def train_size(n: int, val_fraction: float) -> int:
    """Rows for training, as the seed computes them: int(n * ratio), where ratio is the
    training share as the seed writes it (val_fraction 0.2: ratio = 0.8)."""
    # In binary floats 1 - 0.71 is 0.29000000000000004, not the 0.29 the seed would write,
    # and int(100 * 0.29) is 28 but int(100 * 0.29000000000000004) is 29: subtract in decimal.
    ratio = float(1 - Decimal(repr(float(val_fraction))))  # repr: the shortest exact digits
    return int(n * ratio)


def safe_run_name(text: str, limit: int = 64) -> str:
    """`text` as one plain folder name: letters, digits, '.', '_' and '-', never '.' or '..'.

    A Prefect flow-run name is free text (a custom run name may hold '/', '..' or spaces), and
    it becomes part of a folder under runs_dir: whatever it holds, it must not leave it.
    """
    plain = re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:limit].strip("._-")
    return plain or "run"


def model_names() -> tuple[str, ...]:
    """The built-in models, then those other packages register as entry points, then the
    project's own (tasks/project.py)."""
    plugins = sorted(ep.name for ep in entry_points(group=MODEL_ENTRY_POINTS))
    return _choices(BUILTIN_MODELS, *plugins, *registered_names("models"))


def loss_names() -> tuple[str, ...]:
    return _choices(LOSSES, *registered_names("losses"))


def metric_names() -> tuple[str, ...]:
    """The project's own metrics (the built-in ones follow from the loss)."""
    return registered_names("metrics")


def augmentation_names() -> tuple[str, ...]:
    return _choices(AUGMENTATIONS, *registered_names("augmentations"))


def _choices(builtin: tuple[str, ...], *more: str) -> tuple[str, ...]:
    # A name registered twice is refused where it is used; listed once here.
    return (*builtin, *dict.fromkeys(name for name in more if name not in builtin))
