"""The run directory contract, and atomic writes so a crash never leaves a half file."""

from __future__ import annotations

import io
import json
import os
import secrets
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from safetensors.torch import save as safetensors_bytes
from torch import Tensor

CONFIG, METRICS = "config.json", "metrics.json"
MODEL, PROGRAM, SPLIT = "model.safetensors", "model.pt2", "split.safetensors"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # mkstemp makes 0600 files; give them the usual mode


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary name in the same folder, fsync, then rename over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, (json.dumps(obj, indent=2) + "\n").encode())


def write_safetensors(path: Path, tensors: dict[str, Tensor]) -> None:
    atomic_write(path, safetensors_bytes({k: v.contiguous() for k, v in tensors.items()}))


def write_with(path: Path, save: Any) -> None:
    """Atomic write for savers that take a file object, e.g. torch.export.save."""
    buffer = io.BytesIO()
    save(buffer)
    atomic_write(path, buffer.getvalue())


def generate_run_name() -> str:
    return f"{datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


@dataclass(frozen=True)
class RunDir:
    path: Path
    config: dict[str, Any]  # the resolved TrainConfig, as JSON

    def create(self) -> None:
        """Called once input is validated, so bad input never leaves a run folder behind."""
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.path / CONFIG, self.config)


def plan_run(runs_dir: str, run_name: str | None, config: dict[str, Any]) -> RunDir:
    """Resolve the run's folder (a generated, unique name by default) without creating it."""
    name = run_name or generate_run_name()
    return RunDir(Path(runs_dir).absolute() / name, {**config, "run_name": name})
