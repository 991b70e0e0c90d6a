"""Exact resume under attack: faults at seeded-random points, real processes, bytes compared.

Every test ends with the run's `model.safetensors` and per-epoch losses compared, bit for bit,
with an uninterrupted run's. Fault points are drawn from TRAINFLOW_FAULT_SEED (a fresh seed
each session when unset, printed with every failure so the draw can be replayed). Faults come
from outside trainflow: a wrapped torch call in this process, or tests/faults/sitecustomize.py
in a child process, which logs where it struck before it does, so no test guesses from timing.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from trainflow.flows.config import TrainConfig
from trainflow.flows.train_flow import train_flow
from trainflow.tasks.engine.checkpoint import owner_token

from ..conftest import REPO
from ..torch_faults import fail_backward_once, fail_optimizer_step_once

pytestmark = pytest.mark.usefixtures("prefect_api")

SEED = int(os.environ.get("TRAINFLOW_FAULT_SEED") or random.SystemRandom().randrange(2**32))
FAULTS = REPO / "tests" / "faults"

# 200 rows: 160 for training, 10 steps of 16 an epoch; checkpoints after epochs 4, 8 and 12.
STEPS, EPOCHS, EVERY = 10, 12, 4
BASE = {
    "n_samples": 200,
    "epochs": EPOCHS,
    "checkpoint_every_epochs": EVERY,
    "checkpoint_every_seconds": 0,
}
OPTIMIZERS = {
    "sgd": {},
    "momentum": {"momentum": 0.9},
    "adam": {"optimizer": "adam", "lr": 0.05},
}
# #15's training state all at once: a warm-up then a cosine schedule over the 12 epochs, the
# best epoch's weights exported, and early stopping, which on this data and model ends the
# run after epoch 8 (STOP), its best epoch being 5: faults strike in the 9 epochs it trains.
EVERYTHING = {
    "model": "mlp",
    "hidden": (8,),
    "activation": "tanh",
    "lr_schedule": "cosine",
    "warmup_epochs": 2,
    "early_stopping_patience": 3,
    "export": "best",
}
STOP, BEST = 8, 5


@pytest.fixture(autouse=True)
def _say_the_seed() -> None:
    print(f"fault points drawn with TRAINFLOW_FAULT_SEED={SEED}")  # shown with any failure


def _draw(name: str) -> random.Random:
    return random.Random(f"{SEED}-{name}")


def _config(root: Path, run: str, cache: str = "cache", **overrides) -> TrainConfig:
    return TrainConfig(
        **{
            **BASE,
            "runs_dir": str(root / "runs"),
            "run_name": run,
            "cache_dir": str(root / cache),
            **overrides,
        }
    )


@dataclass(frozen=True)
class Result:
    weights: bytes  # model.safetensors, byte for byte
    train_loss: list[float]
    val_loss: list[float]
    metrics: dict

    @classmethod
    def of(cls, run_dir: Path | str) -> "Result":
        run_dir = Path(run_dir)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        weights = (run_dir / "model.safetensors").read_bytes()
        return cls(weights, metrics["train_loss"], metrics["val_loss"], metrics)

    def same_run_as(self, other: "Result") -> bool:
        return (self.weights, self.train_loss, self.val_loss) == (
            other.weights,
            other.train_loss,
            other.val_loss,
        )


@pytest.fixture(scope="module")
def reference(tmp_path_factory, prefect_api):
    """Uninterrupted runs, one per training config, each in a cache of its own."""
    root, done = tmp_path_factory.mktemp("reference"), {}

    def get(**training) -> Result:
        key = json.dumps(training, sort_keys=True)
        if key not in done:
            name = f"reference-{len(done)}"
            summary = train_flow(_config(root, name, cache=name, **training))
            done[key] = Result.of(summary.run_dir)
            trained = len(done[key].val_loss)  # fewer than `epochs` if it stopped early
            assert summary.resumed_from is None and summary.epochs_trained == trained
            assert (
                trained == training.get("epochs", EPOCHS) or "early_stopping_patience" in training
            )
        return done[key]

    return get


def _steps(run_dir: Path | str) -> list[int]:
    events = EventAccumulator(str(Path(run_dir) / "loss_training")).Reload()
    return [e.step for e in events.Scalars("loss")]


def _last_checkpoint(steps_done: int, every: int = EVERY) -> dict[str, int] | None:
    """Where an epoch-cadence run that finished `steps_done` steps has its newest checkpoint."""
    epoch = steps_done // STEPS // every * every
    return {"epoch": epoch, "batch": 0} if epoch else None


# --- an exception inside training, retried by Prefect -------------------------------------


def _fault_point(kind: str, rng: random.Random) -> int:
    """The training step (1-based) at which the injected call fails, for each kind of point."""
    if kind == "before-first-checkpoint":
        return rng.randint(1, EVERY * STEPS)
    if kind == "mid-epoch":
        return rng.randrange(EVERY, EPOCHS) * STEPS + rng.randint(2, STEPS - 1)
    if kind == "epoch-boundary":  # the last step of an epoch, or the first of the next
        epoch = rng.choice([e for e in range(1, EPOCHS) if e % EVERY])
        return epoch * STEPS + rng.choice([0, 1])
    if kind == "after-checkpoint":  # the first step after a checkpoint was written
        return rng.choice(range(EVERY, EPOCHS, EVERY)) * STEPS + 1
    return rng.randint(1, EPOCHS * STEPS)  # no-cache: anywhere


# The public calls a training step makes once each, where a fault is injected: the loop's
# `loss.backward()` and its `optimizer.step()` (tests/torch_faults.py wraps them).
ENTRY_POINTS = ["Tensor.backward", "optimizer.step"]


def _fail_once(monkeypatch, where: str, optimizer: type, step: int) -> list[int]:
    """Make the step-th `torch.Tensor.backward` or `optimizer.step` (the optimizer class's)
    raise, once; returns the list the failing call's number goes to."""
    message = f"injected transient fault in {where} #{step}"
    if where == "Tensor.backward":
        return fail_backward_once(monkeypatch, step, message)
    return fail_optimizer_step_once(monkeypatch, optimizer, step, message)


@pytest.mark.parametrize("where", ENTRY_POINTS)
@pytest.mark.parametrize(
    "kind",
    ["before-first-checkpoint", "mid-epoch", "epoch-boundary", "after-checkpoint", "no-cache"],
)
def test_a_transient_fault_is_retried_into_the_uninterrupted_run(
    tmp_path, monkeypatch, reference, kind, where
):
    """Prefect retries train-epochs after the injected call fails at a seeded training step:
    the run ends with the uninterrupted run's weights and losses, bit for bit."""
    rng = _draw(f"{kind}-{where}")
    optimizer = rng.choice(sorted(OPTIMIZERS))
    step = _fault_point(kind, rng)
    owner = torch.optim.Adam if optimizer == "adam" else torch.optim.SGD
    raised = _fail_once(monkeypatch, where, owner, step)
    no_cache = kind == "no-cache"
    config = _config(tmp_path, "retried", no_cache=no_cache, **OPTIMIZERS[optimizer])
    summary = train_flow(config)
    monkeypatch.undo()

    why = f"{kind}: {where} #{step} with {optimizer} (TRAINFLOW_FAULT_SEED={SEED})"
    assert raised == [step], why
    expected = None if no_cache else _last_checkpoint(step - 1)
    assert summary.resumed_from == expected, why
    got = Result.of(summary.run_dir)
    assert got.same_run_as(reference(**OPTIMIZERS[optimizer])), why
    assert _steps(summary.run_dir) == list(range(EPOCHS)), why  # each epoch's point once
    if not no_cache:  # what the retry cached is what a later run is served
        again = train_flow(config.model_copy(update={"run_name": "served"}))
        states = {s["name"]: s["state"] for s in again.stages}
        assert states["train-epochs"] == "Cached", why
        assert Result.of(again.run_dir).same_run_as(got), why


@pytest.mark.parametrize("where", ENTRY_POINTS)
def test_a_transient_fault_with_every_new_option_is_retried_into_the_uninterrupted_run(
    tmp_path, monkeypatch, reference, where
):
    """Warm-up and cosine schedule, early stopping, best export: the retry resumes them all
    from the checkpoint and ends in the uninterrupted run, metrics, lr and best epoch too."""
    rng = _draw(f"everything-{where}")
    step = rng.randint(1, (STOP + 1) * STEPS)
    raised = _fail_once(monkeypatch, where, torch.optim.SGD, step)
    summary = train_flow(_config(tmp_path, "retried", **EVERYTHING))
    monkeypatch.undo()

    why = f"everything on: {where} #{step} (TRAINFLOW_FAULT_SEED={SEED})"
    assert raised == [step], why
    assert summary.resumed_from == _last_checkpoint(step - 1), why
    got, expected = Result.of(summary.run_dir), reference(**EVERYTHING)
    assert got.same_run_as(expected), why
    for key in ("val_mae", "val_r2", "lr", "best_epoch", "stopped_early_at"):
        assert got.metrics[key] == expected.metrics[key], (key, why)
    assert _steps(summary.run_dir) == list(range(len(expected.val_loss))), why


# --- SIGKILL of a real process, then the same command again --------------------------------


def _child_env(env: dict[str, str], fault: str, log: Path) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(FAULTS), env.get("PYTHONPATH", "")) if p)
    return {**env, "PYTHONPATH": path, "TRAINFLOW_FAULT": fault, "TRAINFLOW_FAULT_LOG": str(log)}


def _flags(config: TrainConfig) -> list[str]:
    flags = []
    for field, value in config.model_dump(exclude_defaults=True).items():
        flag = "--" + field.replace("_", "-")
        shown = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
        flags += [flag] if value is True else [flag, shown]
    return flags


def _run(
    config: TrainConfig,
    env: dict[str, str],
    output: Path,
    timeout: float = 300,
    script: Path = REPO / "flows" / "train_flow.py",
):
    """`python flows/train_flow.py` (or `script`, a copy's) with the flags of `config`, to its
    end; output to a file (a pipe nobody reads while another child is waited for could fill
    up and stall it)."""
    command = [sys.executable, str(script), *_flags(config)]
    with output.open("w") as out:
        child = subprocess.Popen(
            command, cwd=output.parent, env=env, stdout=out, stderr=subprocess.STDOUT
        )
        try:
            child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            out.write(f"\n(killed by the test after {timeout} s)")
    return child.returncode, output.read_text()


def _text(log: Path) -> str:
    return log.read_text() if log.exists() else ""


def _events(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@dataclass(frozen=True)
class Fault:
    """A child run and what strikes it: `fault` as tests/faults/sitecustomize.py reads it."""

    id: str
    fault: str
    signum: int = signal.SIGKILL
    resumed_from: dict[str, int] | None = None  # where the same command then resumes
    overrides: tuple[tuple[str, object], ...] = ()

    def config(self, root: Path) -> TrainConfig:
        return _config(root, "run", **dict(self.overrides))


@dataclass(frozen=True)
class Struck:
    config: TrainConfig
    root: Path
    output: str
    returncode: int | None
    strikes: list[dict]

    def check(self, fault: Fault) -> dict:
        """The strike line in the fault log, written just before the signal, and the exit
        status prove the run died where the fault says, not after it ended."""
        assert len(self.strikes) == 1, f"{fault} never struck:\n{self.output[-3000:]}"
        expected = -fault.signum if fault.signum == signal.SIGKILL else 128 + fault.signum
        assert self.returncode == expected, self.output[-3000:]
        return self.strikes[0]


def _strike(fault: Fault, root: Path, env: dict[str, str]) -> Struck:
    config, log = fault.config(root), root / "fault.jsonl"
    returncode, output = _run(config, _child_env(env, fault.fault, log), root / "output.txt")
    strikes = [e for e in _events(log) if e["event"] == "strike"]
    return Struck(config, root, output, returncode, strikes)


def _at(step: int) -> tuple[int, int]:
    """(epoch, batch) after training step `step` (1-based), as the loop's pause point sees it:
    the last step of an epoch is (epoch, STEPS), before the epoch's end is (epoch + 1, 0)."""
    return (step - 1) // STEPS, (step - 1) % STEPS + 1


def _faults() -> list[Fault]:
    rng = _draw("faults")
    early = rng.randint(1, EVERY * STEPS)  # training steps, 1-based: killed after backward N
    late = rng.randint(EVERY * STEPS + 1, EPOCHS * STEPS)
    fsynced = rng.randint(1, EPOCHS // EVERY)  # the Nth checkpoint of the run
    renamed, moment = rng.randint(1, EPOCHS // EVERY), rng.choice(["replace", "renamed"])
    each_step = rng.randint(2, EPOCHS * STEPS)
    record_moment = rng.choice(["fsync", "replace", "renamed"])
    term, interrupt = rng.randint(1, EPOCHS * STEPS - 1), rng.randint(1, EPOCHS * STEPS - 1)

    def at(checkpoint: int) -> dict[str, int] | None:
        return {"epoch": checkpoint * EVERY, "batch": 0} if checkpoint else None

    every_step = (("checkpoint_every_epochs", 0), ("checkpoint_every_seconds", 1e-6))
    # Killed after backward N, before its optimizer step: the N - 1 steps before were saved,
    # the last of an epoch as the start of the next (the epoch-end checkpoint comes after the
    # one at its last batch).
    done = divmod(each_step - 1, STEPS)
    everything = rng.randint(1, (STOP + 1) * STEPS)  # any step the early-stopped run takes
    return [
        Fault(
            "everything-on",
            f"signal:KILL:step:{everything}",
            resumed_from=_last_checkpoint(everything - 1),
            overrides=tuple(EVERYTHING.items()),
        ),
        Fault("step-before-first-checkpoint", f"signal:KILL:step:{early}"),
        Fault("step-late", f"signal:KILL:step:{late}", resumed_from=_last_checkpoint(late - 1)),
        Fault(
            "checkpoint-write",
            f"signal:KILL:checkpoint:{fsynced}:fsync",
            resumed_from=at(fsynced - 1),
        ),
        Fault(
            "checkpoint-rename",
            f"signal:KILL:checkpoint:{renamed}:{moment}",
            resumed_from=at(renamed if moment == "renamed" else renamed - 1),
        ),
        Fault(
            "step-with-a-checkpoint-each-step",
            f"signal:KILL:step:{each_step}",
            resumed_from={"epoch": done[0], "batch": done[1]},
            overrides=every_step,
        ),
        # The train-epochs cache entry is written after the last checkpoint (epoch 12):
        Fault(
            "cache-entry-write",
            f"signal:KILL:train-record:1:{record_moment}",
            resumed_from=None if record_moment == "renamed" else {"epoch": EPOCHS, "batch": 0},
        ),
        Fault("run-folder-write", "signal:KILL:model:1:replace"),
        Fault(
            "sigterm",
            f"signal:TERM:step:{term}",
            signal.SIGTERM,
            resumed_from=dict(zip(("epoch", "batch"), _at(term), strict=True)),
        ),
        Fault(
            "sigint-no-cache",
            f"signal:INT:step:{interrupt}",
            signal.SIGINT,
            overrides=(("no_cache", True),),
        ),
    ]


FAULT_POINTS = {fault.id: fault for fault in _faults()}
KILLS = [
    fault
    for fault in FAULT_POINTS.values()
    if fault.signum == signal.SIGKILL and fault.id != "everything-on"
]
assert len(KILLS) >= 5  # the floor: five SIGKILL points a session


@pytest.fixture(scope="module")
def struck(request, tmp_path_factory, prefect_api) -> dict[str, Struck]:
    """The children of the selected kill and signal tests (each has a `fault` parameter), two
    at a time: they are independent, and a cold process spends most of its time in
    single-threaded imports."""
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    wanted = {
        item.callspec.params["fault"].id: item.callspec.params["fault"]
        for item in request.session.items
        if "struck" in item.fixturenames
    }

    def run(fault: Fault) -> Struck:
        return _strike(fault, tmp_path_factory.mktemp(fault.id), env)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(wanted, pool.map(run, wanted.values()), strict=True))


@pytest.mark.parametrize("fault", KILLS, ids=[fault.id for fault in KILLS])
def test_a_sigkilled_run_reruns_into_the_uninterrupted_run(struck, reference, fault):
    child = struck[fault.id]
    strike = child.check(fault)
    why = f"{fault}, struck {strike} (TRAINFLOW_FAULT_SEED={SEED})"

    rerun = train_flow(child.config)  # the same command again: same run folder, same cache
    assert rerun.resumed_from == fault.resumed_from, why
    states = {s["name"]: s["state"] for s in rerun.stages}
    if fault.id in ("cache-entry-write", "run-folder-write") and fault.resumed_from is None:
        assert states["train-epochs"] == "Cached", why  # the entry was whole: served
    assert Result.of(rerun.run_dir).same_run_as(reference()), why
    assert _steps(rerun.run_dir) == list(range(EPOCHS)), why
    # A write the kill cut short left a temporary file: it was this run's, the rerun cleared it.
    assert not list(child.root.glob("cache/checkpoints/*/.ckpt-*.tmp")), why


@pytest.mark.parametrize("fault", [FAULT_POINTS["everything-on"]], ids=["everything-on"])
def test_a_sigkilled_run_with_every_new_option_reruns_into_the_uninterrupted_run(
    struck, reference, fault
):
    child = struck[fault.id]
    strike = child.check(fault)
    why = f"{fault}, struck {strike} (TRAINFLOW_FAULT_SEED={SEED})"
    expected = reference(**EVERYTHING)
    assert (expected.metrics["stopped_early_at"], expected.metrics["best_epoch"]) == (STOP, BEST)

    rerun = train_flow(child.config)
    assert rerun.resumed_from == fault.resumed_from, why
    got = Result.of(rerun.run_dir)
    assert got.same_run_as(expected) and got.metrics == expected.metrics | {
        "epochs_trained": got.metrics["epochs_trained"],
        "resumed_from": fault.resumed_from,
    }, why
    assert _steps(rerun.run_dir) == list(range(STOP + 1)), why


# --- SIGTERM / SIGINT: stop, and say truthfully what was kept ------------------------------


def _message(output: str) -> str:
    (line,) = [line for line in output.splitlines() if line.startswith("train_flow.py:")]
    return line


@pytest.mark.parametrize("fault", [FAULT_POINTS["sigterm"]], ids=["sigterm"])
def test_sigterm_checkpoints_where_it_landed_and_says_so(struck, reference, fault):
    child = struck[fault.id]
    child.check(fault)
    epoch, batch = fault.resumed_from["epoch"], fault.resumed_from["batch"]
    assert _message(child.output) == (
        f"train_flow.py: interrupted by SIGTERM at epoch {epoch}, batch {batch}; "
        "checkpoint saved: the next run of this config resumes there"
    )
    rerun = train_flow(child.config)
    assert rerun.resumed_from == fault.resumed_from
    assert Result.of(rerun.run_dir).same_run_as(reference())


@pytest.mark.parametrize("fault", [FAULT_POINTS["sigint-no-cache"]], ids=["sigint-no-cache"])
def test_sigint_without_a_cache_says_nothing_was_saved(struck, fault):
    child = struck[fault.id]
    step = int(fault.fault.rsplit(":", 1)[1])
    child.check(fault)
    epoch, batch = _at(step)
    assert _message(child.output) == (
        f"train_flow.py: interrupted by SIGINT at epoch {epoch}, batch {batch}; checkpoints "
        "are off for this run, so nothing was saved: the next run starts over"
    )
    assert not (child.root / "cache").exists()


# --- two runs of one config at once, one cache ---------------------------------------------


def test_two_runs_of_one_config_at_once_keep_each_others_checkpoints(
    tmp_path, subprocess_env, reference
):
    """Both runs write a checkpoint per epoch and keep 2; after each, the injected hook lists
    the folder and waits for the other run to reach the same checkpoint, so they interleave
    for certain, however the scheduler runs them.

    Run b starts only once a has taken its first training step: a is ahead, as a busy
    machine often has one run (CI once failed on this). The hook then holds a's first
    checkpoint until b has stepped, that is until b has chosen where to start; without that,
    b would resume from a's checkpoint (any run's is a valid start) and not train epoch 1."""
    logs = {name: tmp_path / f"{name}.jsonl" for name in ("a", "b")}

    def run(name: str) -> tuple[int, str]:
        config = _config(tmp_path, name, checkpoint_every_epochs=1, keep_checkpoints=2)
        peer = logs["b" if name == "a" else "a"]
        env = _child_env(subprocess_env, f"lockstep:{peer}", logs[name])
        return _run(config, env, tmp_path / f"output-{name}.txt")

    with ThreadPoolExecutor(max_workers=2) as pool:
        first = pool.submit(run, "a")
        # Polls a's log for an event; nothing depends on how long the interval is.
        while not first.done() and '"event": "step"' not in _text(logs["a"]):
            time.sleep(0.05)
        second = pool.submit(run, "b")
        for returncode, output in (first.result(), second.result()):
            assert returncode == 0, output[-3000:]

    events = {name: _events(log) for name, log in logs.items()}
    written = {n: [e["name"] for e in ev if e["event"] == "checkpoint"] for n, ev in events.items()}
    removed = {n: [e["name"] for e in ev if e["event"] == "remove"] for n, ev in events.items()}
    assert all(len(names) == EPOCHS for names in written.values()), written
    assert not set(written["a"]) & set(written["b"])  # each run's files are its own
    for name, other in (("a", "b"), ("b", "a")):
        assert not set(removed[name]) & set(written[other]), f"{name} deleted {other}'s files"
        assert set(removed[name]) <= set(written[name])
        # After each of its writes, every file it wrote and has not pruned itself is there.
        mine: list[str] = []
        for event in events[name]:
            if event["event"] == "checkpoint":
                mine.append(event["name"])
                assert set(mine) <= set(event["listing"]), (name, event)
            elif event["event"] == "remove":
                mine.remove(event["name"])
        assert len(mine) == 2  # it kept its last two
        # They really shared the folder while both ran: each saw the other's files.
        listed = {f for e in events[name] if e["event"] == "checkpoint" for f in e["listing"]}
        assert listed & set(written[other])

    results = [Result.of(tmp_path / "runs" / name) for name in logs]
    assert results[0].same_run_as(reference()) and results[1].same_run_as(reference())


# --- a longer run of the lineage, then a shorter one killed, then the shorter again --------


def test_a_short_run_after_a_long_one_keeps_and_resumes_its_own_checkpoint(
    tmp_path, subprocess_env
):
    """300 epochs, then 100 killed in the first step after its first checkpoint (epoch 10):
    its checkpoint must survive its own pruning beside the long run's, and be resumed."""
    lineage = {"n_samples": 100, "checkpoint_every_epochs": 10, "keep_checkpoints": 3}
    steps = 5  # 80 training rows, batch 16
    train_flow(_config(tmp_path, "long", epochs=300, **lineage))
    short = Fault(
        "short", f"signal:KILL:step:{10 * steps + 1}", overrides=(("epochs", 100), *lineage.items())
    )
    killed = _strike(short, tmp_path, subprocess_env)
    killed.check(short)

    rerun = train_flow(killed.config)
    assert rerun.resumed_from == {"epoch": 10, "batch": 0}
    assert rerun.epochs_trained == 90
    fresh = train_flow(_config(tmp_path, "fresh", cache="fresh", epochs=100, **lineage))
    assert Result.of(rerun.run_dir).same_run_as(Result.of(fresh.run_dir))
    # The long run's checkpoints are the long run's: the short one never touched them.
    epochs = sorted(int(p.name.split("-")[1]) for p in tmp_path.glob("cache/checkpoints/*/ckpt-*"))
    assert {280, 290, 300} <= set(epochs)


def test_extending_a_finished_run_continues_from_its_last_epoch(tmp_path, reference):
    longer = _config(tmp_path, "extended", epochs=EPOCHS + 6)
    train_flow(_config(tmp_path, "shared"))
    extended = train_flow(longer)
    assert extended.resumed_from == {"epoch": EPOCHS, "batch": 0}
    assert extended.epochs_trained == 6
    assert Result.of(extended.run_dir).same_run_as(reference(epochs=EPOCHS + 6))
    assert _steps(extended.run_dir) == list(range(EPOCHS + 6))


def test_extending_a_cosine_run_starts_a_new_schedule_and_a_step_run_continues(tmp_path, reference):
    """Cosine's shape depends on the run's length, so its lineage includes `epochs`: a longer
    run is a new schedule over the new length, trained from epoch 0 (it equals a fresh run of
    that length). A step schedule does not depend on the length: a longer run continues."""
    cosine = {"lr_schedule": "cosine", "warmup_epochs": 2}
    train_flow(_config(tmp_path, "cosine", **cosine))
    longer = train_flow(_config(tmp_path, "cosine-longer", epochs=EPOCHS + 6, **cosine))
    assert longer.resumed_from is None and longer.epochs_trained == EPOCHS + 6
    assert Result.of(longer.run_dir).same_run_as(reference(epochs=EPOCHS + 6, **cosine))
    lrs = Result.of(longer.run_dir).metrics["lr"]
    assert lrs[-1] < lrs[EPOCHS - 1]  # the new schedule still anneals after epoch 12

    step = {"lr_schedule": "step", "step_size": 5, "gamma": 0.5, "warmup_epochs": 2}
    train_flow(_config(tmp_path, "step", **step))
    extended = train_flow(_config(tmp_path, "step-longer", epochs=EPOCHS + 6, **step))
    assert extended.resumed_from == {"epoch": EPOCHS, "batch": 0}
    assert Result.of(extended.run_dir).same_run_as(reference(epochs=EPOCHS + 6, **step))


def test_refresh_cache_trains_from_the_start_and_still_checkpoints(tmp_path, reference):
    train_flow(_config(tmp_path, "first"))
    refreshed = train_flow(_config(tmp_path, "refreshed", refresh_cache=True))
    assert refreshed.resumed_from is None and refreshed.epochs_trained == EPOCHS
    assert Result.of(refreshed.run_dir).same_run_as(reference())
    token = owner_token(str(Path(refreshed.run_dir)))
    mine = [p.name for p in tmp_path.glob("cache/checkpoints/*/ckpt-*") if token in p.name]
    assert sorted(int(name.split("-")[1]) for name in mine) == [4, 8, 12]
