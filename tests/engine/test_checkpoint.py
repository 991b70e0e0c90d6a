"""Checkpoints and resume, without Prefect: bit-identical results from any (epoch, batch)."""

import errno
import os
import signal

import pytest
import torch
from torch import nn

import trainflow.tasks.build_model
from trainflow.tasks.cache.store import CacheStore
from trainflow.tasks.data.batches import make_loaders
from trainflow.tasks.data.splits import split_indices
from trainflow.tasks.data.tensors import synthetic
from trainflow.tasks.engine.checkpoint import Checkpoints, TrainState, decode, encode, owner_token
from trainflow.tasks.engine.fit import train_model
from trainflow.tasks.engine.models import ModelSpec, initial_model
from trainflow.tasks.engine.options import TrainingOptions
from trainflow.tasks.engine.stops import Interrupted, StopSignals
from trainflow.tasks.errors import NonFiniteLoss

from ..torch_faults import fail_backward_once, fail_method_once

CPU = torch.device("cpu")
STEPS = 10  # per epoch: 160 training rows of the default 200, batch 16


def _loaders(n=200, kind="tensor"):
    return make_loaders(synthetic(n_samples=n), split_indices(n, 0.2, 13), 16, 42, kind, 0, CPU)


def _train(
    checkpoints=None,
    resume=None,
    stop=None,
    optimizer="sgd",
    momentum=0.0,
    epochs=6,
    lr=0.1,
    n=200,
    loaders=None,
    model="mlp",
    options=None,
):
    loaders = loaders or _loaders(n)
    initial = initial_model(ModelSpec(model, 1, 1, (8,), "tanh"), 42)
    return train_model(
        initial,
        loaders,
        optimizer,
        lr,
        momentum,
        0.0,
        "mse",
        epochs,
        CPU,
        checkpoints=checkpoints,
        resume=resume,
        stop=stop,
        options=options or TrainingOptions(),
    )


def _assert_identical(a, b):
    assert a.train_loss == b.train_loss and a.val_loss == b.val_loss
    assert a.metrics == b.metrics  # the validation metrics and the lr of every epoch
    assert (a.best_epoch, a.stopped_early_at) == (b.best_epoch, b.stopped_early_at)
    assert a.state.keys() == b.state.keys()
    for key, value in a.state.items():
        assert torch.equal(value, b.state[key]), key


# Every piece of #15's training state at once: a warm-up, then a cosine schedule over 12
# epochs; the best epoch's weights (epoch 5 on this data) and early stopping after 3 epochs
# without a better validation loss (epoch 8), so the run ends before its 12 epochs.
EVERYTHING = TrainingOptions(
    lr_schedule="cosine", warmup_epochs=2, early_stopping_patience=3, export="best"
)


def test_every_new_option_resumes_bit_identically_from_every_epoch_and_mid_epoch(tmp_path):
    reference = _train(epochs=12, options=EVERYTHING)
    assert reference.stopped_early_at == 8 and reference.best_epoch == 5
    assert len(reference.val_loss) == 9 and reference.epochs_trained == 9
    store = Checkpoints(str(tmp_path), every_seconds=1e-9, keep=10**6)  # after every step
    _train(store, epochs=12, options=EVERYTHING)
    paths = sorted(tmp_path.iterdir())
    assert decode(paths[-1].read_bytes()).epoch == 9  # where it stopped: the run's last
    for path in paths[::7] + paths[-3:]:
        resume = decode(path.read_bytes())
        resumed = _train(resume=resume, epochs=12, options=EVERYTHING)
        _assert_identical(resumed, reference)
        assert resumed.epochs_trained == 9 - resume.epoch


def test_a_per_step_schedule_resumes_bit_identically_mid_epoch(tmp_path):
    options = TrainingOptions(lr_schedule="onecycle", warmup_epochs=2, grad_clip=0.5)
    reference = _train(optimizer="adam", options=options)
    _train(
        Checkpoints(str(tmp_path), every_seconds=1e-9, keep=10**6),
        optimizer="adam",
        options=options,
    )
    for path in sorted(tmp_path.iterdir())[5:60:11]:
        resumed = _train(resume=decode(path.read_bytes()), optimizer="adam", options=options)
        _assert_identical(resumed, reference)


def test_a_run_that_stopped_early_stays_stopped_when_extended(tmp_path):
    """The stop follows from the loss history alone: a longer run of the lineage stops at
    the same epoch, and one resumed from the stopped run's checkpoint trains nothing more."""
    options = TrainingOptions(early_stopping_patience=3, export="best")
    stopped = _train(Checkpoints(str(tmp_path), every_seconds=0), epochs=12, options=options)
    assert stopped.stopped_early_at is not None and stopped.stopped_early_at < 11
    resume = Checkpoints(str(tmp_path)).latest(max_epoch=20)
    extended = _train(resume=resume, epochs=20, options=options)
    assert extended.epochs_trained == 0
    _assert_identical(extended, stopped)
    _assert_identical(extended, _train(epochs=20, options=options))


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
        epoch=3,
        batch=2,
        model={"0.weight": torch.randn(2, 2)},
        optimizer={
            "state": {0: {"momentum_buffer": None, "step": torch.tensor(4.0)}},
            "param_groups": [{"lr": 0.1, "betas": [0.9, 0.999], "params": [0]}],
        },
        loader={"generator": torch.Generator().manual_seed(1).get_state()},
        batch_losses=torch.tensor([0.5, 0.25]),
        train_loss=[1.0, 0.5, 0.25],
        val_loss=[1.5, 0.75, 0.3],
        rng={"cpu": torch.get_rng_state()},
        metrics={"val_mae": [0.1, 0.2, 1 / 3], "lr": [0.1, 0.05, 0.025]},
        scheduler={"last_epoch": 3, "_last_lr": [0.1 / 3], "_schedulers": [{"T_max": 10}]},
        best={"0.weight": torch.randn(2, 2)},
    )
    data = encode(state)
    assert not data.startswith(b"\x80\x02")
    back = decode(data)
    assert (back.epoch, back.batch, back.train_loss, back.val_loss) == (
        3,
        2,
        state.train_loss,
        state.val_loss,
    )
    assert back.optimizer["state"][0]["momentum_buffer"] is None
    assert torch.equal(back.optimizer["state"][0]["step"], torch.tensor(4.0))
    assert torch.equal(back.model["0.weight"], state.model["0.weight"])
    assert torch.equal(back.loader["generator"], state.loader["generator"])
    assert back.metrics == state.metrics and back.scheduler == state.scheduler
    assert torch.equal(back.best["0.weight"], state.best["0.weight"])


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


def test_a_stop_the_fence_refused_to_checkpoint_says_why_nothing_was_saved(tmp_path):
    """The fence (handed in) said another attempt owns the run: no checkpoint, and the
    message says so rather than an empty reason."""
    from trainflow.tasks.engine.ranks import SingleProcess

    stop = StopSignals()
    stop.signum = signal.SIGTERM
    with pytest.raises(Interrupted) as interrupted:
        train_model(
            initial_model(ModelSpec("linear", 1, 1), 42),
            _loaders(),
            "sgd",
            0.1,
            0.0,
            0.0,
            "mse",
            6,
            CPU,
            checkpoints=Checkpoints(str(tmp_path), every_seconds=0),
            stop=stop,
            ranks=SingleProcess(hold=lambda: False),
        )
    message = str(interrupted.value)
    assert "no checkpoint saved (another attempt owns this run" in message, message
    assert "None" not in message
    assert Checkpoints(str(tmp_path)).latest(max_epoch=6) is None


def test_the_cache_command_lists_and_prunes_checkpoints(tmp_path):
    from trainflow.tasks.cache.prune import list_entries, prune

    _train(Checkpoints(str(tmp_path / "checkpoints" / "lineage"), every_epochs=2, every_seconds=0))
    listed = [e.key for e in list_entries(str(tmp_path))]
    assert len(listed) == 3 and all(k.startswith("checkpoints/lineage/ckpt-") for k in listed)
    assert len(prune(str(tmp_path), older_than_s=0)) == 3
    assert not list(tmp_path.glob("checkpoints/lineage/*"))


# --- every attempt starts from its inputs and its checkpoint alone ------------------------


@pytest.mark.parametrize("kind", ["tensor", "dataloader"])
@pytest.mark.parametrize("step", [1, 7, 25, 41])
def test_a_retry_given_the_same_loaders_trains_the_uninterrupted_run(monkeypatch, kind, step):
    """Prefect retries a task with the very objects the failed attempt was given."""
    reference = _train(loaders=_loaders(kind=kind))
    loaders = _loaders(kind=kind)
    fail_backward_once(monkeypatch, step, f"injected fault at call {step}")
    with pytest.raises(RuntimeError, match="injected"):
        _train(loaders=loaders)
    _assert_identical(_train(loaders=loaders), reference)  # no checkpoint: from the start


@pytest.mark.parametrize("call", [1, 8, 23])
def test_a_fault_inside_the_sgd_update_leaves_gradients_on_for_the_retry(monkeypatch, call):
    """`SGD.step` turns gradients off for its in-place adds: a failing add (its nth call,
    from outside) must not leave them off, or the retry in this process builds no graph and
    cannot train."""
    reference = _train(model="linear")
    loaders = _loaders()
    raised = fail_method_once(monkeypatch, torch.Tensor, "add_", call, "injected add_ fault")
    with pytest.raises(RuntimeError, match="injected add_"):
        _train(loaders=loaders, model="linear")
    assert raised == [call] and torch.is_grad_enabled()
    _assert_identical(_train(loaders=loaders, model="linear"), reference)


def test_a_retry_resuming_from_a_checkpoint_trains_the_uninterrupted_run(tmp_path, monkeypatch):
    reference = _train(optimizer="adam")
    loaders = _loaders()
    fail_method_once(monkeypatch, torch.optim.Adam, "step", 3 * STEPS + 4, "injected fault")
    with pytest.raises(RuntimeError, match="injected"):
        _train(
            Checkpoints(str(tmp_path), every_epochs=2, every_seconds=0),
            loaders=loaders,
            optimizer="adam",
        )
    resume = Checkpoints(str(tmp_path)).latest(max_epoch=6)
    assert (resume.epoch, resume.batch) == (2, 0)
    _assert_identical(_train(resume=resume, loaders=loaders, optimizer="adam"), reference)


def _with_dropout(spec: ModelSpec) -> nn.Module:
    return nn.Sequential(nn.Linear(1, 8), nn.Dropout(0.5), nn.Tanh(), nn.Linear(8, 1))


def test_training_draws_its_own_randomness_and_leaves_the_callers_alone(tmp_path, monkeypatch):
    """A model that draws from torch's global RNG (dropout, in a plugin model) trains the same
    whatever that RNG held before, resumes bit for bit, and hands it back as it was."""
    monkeypatch.setitem(trainflow.tasks.engine.models.MODELS, "dropout", _with_dropout)
    torch.manual_seed(1)
    before = torch.get_rng_state()
    reference = _train(
        model="dropout", checkpoints=Checkpoints(str(tmp_path), every_seconds=1e-9, keep=10**6)
    )
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(2)
    _assert_identical(_train(model="dropout"), reference)
    for path in sorted(tmp_path.iterdir())[5:60:11]:  # mid-epoch and epoch-end checkpoints
        _assert_identical(_train(model="dropout", resume=decode(path.read_bytes())), reference)


# --- pruning: a run deletes its own checkpoints, never another run's -----------------------


def _names(folder, owner=None):
    token = owner_token(owner) if owner else None
    names = sorted(p.name for p in folder.iterdir() if p.name.startswith("ckpt-"))
    return [n for n in names if token is None or n.split("-")[3] == token]


def test_a_run_deletes_only_checkpoints_it_wrote(tmp_path):
    """Another run of the lineage, longer (epoch 9), shorter or running right now, keeps its
    files; so does a file named before names carried their run."""
    others = [
        f"ckpt-000000009-000000000-{owner_token('long run')}-{'0' * 32}.safetensors",
        f"ckpt-000000001-000000000-{owner_token('short run')}-{'1' * 32}.safetensors",
        f"ckpt-000000002-000000000-{'2' * 32}.safetensors",
    ]
    for name in others:
        (tmp_path / name).write_bytes(b"another run's")
    _train(Checkpoints(str(tmp_path), every_epochs=1, every_seconds=0, keep=2, owner="this run"))
    assert [n.split("-")[1] for n in _names(tmp_path, "this run")] == ["000000005", "000000006"]
    assert all((tmp_path / name).read_bytes() == b"another run's" for name in others)


def test_a_retry_of_a_run_takes_over_its_earlier_attempts_checkpoints(tmp_path, monkeypatch):
    """The same run folder is the same run: an attempt prunes what the failed one wrote, and
    the lineage keeps `keep` of this run's files, not `keep` per attempt."""
    fail_backward_once(monkeypatch, 4 * STEPS + 3, "injected fault")

    def opened() -> Checkpoints:
        return Checkpoints(
            str(tmp_path), every_epochs=1, every_seconds=0, keep=2, owner="/runs/retried"
        )

    with pytest.raises(RuntimeError, match="injected"):
        _train(opened())
    assert [n.split("-")[1] for n in _names(tmp_path)] == ["000000003", "000000004"]
    checkpoints = opened()
    _assert_identical(_train(checkpoints, resume=checkpoints.latest(6)), _train())
    assert [n.split("-")[1] for n in _names(tmp_path)] == ["000000005", "000000006"]


def test_a_partial_write_left_by_a_killed_attempt_of_this_run_is_cleared(tmp_path):
    mine = f".ckpt-000000003-000000004-{owner_token('me')}-{'a' * 32}.safetensors.x1y2z3.tmp"
    theirs = f".ckpt-000000003-000000004-{owner_token('them')}-{'a' * 32}.safetensors.q9.tmp"
    (tmp_path / mine).write_bytes(b"half")
    (tmp_path / theirs).write_bytes(b"still being written, maybe")
    _train(Checkpoints(str(tmp_path), every_seconds=0, owner="me"))
    assert not (tmp_path / mine).exists()
    assert (tmp_path / theirs).exists()


def test_a_checkpoint_deleted_by_someone_else_first_is_harmless(tmp_path, monkeypatch, caplog):
    """A delete racing another process's (a cache prune, say) finds the file gone: fine."""
    real = CacheStore(str(tmp_path)).fs.rm_file

    def gone_already(path):
        real(path)
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)

    store = CacheStore(str(tmp_path))
    monkeypatch.setattr(type(store.fs), "rm_file", lambda self, path: gone_already(path))
    _assert_identical(
        _train(Checkpoints(str(tmp_path), every_epochs=1, every_seconds=0, keep=1)), _train()
    )
    assert len(_names(tmp_path)) == 1
    assert "cannot delete" not in caplog.text


def test_a_checkpoint_that_vanishes_while_resuming_is_skipped_quietly(tmp_path, caplog):
    _train(Checkpoints(str(tmp_path), every_epochs=2, every_seconds=0, keep=10))
    checkpoints = Checkpoints(str(tmp_path))
    listing = checkpoints._listing()
    (tmp_path / _names(tmp_path)[-1]).unlink()  # pruned by its run after the listing
    checkpoints._listing = lambda: listing
    assert checkpoints.latest(max_epoch=6).epoch == 4
    assert "skipping" not in caplog.text


# --- saving is best-effort ---------------------------------------------------------------


@pytest.fixture
def failing_writes(monkeypatch):
    """Checkpoint writes that fail with the given errno for the first `count` tries."""
    real = CacheStore.write
    tries = []

    def install(code, count=10**9):
        def write(self, path, data):
            tries.append(path)
            if len(tries) <= count:
                raise OSError(code, os.strerror(code), path)
            return real(self, path, data)

        monkeypatch.setattr(CacheStore, "write", write)
        return tries

    return install


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (errno.ENOSPC, "no space left on the device"),
        (errno.EACCES, "not writable (permission denied or read-only)"),
    ],
)
def test_a_checkpoint_that_cannot_be_written_is_a_warning_and_training_goes_on(
    tmp_path, failing_writes, caplog, code, reason
):
    reference = _train()
    tries = failing_writes(code, count=3)
    checkpoints = Checkpoints(str(tmp_path), every_epochs=1, every_seconds=0, keep=2)
    _assert_identical(_train(checkpoints), reference)
    assert len(tries) == 6 and checkpoints.saved == 3  # tried at each epoch; the last 3 landed
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [  # once per cause, not at every failed try; then when it recovers
        f"cannot write a checkpoint to {str(tmp_path)!r}: {reason}; training goes on "
        "(this run's last checkpoint: none)",
        "checkpoints are written again (epoch 4, batch 0)",
    ]
    assert [n.split("-")[1] for n in _names(tmp_path)] == ["000000005", "000000006"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_after_a_failed_write_the_next_try_waits_for_the_cadence(tmp_path, failing_writes):
    failing_writes(errno.ENOSPC)
    checkpoints = Checkpoints(str(tmp_path), every_seconds=3600)
    state = decode(encode(_some_state()))
    assert checkpoints.save(state) is False
    assert not checkpoints.due(0, 5)  # mid-epoch: only time would make it due


def test_unlistable_checkpoints_mean_starting_over_with_a_warning(tmp_path, caplog):
    checkpoints = Checkpoints(str(tmp_path))

    def refuse():
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path))

    checkpoints._listing = refuse
    assert checkpoints.latest(max_epoch=6) is None
    assert "cannot list the checkpoints" in caplog.text and "starting over" in caplog.text


# --- what an interrupted run says ---------------------------------------------------------


def _stopped() -> StopSignals:
    stop = StopSignals()
    stop.signum = signal.SIGTERM
    return stop


def test_a_stop_with_a_failed_save_says_no_checkpoint_was_saved(tmp_path, failing_writes):
    checkpoints = Checkpoints(str(tmp_path), every_seconds=0, every_epochs=1)
    _train(checkpoints, epochs=2)  # this run's last checkpoint: epoch 2, batch 0
    failing_writes(errno.ENOSPC)
    with pytest.raises(Interrupted) as info:
        _train(checkpoints, stop=_stopped(), resume=checkpoints.latest(2), epochs=4)
    assert str(info.value) == (
        "interrupted by SIGTERM at epoch 2, batch 1; no checkpoint saved (cannot write a "
        f"checkpoint to {str(tmp_path)!r}: no space left on the device); the next run resumes "
        "from an older one if there is one (this run's last: epoch 2, batch 0)"
    )


def test_a_stop_without_checkpoints_says_nothing_was_saved():
    with pytest.raises(Interrupted) as info:
        _train(stop=_stopped())
    assert str(info.value) == (
        "interrupted by SIGTERM at epoch 0, batch 1; checkpoints are off for this run, so "
        "nothing was saved: the next run starts over"
    )


def _some_state() -> TrainState:
    return TrainState(
        epoch=0,
        batch=5,
        model={"w": torch.ones(2)},
        optimizer={"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        loader={},
        batch_losses=torch.ones(5),
    )
