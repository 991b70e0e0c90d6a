import io

import pytest
import torch

from tasks.export import export_program, hparams, thinned
from tasks.model import ModelSpec, initial_model, instantiate


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
