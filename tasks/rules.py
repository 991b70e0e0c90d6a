"""Rules shared by TrainConfig and the stages, in a module light enough to import first
(the command line validates its flags before it loads torch)."""

from __future__ import annotations

import math
from importlib.metadata import entry_points

DEFAULT_CACHE_DIR = ".trainflow/cache"  # relative to the working folder, beside runs/
SYNTHETIC = "synthetic"
BUILTIN_MODELS = ("linear", "mlp")
MODEL_ENTRY_POINTS = "trainflow.models"


def train_size(n: int, val_fraction: float) -> int:
    """Rows for training, as the seed computes them: int(n * ratio)."""
    # The epsilon absorbs float error such as 10 * 0.7 == 6.999…, which int() would floor.
    return min(n, math.floor(n * (1 - val_fraction) + 1e-9))


def model_names() -> tuple[str, ...]:
    """The built-in models, then those other packages register as entry points."""
    plugins = sorted(ep.name for ep in entry_points(group=MODEL_ENTRY_POINTS))
    return (*BUILTIN_MODELS, *(name for name in plugins if name not in BUILTIN_MODELS))
