import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from trainflow.tasks.engine.models import ModelSpec, initial_model, instantiate, model_code
from trainflow.tasks.errors import InputError


def test_linear_is_the_seed_model_with_the_seed_weights():
    torch.manual_seed(42)
    reference = nn.Sequential(nn.Linear(1, 1))
    model = initial_model(ModelSpec("linear", 1, 1), seed=42)
    assert list(model.state) == ["0.weight", "0.bias"]
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state[key], value)
    assert model.state["0.weight"].item() == pytest.approx(0.7645, abs=1e-4)
    assert model.state["0.bias"].item() == pytest.approx(0.8300, abs=1e-4)


@pytest.mark.parametrize(
    ("activation", "module"),
    [("relu", nn.ReLU), ("tanh", nn.Tanh), ("gelu", nn.GELU), ("silu", nn.SiLU)],
)
def test_mlp_init_equals_torch_default_init_under_manual_seed(activation, module):
    torch.manual_seed(5)
    reference = nn.Sequential(nn.Linear(3, 8), module(), nn.Linear(8, 4), module(), nn.Linear(4, 2))
    model = initial_model(ModelSpec("mlp", 3, 2, (8, 4), activation), seed=5)
    assert model.state.keys() == reference.state_dict().keys()
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state[key], value), key


def test_building_a_model_leaves_global_rng_alone():
    before = torch.get_rng_state()
    initial_model(ModelSpec("mlp", 4, 1, (16,)), seed=1)
    assert torch.equal(before, torch.get_rng_state())


def test_instantiate_loads_state_and_predicts():
    initial = initial_model(ModelSpec("mlp", 2, 1, (4,), "tanh"), seed=3)
    module = instantiate(initial.spec, initial.state)
    assert module(torch.ones(5, 2)).shape == (5, 1)
    assert all(torch.equal(module.state_dict()[k], v) for k, v in initial.state.items())


def test_unknown_model_is_rejected():
    with pytest.raises(InputError, match="not a known model"):
        initial_model(ModelSpec("resnet", 1, 1), seed=0)


def _plugin_dist(root: Path, dist: str, module: str, body: str) -> None:
    """An installed distribution `dist` whose module registers the model 'tiny'."""
    (root / f"{module}.py").write_text(body)
    info = root / f"{dist}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[trainflow.models]\ntiny = {module}:build\n")


TINY = "import torch.nn as nn\n\n\ndef build(spec):\n    return nn.Linear(spec.n_inputs, 1)\n"


def test_only_the_chosen_plugin_is_imported(tmp_path, monkeypatch):
    """Another plugin's import could change what torch computes, and no key covers it."""
    _plugin_dist(tmp_path, "tinymodels", "tinymodels", TINY)
    marker = tmp_path / "imported"
    (tmp_path / "patches.py").write_text(f"open({str(marker)!r}, 'w').close()\n" + TINY)
    info = tmp_path / "patchy-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: patchy\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[trainflow.models]\nother = patches:build\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        module = instantiate(ModelSpec("tiny", 3, 1, ()))
        assert module(torch.zeros(2, 3)).shape == (2, 1)
        assert model_code("tiny")["distribution"] == "tinymodels"
        assert not marker.exists()
    finally:
        for name in ("tinymodels", "patches"):
            sys.modules.pop(name, None)


def test_a_model_name_two_packages_register_is_refused(tmp_path, monkeypatch):
    _plugin_dist(tmp_path, "tinymodels", "tinymodels", TINY)
    _plugin_dist(tmp_path, "tinyb", "tinyb", TINY.replace("1)", "2)"))
    monkeypatch.syspath_prepend(str(tmp_path))
    message = r"--model 'tiny' is registered by more than one package: .*(tinymodels|tinyb)"
    with pytest.raises(InputError, match=message):
        instantiate(ModelSpec("tiny", 3, 1, ()))
    with pytest.raises(InputError, match=message):
        model_code("tiny")


@pytest.mark.parametrize(
    "plugin",
    [
        "from tinyhelper import make_builder\n\nbuild = make_builder({scale})\n",
        "import functools\n\nfrom tinyhelper import scaled\n\nbuild = functools.partial(scaled, "
        "scale={scale})\n",
    ],
    ids=["built-by-a-helper", "partial"],
)
def test_a_plugins_own_module_counts_wherever_its_builder_is_defined(tmp_path, monkeypatch, plugin):
    (tmp_path / "tinyhelper.py").write_text(
        "import torch.nn as nn\n\n\n"
        "def scaled(spec, scale):\n    return nn.Linear(spec.n_inputs, int(scale))\n\n\n"
        "def make_builder(scale):\n    return lambda spec: scaled(spec, scale)\n"
    )
    _plugin_dist(tmp_path, "tinymodels", "tinymodels", plugin.format(scale="1.0"))
    monkeypatch.syspath_prepend(str(tmp_path))
    codes = []
    try:
        for scale in ("1.0", "2.0"):
            (tmp_path / "tinymodels.py").write_text(plugin.format(scale=scale))
            for name in ("tinymodels", "tinyhelper"):
                sys.modules.pop(name, None)
            codes.append(model_code("tiny")["code"])
    finally:
        for name in ("tinymodels", "tinyhelper"):
            sys.modules.pop(name, None)
    assert codes[0] != codes[1]
