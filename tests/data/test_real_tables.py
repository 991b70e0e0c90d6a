"""End to end on a real table (tests/fixtures/scaled_binary.csv, made by make_tables.py there): what
--standardize, the metrics, --export best and early stopping write into the run folder, checked
against an independent computation from model.pt2, split.safetensors and the CSV itself."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from trainflow.flows.config import TrainConfig
from trainflow.flows.train_flow import train_flow

from ..conftest import REPO

pytestmark = pytest.mark.usefixtures("prefect_api", "one_thread")

TABLE = REPO / "tests" / "fixtures" / "scaled_binary.csv"
ROWS = np.loadtxt(TABLE, delimiter=",", skiprows=1, dtype=np.float32)
CLASSIFIER = {"data": str(TABLE), "loss": "bce_with_logits", "optimizer": "adam", "lr": 0.01}


def _run(tmp_path, name, **fields):
    config = TrainConfig(
        **CLASSIFIER, epochs=30, runs_dir=str(tmp_path / "runs"), run_name=name, **fields
    )
    run = train_flow(config).run_dir
    return Path(run), json.loads((Path(run) / "metrics.json").read_text())


def _predict(run):
    """The exported program on the raw validation rows of the CSV, and their labels."""
    val = load_file(run / "split.safetensors")["val"].numpy()
    program = torch.export.load(run / "model.pt2").module()
    with torch.no_grad():
        logits = program(torch.from_numpy(ROWS[val, :-1]))[:, 0].numpy()
    return logits, ROWS[val, -1] == 1


def _batch_mean_bce(logits, labels, batch=16):
    """The validation loss as the loop defines it: the mean of the per-batch means."""
    y = labels.astype(np.float64)
    x = logits.astype(np.float64)
    per_row = np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x)))
    return np.mean([per_row[i : i + batch].mean() for i in range(0, len(x), batch)])


def test_standardize_takes_the_table_from_chance_to_95_percent_and_the_metrics_check_out(
    tmp_path,
):
    _, raw = _run(tmp_path, "raw")
    run, scaled = _run(tmp_path, "standardized", standardize=True)
    assert max(raw["val_accuracy"]) < 0.65  # near chance: the large columns swamp the rest
    assert scaled["val_accuracy"][-1] >= 0.95

    # The statistics travel in the weights, fitted on the training rows only.
    weights = load_file(run / "model.safetensors")
    train = load_file(run / "split.safetensors")["train"].numpy()
    x_train = ROWS[train, :-1].astype(np.float64)
    np.testing.assert_allclose(weights["standardize.mean"], x_train.mean(0), rtol=1e-6)
    np.testing.assert_allclose(weights["standardize.std"], x_train.std(0), rtol=1e-5)
    assert {"0.weight", "0.bias"} <= weights.keys()

    # The last epoch's metrics are those of model.pt2 on the raw validation rows.
    logits, positive = _predict(run)
    said = logits > 0
    pos, neg = logits[positive], logits[~positive]
    auroc = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (
        len(pos) * len(neg)
    )
    assert scaled["val_accuracy"][-1] == pytest.approx((said == positive).mean(), abs=1e-12)
    f1 = 2 * (said & positive).sum() / (said.sum() + positive.sum())
    assert scaled["val_f1"][-1] == pytest.approx(f1, abs=1e-12)
    assert scaled["val_auroc"][-1] == pytest.approx(auroc, abs=1e-6)
    assert scaled["val_loss"][-1] == pytest.approx(_batch_mean_bce(logits, positive), rel=1e-5)

    # TensorBoard: one chart per metric and one for the lr, a point per epoch.
    events = EventAccumulator(str(run)).Reload()
    for tag in ("val_accuracy", "val_f1", "val_auroc", "lr"):
        assert [e.step for e in events.Scalars(tag)] == list(range(30)), tag
    assert scaled["lr"] == [0.01] * 30
    assert scaled["best_epoch"] is None and scaled["stopped_early_at"] is None


def test_export_best_is_the_argmin_of_val_loss_and_early_stopping_ends_where_patience_says(
    tmp_path,
):
    run, best = _run(tmp_path, "best", export="best")
    assert best["best_epoch"] == int(np.argmin(best["val_loss"]))
    assert best["best_epoch"] < 29  # unstandardized, this table's validation loss wanders
    logits, positive = _predict(run)
    assert _batch_mean_bce(logits, positive) == pytest.approx(min(best["val_loss"]), rel=1e-5)

    _, stopped = _run(tmp_path, "stopped", early_stopping_patience=3)
    stop = stopped["stopped_early_at"]
    assert stop is not None and stopped["epochs"] == len(stopped["val_loss"]) == stop + 1
    assert stopped["val_loss"] == best["val_loss"][: stop + 1]  # the same run, cut short
    losses, since = stopped["val_loss"], 0
    for epoch in range(1, stop + 1):  # patience 3: three epochs in a row not below the best
        since = 0 if losses[epoch] < min(losses[:epoch]) else since + 1
        assert (since >= 3) == (epoch == stop)
