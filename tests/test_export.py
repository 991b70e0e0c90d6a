import io
import re
import subprocess
import sys

import pytest
import torch

from trainflow.tasks.engine.models import ModelSpec, initial_model, instantiate
from trainflow.tasks.export_graph import export_program, hparams, thinned

from .conftest import REPO


@pytest.mark.parametrize("sample_rows", [1, 16])
def test_exported_program_reloads_and_predicts_any_number_of_rows(sample_rows):
    initial = initial_model(ModelSpec("mlp", 3, 2, (8,), "gelu"), seed=0)
    model = instantiate(initial.spec, initial.state).eval()
    buffer = io.BytesIO()
    torch.export.save(export_program(model, torch.randn(sample_rows, 3)), buffer)
    buffer.seek(0)
    program = torch.export.load(buffer).module()
    for rows in (1, 2, 7, 100):
        x = torch.randn(rows, 3)
        torch.testing.assert_close(program(x), model(x))


def test_thinned_keeps_first_and_last_and_caps_rows():
    assert thinned(list(range(5)), max_rows=10) == [0, 1, 2, 3, 4]
    rows = thinned(list(range(1000)), max_rows=50)
    assert rows[0] == 0 and rows[-1] == 999 and len(rows) == 50


def test_hparams_are_tensorboard_friendly():
    assert hparams({"lr": 0.1, "hidden": (8, 4), "run_name": None, "model": "mlp"}) == {
        "lr": 0.1,
        "hidden": "(8, 4)",
        "model": "mlp",
    }


# What torch.export.export loads on top of `import torch`: seconds on 2 cores. (`import torch`
# itself imports the torch.export package and torch._decomp: torch/__init__.py does.)
EXPORT_MACHINERY = {"torch.export._trace", "torch._dynamo"}


def _imported(importtime_log: str) -> set[str]:
    """Module names from `python -X importtime` ("import time: self | cumulative | name")."""
    return {
        line.rsplit("|", 1)[1].strip()
        for line in importtime_log.splitlines()
        if line.startswith("import time:")
    }


def test_only_a_run_that_exports_loads_the_export_machinery(tmp_path, subprocess_env):
    script = str(REPO / "flows" / "train_flow.py")
    command = [sys.executable, "-X", "importtime", script, "--epochs", "3", "--runs-dir", "runs"]
    cold, cached = (
        subprocess.run(command, env=subprocess_env, capture_output=True, text=True, timeout=600)
        for _ in range(2)
    )
    assert cold.returncode == 0, cold.stderr[-3000:]
    assert _imported(cold.stderr) >= EXPORT_MACHINERY  # the check sees an export
    assert cached.returncode == 0, cached.stderr[-3000:]
    assert re.search(r"^export-graph\s+Cached\b", cached.stdout, re.MULTILINE), cached.stdout
    assert not EXPORT_MACHINERY & _imported(cached.stderr)
    # Nor FastAPI, which Prefect imports to store a flow's parameters (flows/parameters.py).
    assert "fastapi" not in _imported(cached.stderr)
