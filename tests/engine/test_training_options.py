"""#15's training options without Prefect: metrics, standardization, schedules, early stopping,
best export, clipping, bf16, and the config rules that tie them together."""

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from trainflow.flows.config import TrainConfig
from trainflow.tasks.data.batches import make_loaders
from trainflow.tasks.data.splits import split_indices
from trainflow.tasks.data.tensors import Dataset, load_dataset, synthetic
from trainflow.tasks.engine.fit import check_precision, train_model
from trainflow.tasks.engine.losses import output_width
from trainflow.tasks.engine.metrics import HOST_VALUES, ValMetrics, auroc
from trainflow.tasks.engine.models import ModelSpec, feature_statistics, initial_model, instantiate
from trainflow.tasks.engine.options import TrainingOptions
from trainflow.tasks.engine.schedules import EarlyStopping
from trainflow.tasks.errors import InputError

from ..conftest import REPO

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
TABLE = REPO / "tests" / "fixtures" / "scaled_binary.csv"


def _train(
    data: Dataset, loss="mse", epochs=10, optimizer="sgd", lr=0.1, standardize=False, **options
):
    parts = split_indices(len(data), 0.2, 13)
    loaders = make_loaders(data, parts, 16, 42, "tensor", 0, CPU)
    spec = ModelSpec("linear", data.n_features, output_width(loss, data.y), standardize=standardize)
    initial = initial_model(spec, 42, data.x[parts.train])
    trained = train_model(
        initial,
        loaders,
        optimizer,
        lr,
        0.0,
        0.0,
        loss,
        epochs,
        CPU,
        options=TrainingOptions(**options),
    )
    return trained, parts


# --- metrics ------------------------------------------------------------------------------


def _pairwise_auroc(score: np.ndarray, positive: np.ndarray) -> float:
    pos, neg = score[positive], score[~positive]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


def test_auroc_counts_ties_as_one_half_and_equals_the_pairwise_definition():
    g = torch.Generator().manual_seed(0)
    score = torch.randint(0, 6, (200,), generator=g).float()  # many ties
    positive = torch.rand(200, generator=g) < 0.4
    got = float(auroc(score, positive))
    assert got == pytest.approx(_pairwise_auroc(score.numpy(), positive.numpy()), abs=1e-6)


def test_binary_metrics_equal_an_independent_computation():
    g = torch.Generator().manual_seed(1)
    y = (torch.rand(101, 1, generator=g) < 0.3).float()
    logits = torch.randn(101, 1, generator=g) + y
    metrics = ValMetrics("bce_with_logits", y, 1)
    values = metrics.measure(logits)
    said, truth = (logits[:, 0] > 0).numpy(), (y[:, 0] == 1).numpy()
    tp = (said & truth).sum()
    assert values["val_accuracy"] == pytest.approx((said == truth).mean())
    assert values["val_f1"] == pytest.approx(2 * tp / (said.sum() + truth.sum()))
    assert values["val_auroc"] == pytest.approx(_pairwise_auroc(logits[:, 0].numpy(), truth))
    one_class = ValMetrics("bce_with_logits", torch.zeros(4, 1), 1)
    values = one_class.measure(torch.randn(4, 1, generator=g))
    assert "val_auroc" not in values  # undefined without both classes: left out, not NaN


def test_cross_entropy_reports_accuracy_and_binary_ones_f1_and_auroc_too():
    y = torch.tensor([[0.0], [1.0], [2.0], [1.0]])
    logits = torch.tensor([[2.0, 0, 0], [0, 1, 0], [0, 3, 0], [0, 2, 1]])
    metrics = ValMetrics("cross_entropy", y, 3)
    assert metrics.names == ("val_accuracy",)
    assert metrics.measure(logits) == {"val_accuracy": 0.75}
    binary = ValMetrics("cross_entropy", torch.tensor([[0.0], [1.0]]), 2)
    assert binary.names == ("val_accuracy", "val_f1", "val_auroc")


# Small splits are measured on the host, larger ones on the device: both sides of the line.
@pytest.mark.parametrize("rows", [20, HOST_VALUES // 2, HOST_VALUES + 1, 500])
@pytest.mark.parametrize("width", [1, 2])
def test_regression_metrics_equal_numpy_and_a_constant_target_is_finite(rows, width):
    g = torch.Generator().manual_seed(rows * width)
    y, pred = torch.randn(rows, width, generator=g), torch.randn(rows, width, generator=g)
    metrics = ValMetrics("mse", y, width)
    assert metrics.on_host == (rows * width <= HOST_VALUES)
    values = metrics.measure(pred)
    yn, pn = y.double().numpy(), pred.double().numpy()
    r2 = 1 - ((yn - pn) ** 2).sum(0) / ((yn - yn.mean(0)) ** 2).sum(0)
    assert values["val_mae"] == pytest.approx(np.abs(yn - pn).mean(), rel=1e-6)
    assert values["val_r2"] == pytest.approx(r2.mean(), rel=1e-6)
    constant = ValMetrics("mse", torch.ones(rows, width), width)
    assert constant.measure(torch.zeros(rows, width)) == {"val_mae": 1.0, "val_r2": 0.0}
    assert constant.measure(torch.ones(rows, width))["val_r2"] == 1.0


@pytest.mark.parametrize("rows", [20, HOST_VALUES + 1, 500])
def test_a_constant_target_column_scores_as_sklearn_on_either_side_of_the_host_line(rows):
    """sklearn's r2_score: a constant column scores 1 if predicted exactly, else 0; averaged
    with the others. Its float32 mean can be an ulp off the value: the total must still be 0."""
    varying = torch.linspace(0, 1, rows)
    y = torch.stack([varying, torch.full((rows,), 0.1)], 1)
    pred = y + 0.01
    expected = (1 - 0.01**2 * rows / float(((varying - varying.mean()) ** 2).sum()) + 0.0) / 2
    assert ValMetrics("mse", y, 2).measure(pred)["val_r2"] == pytest.approx(expected, rel=1e-4)
    constant = torch.full((rows, 1), 1.7)
    assert ValMetrics("mse", constant, 1).measure(constant + 1e-3)["val_r2"] == 0.0
    assert ValMetrics("mse", constant, 1).measure(constant.clone())["val_r2"] == 1.0


def test_each_epoch_records_the_losses_metrics_and_the_lr():
    trained, _ = _train(synthetic(), epochs=5)
    assert set(trained.metrics) == {"val_mae", "val_r2", "lr"}
    assert all(len(values) == 5 for values in trained.metrics.values())
    assert trained.metrics["lr"] == [0.1] * 5
    assert trained.metrics["val_r2"][-1] > 0.8


def test_without_metrics_an_epoch_records_the_lr_and_trains_exactly_the_same():
    measured, _ = _train(synthetic(), epochs=5)
    plain, _ = _train(synthetic(), epochs=5, metrics=False)
    assert set(plain.metrics) == {"lr"} and plain.metrics["lr"] == measured.metrics["lr"]
    assert (plain.train_loss, plain.val_loss) == (measured.train_loss, measured.val_loss)
    assert all(torch.equal(plain.state[k], measured.state[k]) for k in measured.state)


# --- standardization ----------------------------------------------------------------------


def test_statistics_come_from_the_training_rows_and_a_constant_column_is_safe():
    x = torch.tensor([[1.0, 5.0], [3.0, 5.0], [100.0, 5.0]])
    mean, std = feature_statistics(x[:2])
    assert mean.tolist() == [2.0, 5.0] and std.tolist() == [1.0, 1.0]  # std 0 → 1
    spec = ModelSpec("linear", 2, 1, standardize=True)
    model = instantiate(spec, initial_model(spec, 42, x[:2]).state)
    assert torch.isfinite(model(x)).all()


def test_standardize_adds_buffers_and_keeps_the_layer_keys_and_initial_weights():
    plain = initial_model(ModelSpec("mlp", 3, 1, (4,)), 42).state
    spec = ModelSpec("mlp", 3, 1, (4,), standardize=True)
    scaled = initial_model(spec, 42, torch.randn(10, 3)).state
    assert list(plain) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert list(scaled) == ["standardize.mean", "standardize.std", *plain]
    assert all(torch.equal(plain[k], scaled[k]) for k in plain)


def test_standardize_takes_a_badly_scaled_table_from_chance_to_95_percent():
    data = load_dataset(str(TABLE))
    raw, _ = _train(data, "bce_with_logits", 30, "adam", 0.01)
    scaled, _ = _train(data, "bce_with_logits", 30, "adam", 0.01, standardize=True)
    assert max(raw.metrics["val_accuracy"]) < 0.65
    assert scaled.metrics["val_accuracy"][-1] >= 0.95


# --- schedules ----------------------------------------------------------------------------


def test_warm_up_then_cosine_per_epoch():
    trained, _ = _train(synthetic(), epochs=8, lr_schedule="cosine", warmup_epochs=2, min_lr=0.0)
    expected = [0.1 / 3, 0.2 / 3] + [0.05 * (1 + math.cos(math.pi * k / 6)) for k in range(6)]
    assert trained.metrics["lr"] == pytest.approx(expected)


def test_step_schedule_decays_every_step_size_epochs():
    trained, _ = _train(synthetic(), epochs=6, lr_schedule="step", step_size=2, gamma=0.5)
    assert trained.metrics["lr"] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025])


def test_onecycle_steps_per_step_up_to_lr_and_back_down():
    trained, _ = _train(synthetic(), epochs=6, lr_schedule="onecycle", warmup_epochs=2)
    lrs = trained.metrics["lr"]  # the lr after each epoch's last step
    assert lrs[1] == pytest.approx(0.1, rel=0.01) and max(lrs) <= 0.1 + 1e-12 and lrs[-1] < 1e-3


def test_under_a_schedule_every_step_is_the_optimizers_own(monkeypatch):
    """A hook on `SGD.step` (a profiler's, a user's) sees every update: 3 epochs of 5 steps."""
    calls = []
    real = torch.optim.SGD.step
    monkeypatch.setattr(torch.optim.SGD, "step", lambda *a, **k: calls.append(1) or real(*a, **k))
    _train(synthetic(), epochs=3, lr_schedule="onecycle", warmup_epochs=1)
    assert len(calls) == 15


# --- early stopping and the best epoch ----------------------------------------------------


def test_early_stopping_stops_where_the_patience_says():
    assert EarlyStopping(2, 0.0, [5, 4, 4.5, 3, 3.5, 3.2]).stopped_at == 5
    assert EarlyStopping(2, 0.6, [5, 4, 3.5, 3.45]).stopped_at == 3  # neither 0.6 below 4
    assert EarlyStopping(0, 0.0, [1, 2, 3, 4]).stopped_at is None
    data = load_dataset(str(TABLE))
    trained, _ = _train(data, "bce_with_logits", 60, "adam", 0.01, early_stopping_patience=3)
    stop = trained.stopped_early_at
    assert stop is not None and len(trained.val_loss) == stop + 1 < 60
    assert stop == EarlyStopping(3, 0.0, trained.val_loss).stopped_at


def test_export_best_holds_the_weights_of_the_lowest_validation_loss():
    data = load_dataset(str(TABLE))
    kwargs = {"loss": "bce_with_logits", "optimizer": "adam", "lr": 0.01}
    best, _ = _train(data, epochs=30, export="best", **kwargs)
    assert best.best_epoch == int(np.argmin(best.val_loss)) < 29  # this table overfits
    upto, _ = _train(data, epochs=best.best_epoch + 1, **kwargs)
    assert all(torch.equal(best.state[k], upto.state[k]) for k in upto.state)


# --- clipping and precision ---------------------------------------------------------------


def test_a_clip_above_every_norm_changes_nothing_and_a_tight_one_changes_the_run():
    plain, _ = _train(synthetic(), epochs=3)
    loose, _ = _train(synthetic(), epochs=3, grad_clip=1e6)
    tight, _ = _train(synthetic(), epochs=3, grad_clip=0.01)
    assert loose.train_loss == plain.train_loss
    assert tight.train_loss != plain.train_loss


def test_bf16_autocasts_the_forward_pass_and_still_learns():
    plain, _ = _train(synthetic(), epochs=20)
    bf16, _ = _train(synthetic(), epochs=20, precision="bf16")
    assert bf16.val_loss != plain.val_loss and bf16.val_loss[-1] < 0.05
    assert all(v.dtype == torch.float32 for v in bf16.state.values())


def test_bf16_on_a_device_without_it_is_one_line_naming_the_field():
    with pytest.raises(InputError, match=r"^--precision bf16: .*no bfloat16"):
        check_precision("bf16", torch.device("meta"))
    check_precision("bf16", CPU)


# --- the config's rules -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"gamma": 0.5}, "--gamma is for --lr-schedule step"),
        ({"min_lr": 0.01, "lr_schedule": "step"}, "--min-lr is for --lr-schedule cosine"),
        ({"lr_schedule": "onecycle"}, "onecycle needs --warmup-epochs"),
        ({"warmup_epochs": 200}, "leaves no epoch"),
        ({"lr_schedule": "cosine", "min_lr": 0.5}, "must be below --lr"),
        ({"early_stopping_min_delta": 0.1}, "needs --early-stopping-patience"),
        ({"precision": "bf16", "device": "mps"}, "needs a CPU or CUDA device"),
    ],
)
def test_combinations_that_do_not_fit_are_refused(fields, message):
    with pytest.raises(ValidationError, match=message):
        TrainConfig(**fields)


def test_the_defaults_are_the_seeds_and_every_option_reaches_train_epochs():
    assert TrainConfig().training_options == TrainingOptions()
    cfg = TrainConfig(lr_schedule="step", step_size=3, export="best", grad_clip=1.0)
    options = cfg.training_options
    assert (options.step_size, options.export, options.grad_clip) == (3, "best", 1.0)
