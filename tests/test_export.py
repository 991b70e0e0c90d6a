import io
import math
import re
import subprocess
import sys

import pytest
import torch

from trainflow.tasks.engine.models import ModelSpec, initial_model, instantiate, model_spec
from trainflow.tasks.export_graph import export_program, graph_event_file, hparams, thinned

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


@pytest.mark.parametrize(
    ("shape", "images"), [((1, 8, 8), True), ((3, 5, 7), True), ((4, 5), False)]
)
def test_the_graph_file_holds_a_grid_of_training_images_for_image_data(tmp_path, shape, images):
    """uint8 N×C×H×W with 1 or 3 channels is shown in TensorBoard's IMAGES tab beside the
    graph; other data only the graph."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    spec = model_spec(
        "mlp", math.prod(shape), 3, (4,), "relu", input_shape=shape, input_dtype="uint8"
    )
    model = instantiate(spec, initial_model(spec, seed=0).state).eval()
    sample = torch.randint(0, 256, (70, *shape), dtype=torch.uint8)
    (tmp_path / "events.out.tfevents.0.graph").write_bytes(graph_event_file(model, sample))
    tags = EventAccumulator(str(tmp_path)).Reload().Tags()
    assert tags["graph"]
    assert tags["images"] == (["training samples"] if images else [])
    if images:
        shown = EventAccumulator(str(tmp_path), size_guidance={"images": 0}).Reload()
        (image,) = shown.Images("training samples")
        assert image.width > 0 and image.height > 0


def test_the_exported_program_of_an_image_model_takes_raw_uint8_batches_of_any_size():
    spec = model_spec("mlp", 64, 10, (8,), "relu", input_shape=(1, 8, 8), input_dtype="uint8")
    model = instantiate(spec, initial_model(spec, seed=0).state).eval()
    buffer = io.BytesIO()
    sample = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8)
    torch.export.save(export_program(model, sample), buffer)
    buffer.seek(0)
    program = torch.export.load(buffer).module()
    for rows in (1, 3, 40):
        x = torch.randint(0, 256, (rows, 1, 8, 8), dtype=torch.uint8)
        torch.testing.assert_close(program(x), model(x))
        # The cast is inside: the program's numbers are the model's on x / 255.
        inner = model[2:] if isinstance(model, torch.nn.Sequential) else model
        torch.testing.assert_close(program(x), inner(x.float().flatten(1) / 255))
