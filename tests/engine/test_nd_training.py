"""Training on N-d data and class ids: the losses and metrics of int64 targets, the project's
metrics, and the epoch loop's per-batch augmentation hook."""

import sys
import uuid
from pathlib import Path

import pytest
import torch
from torch import nn

import trainflow.tasks.cache.code_keys
from trainflow.tasks.data.batches import TensorBatches
from trainflow.tasks.engine.augment import (
    BatchAugment,
    batch_generator,
    built_in,
    compose,
    random_crop,
)
from trainflow.tasks.engine.fit import batch_augment
from trainflow.tasks.engine.loop import EpochLoop
from trainflow.tasks.engine.losses import make_loss, n_classes, output_width
from trainflow.tasks.engine.metrics import ValMetrics
from trainflow.tasks.engine.models import initial_model, instantiate, model_spec
from trainflow.tasks.engine.options import TrainingOptions
from trainflow.tasks.errors import InputError

pytestmark = pytest.mark.usefixtures("one_thread")


def logits(n: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


# --- losses ------------------------------------------------------------------------------------


def test_cross_entropy_on_int64_class_ids_is_cross_entropy_loss():
    pred, y = logits(6, 4), torch.tensor([0, 3, 1, 2, 3, 0])
    loss = make_loss("cross_entropy", torch.int64)
    assert torch.equal(loss(pred, y), nn.CrossEntropyLoss()(pred, y))


def test_cross_entropy_on_a_tables_float_ids_is_the_same_loss():
    pred, y = logits(6, 4), torch.tensor([0, 3, 1, 2, 3, 0])
    loss = make_loss("cross_entropy", torch.float32)
    assert torch.equal(loss(pred, y.float().unsqueeze(1)), nn.CrossEntropyLoss()(pred, y))


@pytest.mark.parametrize(
    ("name", "module"), [("mse", nn.MSELoss), ("l1", nn.L1Loss), ("huber", nn.HuberLoss)]
)
def test_an_elementwise_loss_on_int64_ids_compares_them_as_n_by_1_values(name, module):
    pred, y = logits(5, 1), torch.tensor([0, 3, 1, 2, 1])
    got = make_loss(name, torch.int64)(pred, y)
    assert torch.equal(got, module()(pred, y.float().unsqueeze(1)))
    # Not pred (N×1) against y (N) broadcast to N×N.
    broadcast = ((pred - y.float()) ** 2).mean() if name == "mse" else None
    if broadcast is not None:
        assert not torch.allclose(got, broadcast)


def test_an_elementwise_loss_on_float_targets_is_the_plain_loss():
    pred, y = logits(5, 2), logits(5, 2, seed=1)
    assert torch.equal(make_loss("mse")(pred, y), nn.MSELoss()(pred, y))


def test_an_unknown_loss_is_named():
    with pytest.raises(InputError, match="'nope'"):
        make_loss("nope")


def test_output_width_of_class_ids():
    assert output_width("cross_entropy", torch.tensor([0, 4, 2])) == 5
    assert output_width("cross_entropy", torch.tensor([[0.0], [2.0]])) == 3
    assert output_width("mse", torch.tensor([0, 4, 2])) == 1  # the ids as one value
    assert output_width("my_own_loss", torch.tensor([0, 4, 2])) == 5  # one logit per class
    assert output_width("mse", torch.ones(4, 3)) == 3


def test_a_fractional_class_id_names_the_file_and_the_row():
    y = torch.tensor([[0.0], [1.0], [2.5], [1.0]])
    with pytest.raises(InputError) as info:
        output_width("cross_entropy", y, "d.npz")
    message = str(info.value)
    assert "\n" not in message and "'d.npz'" in message
    assert "row 2" in message and "2.5" in message


@pytest.mark.parametrize(
    "y", [torch.tensor([0, 2, -1, 1]), torch.tensor([[0.0], [2.0], [-1.0], [1.0]])]
)
def test_negative_class_ids_are_refused_naming_the_row(y):
    with pytest.raises(InputError) as info:
        output_width("cross_entropy", y, "d.pt")
    message = str(info.value)
    assert "'d.pt'" in message and "0 or more" in message and "row 2" in message
    assert "tensor(" not in message


def test_negative_ids_for_a_projects_loss_are_refused():
    with pytest.raises(InputError, match="0 or more"):
        output_width("my_own_loss", torch.tensor([1, -3]), "d.pt")


def test_cross_entropy_needs_one_target_column():
    with pytest.raises(InputError, match="one target column"):
        output_width("cross_entropy", torch.zeros(4, 2), "d.npz")


def test_n_classes():
    assert n_classes(torch.tensor([0, 3, 1])) == 4
    assert n_classes(torch.tensor([[0.0], [3.0]])) == 0
    assert n_classes(torch.tensor([[0, 1], [1, 0]])) == 0


# --- metrics -------------------------------------------------------------------------------------


def test_accuracy_on_int64_class_ids():
    y = torch.tensor([0, 1, 2, 1])
    outputs = torch.eye(3)[torch.tensor([0, 1, 1, 1])]  # predicts 0, 1, 1, 1
    metrics = ValMetrics("cross_entropy", y, 3)
    assert metrics.names == ("val_accuracy",)
    assert metrics.measure(outputs) == {"val_accuracy": 0.75}


def test_two_class_ids_get_f1_and_auroc_too():
    y = torch.tensor([0, 1, 1, 0])
    outputs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    values = ValMetrics("cross_entropy", y, 2).measure(outputs)
    assert values["val_accuracy"] == 0.5 and values["val_f1"] == 0.5
    assert values["val_auroc"] == 0.5


def test_mse_on_int64_ids_is_measured_as_values():
    y = torch.tensor([0, 2, 4])
    values = ValMetrics("mse", y, 1).measure(torch.tensor([[1.0], [2.0], [4.0]]))
    assert values["val_mae"] == pytest.approx(1 / 3)
    assert "val_accuracy" not in values


def _recording(name: str, calls: list, value=None):
    def fn(outputs, targets):
        calls.append((name, outputs.clone(), targets))
        return outputs.sum() if value is None else value

    return fn


def test_a_projects_metric_gets_the_whole_split_and_the_targets_as_stored():
    y = torch.tensor([0, 1, 2, 1, 0])
    calls: list = []
    metrics = ValMetrics("cross_entropy", y, 3, {"total": _recording("total", calls)})
    batches = [logits(2, 3), logits(3, 3, seed=1)]
    values = metrics.finish(torch.cat(metrics.parts(batches)).tolist())
    (_, outputs, targets), *rest = calls
    assert not rest
    assert torch.equal(outputs, torch.cat(batches)) and targets is y
    assert targets.dtype == torch.int64 and targets.shape == (5,)
    assert set(values) == {"val_accuracy", "val_total"}
    assert values["val_total"] == pytest.approx(float(torch.cat(batches).sum()))
    expected = float((torch.cat(batches).argmax(1) == y).float().mean())
    assert values["val_accuracy"] == pytest.approx(expected)


def test_several_project_metrics_keep_their_order_and_any_number_type():
    y = torch.rand(4, 1, generator=torch.Generator().manual_seed(0))
    extra = {"a": lambda o, t: 1, "b": lambda o, t: torch.tensor(2.5), "c": lambda o, t: 3.0}
    metrics = ValMetrics("mse", y, 1, extra)
    values = metrics.measure(y.clone())
    assert values["val_a"] == 1.0 and values["val_b"] == 2.5 and values["val_c"] == 3.0
    assert values["val_mae"] == 0.0 and values["val_r2"] == 1.0


def test_without_builtin_metrics_only_the_projects():
    y = torch.tensor([0, 1, 2])
    metrics = ValMetrics("cross_entropy", y, 3, {"one": lambda o, t: 1.0}, builtin=False)
    assert metrics.measure(logits(3, 3)) == {"val_one": 1.0}


# --- the epoch loop's augment hook ---------------------------------------------------------------

N_TRAIN, N_VAL, BATCH, EPOCHS = 12, 5, 4, 3
VAL_PIXEL = 7  # every validation pixel; no training row is all of it


def image_split() -> tuple[TensorBatches, TensorBatches]:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(100, 256, (N_TRAIN, 1, 8, 8), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 3, (N_TRAIN,), generator=g)
    x_val = torch.full((N_VAL, 1, 8, 8), VAL_PIXEL, dtype=torch.uint8)
    y_val = torch.tensor([0, 1, 2, 1, 0])
    return TensorBatches(x, y, BATCH, seed=5), TensorBatches(x_val, y_val, 2, None)


def train(augment=None, metrics=None) -> tuple[dict[str, torch.Tensor], dict]:
    spec = model_spec("linear", 64, 3, (), "relu", input_shape=(1, 8, 8), input_dtype="uint8")
    model = instantiate(spec, initial_model(spec, seed=0).state)
    train_batches, val_batches = image_split()
    loop = EpochLoop(
        model,
        train_batches,
        val_batches,
        make_loss("cross_entropy", torch.int64),
        torch.optim.SGD(model.parameters(), lr=0.5),
        EPOCHS,
        metrics=metrics,
        augment=augment,
    )
    history = loop.run()
    return {k: v.clone() for k, v in model.state_dict().items()}, history.metrics


def crop_and_flip() -> BatchAugment:
    return BatchAugment(compose(built_in(["crop", "flip"], 1)), seed=0)


class Recorder:
    """The hook, wrapped: each call's (epoch, batch) and the batch it was given."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __call__(self, x, epoch, batch):
        self.calls.append((epoch, batch, x.clone()))
        return self.inner(x, epoch, batch)


def test_the_hook_gets_every_training_batch_in_order_and_no_validation_batch():
    hook = Recorder(crop_and_flip())
    train(hook)
    per_epoch = -(-N_TRAIN // BATCH)
    expected = [(e, b) for e in range(EPOCHS) for b in range(per_epoch)]
    assert [(e, b) for e, b, _ in hook.calls] == expected
    for _, _, x in hook.calls:
        assert x.dtype == torch.uint8 and x.shape[1:] == (1, 8, 8)
        assert not (x == VAL_PIXEL).flatten(1).all(1).any()  # no validation row
        assert (x >= 100).all()  # the training rows as stored, not augmented ones


def test_the_hooks_output_is_what_trains():
    zeros = train(lambda x, epoch, batch: torch.zeros_like(x))[0]
    # Zero inputs: only the bias learns; the weights stay the initial ones.
    spec = model_spec("linear", 64, 3, (), "relu", input_shape=(1, 8, 8), input_dtype="uint8")
    assert torch.equal(zeros["0.weight"], initial_model(spec, seed=0).state["0.weight"])
    assert not torch.equal(zeros["0.weight"], train()[0]["0.weight"])


def test_two_augmented_runs_give_bit_identical_weights():
    first, second = train(crop_and_flip())[0], train(crop_and_flip())[0]
    plain = train()[0]
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["0.weight"], plain["0.weight"])  # the augmentation did act


def test_a_projects_metric_in_the_loop_sees_the_whole_validation_split_each_epoch():
    calls: list = []

    def metrics(y_val):
        return ValMetrics("cross_entropy", y_val, 3, {"n": _recording("n", calls, 0.0)})

    _, history = train(crop_and_flip(), metrics)
    assert len(calls) == EPOCHS
    for _, outputs, targets in calls:
        assert outputs.shape == (N_VAL, 3)  # the split, though its batches are of 2
        assert targets.tolist() == [0, 1, 2, 1, 0] and targets.dtype == torch.int64
    assert history["val_n"] == [0.0] * EPOCHS and len(history["val_accuracy"]) == EPOCHS


# --- fit.batch_augment ---------------------------------------------------------------------------


def test_batch_augment_from_options_is_the_seeded_crop():
    x = torch.randint(0, 256, (8, 1, 8, 8), generator=torch.Generator().manual_seed(2))
    x = x.to(torch.uint8)
    hook = batch_augment(TrainingOptions(augment=("crop",)), rank=0)
    assert isinstance(hook, BatchAugment) and hook.seed == 0 and hook.rank == 0
    assert torch.equal(hook(x, 1, 2), random_crop(4)(x, batch_generator(0, 1, 2)))
    other = batch_augment(TrainingOptions(augment=("crop",), augment_seed=3), rank=1)
    assert torch.equal(other(x, 1, 2), random_crop(4)(x, batch_generator(3, 1, 2, 1)))


def test_batch_augment_keeps_the_order_and_padding_named():
    x = torch.randint(0, 256, (8, 1, 8, 8), generator=torch.Generator().manual_seed(2))
    x = x.to(torch.uint8)
    options = TrainingOptions(augment=("flip", "crop"), crop_padding=1)
    hook = batch_augment(options, rank=0)
    expected = compose(built_in(["flip", "crop"], 1))(x, batch_generator(0, 0, 3))
    assert torch.equal(hook(x, 0, 3), expected)


def test_no_augmentation_is_no_hook():
    assert batch_augment(TrainingOptions(), rank=0) is None


def test_batch_augment_from_options_trains_reproducibly():
    options = TrainingOptions(augment=("crop",))
    first = train(batch_augment(options, 0))[0]
    second = train(batch_augment(options, 0))[0]
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["0.weight"], train()[0]["0.weight"])


@pytest.fixture
def invert_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    module = f"tfnd_{uuid.uuid4().hex[:10]}"
    (tmp_path / f"{module}.py").write_text("def invert(x, g):\n    return 255 - x\n")
    (tmp_path / "trainflow.toml").write_text(f'[augmentations]\ninvert = "{module}:invert"\n')
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(trainflow.tasks.cache.code_keys, "_plugins", set())
    yield
    sys.modules.pop(module, None)


def test_batch_augment_runs_the_projects_augmentation_after_the_built_in(invert_project):
    x = torch.randint(0, 256, (4, 1, 8, 8), generator=torch.Generator().manual_seed(2))
    x = x.to(torch.uint8)
    hook = batch_augment(TrainingOptions(augment=("crop", "invert")), rank=0)
    assert torch.equal(hook(x, 0, 0), 255 - random_crop(4)(x, batch_generator(0, 0, 0)))


def test_an_augmentation_the_project_does_not_register_is_named(invert_project):
    with pytest.raises(InputError, match="'blur'"):
        batch_augment(TrainingOptions(augment=("blur",)), rank=0)
