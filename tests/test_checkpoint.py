"""Checkpoints and resume, without Prefect: bit-identical results from any (epoch, batch)."""

import signal

import pytest
import torch

from tasks.checkpoint import Checkpoints, TrainState, decode, encode
from tasks.data import synthetic
from tasks.errors import NonFiniteLoss
from tasks.loaders import make_loaders
from tasks.model import ModelSpec, initial_model
from tasks.split import split_indices
from tasks.train import Interrupted, StopSignals, train_model

CPU = torch.device("cpu")


def _train(checkpoints=None, resume=None, stop=None, optimizer="sgd", momentum=0.0, epochs=6,
           lr=0.1, n=200):  # fmt: skip
    data = synthetic(n_samples=n)
    loaders = make_loaders(data, split_indices(n, 0.2, 13), 16, 42, "tensor", 0, CPU)
    initial = initial_model(ModelSpec("mlp", 1, 1, (8,), "tanh"), 42)
    return train_model(initial, loaders, optimizer, lr, momentum, 0.0, "mse", epochs, CPU,
                       checkpoints=checkpoints, resume=resume, stop=stop)  # fmt: skip


def _assert_identical(a, b):
    assert a.train_loss == b.train_loss and a.val_loss == b.val_loss
    for key, value in a.state.items():
        assert torch.equal(value, b.state[key]), key


@pytest.mark.parametrize(("optimizer", "momentum"), [("sgd", 0.0), ("sgd", 0.9), ("adam", 0.0)])
def test_resuming_from_every_epoch_checkpoint_is_bit_identical(tmp_path, optimizer, momentum):
    reference = _train(optimizer=optimizer, momentum=momentum)
    store = Checkpoints(str(tmp_path), every_epochs=1, every_seconds=0, keep=100)
    _train(store, optimizer=optimizer, momentum=momentum)
    for epoch in range(1, 6):
        resume = Checkpoints(str(tmp_path)).latest(max_epoch=epoch)
        assert (resume.epoch, resume.batch) == (epoch, 0)
        resumed = _train(resume=resume, optimizer=optimizer, momentum=momentum)
        _assert_identical(resumed, reference)
        assert resumed.resumed_from == {"epoch": epoch, "batch": 0}
        assert resumed.epochs_trained == 6 - epoch


def test_resuming_mid_epoch_is_bit_identical(tmp_path):
    reference = _train(optimizer="adam")
    store = Checkpoints(str(tmp_path), every_seconds=1e-9, keep=10**6)  # after every step
    _train(store, optimizer="adam")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert any(name.split("-")[2] not in ("000000000",) for name in names)  # mid-epoch ones
    for path in sorted(tmp_path.iterdir())[3:40:6]:
        resume = decode(path.read_bytes())
        _assert_identical(_train(resume=resume, optimizer="adam"), reference)


def test_extending_a_finished_run_equals_training_longer_from_scratch(tmp_path):
    _train(Checkpoints(str(tmp_path), every_seconds=0), epochs=4)
    resume = Checkpoints(str(tmp_path)).latest(max_epoch=7)
    assert (resume.epoch, resume.batch) == (4, 0)
    _assert_identical(_train(resume=resume, epochs=7), _train(epochs=7))


def test_only_the_last_few_checkpoints_are_kept(tmp_path):
    _train(Checkpoints(str(tmp_path), every_epochs=1, every_seconds=0, keep=2))
    assert [p.name.split("-")[1] for p in sorted(tmp_path.iterdir())] == ["000000005", "000000006"]


def test_a_checkpoint_round_trips_without_pickle():
    state = TrainState(
        epoch=3, batch=2, model={"0.weight": torch.randn(2, 2)},
        optimizer={"state": {0: {"momentum_buffer": None, "step": torch.tensor(4.0)}},
                   "param_groups": [{"lr": 0.1, "betas": [0.9, 0.999], "params": [0]}]},
        loader={"generator": torch.Generator().manual_seed(1).get_state()},
        batch_losses=torch.tensor([0.5, 0.25]), train_loss=[1.0, 0.5, 0.25],
        val_loss=[1.5, 0.75, 0.3], rng={"cpu": torch.get_rng_state()},
    )  # fmt: skip
    data = encode(state)
    assert not data.startswith(b"\x80\x02")
    back = decode(data)
    assert (back.epoch, back.batch, back.train_loss, back.val_loss) == (3, 2, state.train_loss,
                                                                        state.val_loss)  # fmt: skip
    assert back.optimizer["state"][0]["momentum_buffer"] is None
    assert torch.equal(back.optimizer["state"][0]["step"], torch.tensor(4.0))
    assert torch.equal(back.model["0.weight"], state.model["0.weight"])
    assert torch.equal(back.loader["generator"], state.loader["generator"])


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_checkpoint_is_skipped_for_the_previous_one(tmp_path, damage, caplog):
    _train(Checkpoints(str(tmp_path), every_epochs=1, every_seconds=0, keep=10))
    newest = sorted(tmp_path.iterdir())[-1]
    data = bytearray(newest.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 1
    newest.write_bytes(bytes(data))
    resume = Checkpoints(str(tmp_path)).latest(max_epoch=6)
    assert (resume.epoch, resume.batch) == (5, 0)
    assert "skipping checkpoint" in caplog.text


def test_a_checkpoint_past_the_requested_epochs_is_not_used(tmp_path):
    _train(Checkpoints(str(tmp_path), every_epochs=2, every_seconds=0, keep=10))
    assert Checkpoints(str(tmp_path)).latest(max_epoch=3).epoch == 2
    assert Checkpoints(str(tmp_path / "empty")).latest(max_epoch=3) is None


def test_a_diverging_run_keeps_only_finite_checkpoints(tmp_path):
    with pytest.raises(NonFiniteLoss, match=r"epoch \d+, batch \d+"):
        _train(Checkpoints(str(tmp_path), every_seconds=1e-9, keep=10**6), lr=50.0, epochs=50)
    last = Checkpoints(str(tmp_path)).latest(max_epoch=50)
    assert last is not None
    assert all(torch.isfinite(v).all() for v in last.model.values())
    assert torch.isfinite(last.batch_losses).all()


def test_a_stop_request_checkpoints_then_interrupts(tmp_path):
    stop = StopSignals()
    stop.signum = signal.SIGTERM
    with pytest.raises(Interrupted, match="SIGTERM"):
        _train(Checkpoints(str(tmp_path), every_seconds=0), stop=stop)
    resume = Checkpoints(str(tmp_path)).latest(max_epoch=6)
    assert (resume.epoch, resume.batch) == (0, 1)
    _assert_identical(_train(resume=resume), _train())


def test_the_cache_command_lists_and_prunes_checkpoints(tmp_path):
    from tasks.prune import list_entries, prune

    _train(Checkpoints(str(tmp_path / "checkpoints" / "lineage"), every_epochs=2, every_seconds=0))
    listed = [e.key for e in list_entries(str(tmp_path))]
    assert len(listed) == 3 and all(k.startswith("checkpoints/lineage/ckpt-") for k in listed)
    assert len(prune(str(tmp_path), older_than_s=0)) == 3
    assert not list(tmp_path.glob("checkpoints/lineage/*"))
