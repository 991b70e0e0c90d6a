"""train-epochs on 2 processes (DDP, gloo on the CPU): equal to one process where the math is,
and bit-identical to itself across a killed rank, a killed job, a hung rank, and on two
"nodes" of one machine.

Every run is a real `python flows/train_flow.py` with the launcher and its ranks as child
processes; faults come from tests/faults/sitecustomize.py at seeded steps of a chosen rank,
and it logs where it struck before it does, so no test guesses from timing.
"""

import errno
import os
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from trainflow.flows.config import TrainConfig
from trainflow.flows.train_flow import train_flow
from trainflow.tasks.engine.launch import _hand_over, raise_handed_over
from trainflow.tasks.errors import InputError, NonFiniteLoss, StorageError

from ..conftest import REPO
from ..disks import fill, tmpfs
from ..flows.test_resume_flow import FAULTS, SEED, Result, _events, _flags, _run

pytestmark = pytest.mark.usefixtures("prefect_api")

# 200 rows: 160 for training, 10 global batches of 16 an epoch (8 rows a rank); checkpoints
# after epochs 2 and 4.
STEPS, EPOCHS, EVERY = 10, 6, 2
BASE = {
    "n_samples": 200,
    "epochs": EPOCHS,
    "checkpoint_every_epochs": EVERY,
    "checkpoint_every_seconds": 0,
    "device": "cpu",
}
# A collective waits 8 s for a rank before the job counts as hung (the ranks' start-up is apart).
DDP = {"nproc": 2, "hang_timeout": 8.0}


@pytest.fixture(autouse=True)
def _say_the_seed() -> None:
    print(f"fault points drawn with TRAINFLOW_FAULT_SEED={SEED}")  # shown with any failure


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


def _env(env: dict[str, str], log: Path, fault: str = "", rank: int | None = None) -> dict:
    path = os.pathsep.join(p for p in (str(FAULTS), env.get("PYTHONPATH", "")) if p)
    return {
        **env,
        "PYTHONPATH": path,
        "TRAINFLOW_FAULT": fault,
        "TRAINFLOW_FAULT_LOG": str(log),
        "TRAINFLOW_FAULT_RANK": "" if rank is None else str(rank),
    }


def _strikes(log: Path) -> list[dict]:
    return [e for e in _events(log) if e["event"] == "strike"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


REFERENCE_DIRS: dict[str, str] = {}


def _curve(run_dir: Path) -> list[tuple[int, float]]:
    """The training loss curve in a run folder, as TensorBoard reads it: (epoch, wall time)."""
    folder = run_dir / "loss_training"
    if not folder.is_dir():
        return []
    shown = EventAccumulator(str(folder)).Reload()
    if not shown.Tags()["scalars"]:
        return []
    return [(e.step, e.wall_time) for e in shown.Scalars("loss")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, prefect_api):
    """An uninterrupted 2-process run (its own cache), and the same config on one process."""
    root = tmp_path_factory.mktemp("ddp-reference")
    env = _env({**os.environ, "PREFECT_API_URL": prefect_api}, root / "faults.jsonl")
    config = _config(root, "two", cache="two", **DDP)
    code, output = _run(config, env, root / "two.txt", timeout=240)
    assert code == 0, output[-4000:]
    REFERENCE_DIRS["two"] = str(root / "runs" / "two")
    one = train_flow(_config(root, "one", cache="one"))
    return Result.of(root / "runs" / "two"), Result.of(one.run_dir), output


def _weights(result: Result) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(result.weights)


def test_two_processes_train_what_one_does(reference):
    two, one, output = reference
    # Equal chunks (8 rows of each batch of 16) and mean losses: the same math as one process,
    # rounded in another order.
    for name, value in _weights(one).items():
        assert torch.allclose(_weights(two)[name], value, rtol=0, atol=1e-6), name
    assert two.train_loss == pytest.approx(one.train_loss, rel=1e-6, abs=1e-9)
    assert two.val_loss == pytest.approx(one.val_loss, rel=1e-6, abs=1e-9)
    # Rank 0 wrote the curves as it trained: each point with its own epoch's time, not the
    # moment a rewrite from the history ran.
    points = _curve(Path(REFERENCE_DIRS["two"]))
    assert [step for step, _ in points] == list(range(EPOCHS)), points
    times = [wall for _, wall in points]
    assert times == sorted(times) and len(set(times)) == EPOCHS, times
    # One train-epochs task: rank 0's progress lines, and a summary line per rank.
    assert f"epoch {EPOCHS}/{EPOCHS}" in output
    for rank in (0, 1):
        assert f"rank {rank}/2: {EPOCHS * STEPS} steps" in output, output[-3000:]


def test_a_killed_rank_is_restarted_into_the_same_run(tmp_path, subprocess_env, reference):
    rng = random.Random(f"{SEED}-killed-rank")
    step = rng.randint(EVERY * STEPS + 1, EPOCHS * STEPS - 1)  # after the first checkpoint
    log = tmp_path / "faults.jsonl"
    env = _env(subprocess_env, log, f"signal:KILL:step:{step}", rank=1)
    code, output = _run(_config(tmp_path, "run", **DDP), env, tmp_path / "out.txt")
    why = f"rank 1 killed at step {step} (TRAINFLOW_FAULT_SEED={SEED})\n{output[-4000:]}"
    assert code == 0, why
    assert [(s["step"], s["rank"]) for s in _strikes(log)] == [(step, "1")], why
    assert "1 restart(s) before this attempt" in output, why
    assert Result.of(tmp_path / "runs" / "run").same_run_as(reference[0]), why


def test_a_table_on_the_memory_mapped_path_trains_as_in_memory(tmp_path, subprocess_env, reference):
    # The reference's data as a CSV (float32 → shortest float64 text → the same float32),
    # forced onto the mapped path: each rank opens the cache's file by the name the store gave
    # it when the entry was kept, after the conversion had written it under a temporary one.
    from trainflow.tasks.data.tensors import synthetic

    data = synthetic(BASE["n_samples"])
    rows = (f"{float(a)!r},{float(b)!r}" for a, b in zip(data.x[:, 0], data.y[:, 0], strict=True))
    table = tmp_path / "table.csv"
    table.write_text("x,y\n" + "\n".join(rows) + "\n")
    env = {**_env(subprocess_env, tmp_path / "faults.jsonl"), "TRAINFLOW_IN_MEMORY_BYTES": "0"}
    config = _config(tmp_path, "mapped", data=str(table), **DDP)
    code, output = _run(config, env, tmp_path / "out.txt", timeout=240)
    assert code == 0, output[-4000:]
    records = (tmp_path / "cache" / "records").glob("*.json")
    assert any('"MappedDataset"' in record.read_text() for record in records)
    assert Result.of(tmp_path / "runs" / "mapped").same_run_as(reference[0])


def test_the_dataloader_path_trains_as_the_tensor_path(tmp_path, subprocess_env, reference):
    # `--loader dataloader` draws the same permutation and collates the same rows; each rank
    # takes its chunk of the collated global batch.
    env = _env(subprocess_env, tmp_path / "faults.jsonl")
    config = _config(tmp_path, "loader", loader="dataloader", **DDP)
    code, output = _run(config, env, tmp_path / "out.txt", timeout=240)
    assert code == 0, output[-4000:]
    assert Result.of(tmp_path / "runs" / "loader").same_run_as(reference[0])


def test_a_killed_job_resumes_exactly(tmp_path, subprocess_env, reference):
    rng = random.Random(f"{SEED}-killed-job")
    step = rng.randint(EVERY * STEPS + 1, EPOCHS * STEPS - 1)
    log = tmp_path / "faults.jsonl"
    config = _config(tmp_path, "run", **DDP)
    env = _env(subprocess_env, log, f"signal:KILL:step:{step}:launcher", rank=0)
    code, output = _run(config, env, tmp_path / "killed.txt")
    why = f"the job killed at step {step} (TRAINFLOW_FAULT_SEED={SEED})"
    assert code == -signal.SIGKILL, f"{why}\n{output[-4000:]}"
    [strike] = _strikes(log)
    # The ranks die with their launcher (no rank trains on beside the re-run).
    for pid in [e["pid"] for e in _events(log) if e["event"] == "start"]:
        _wait_gone(pid, why)
    code, output = _run(config, env, tmp_path / "rerun.txt")  # the fault log disarms it
    assert code == 0, f"{why}\n{output[-4000:]}"
    epoch = (step - 1) // STEPS // EVERY * EVERY
    assert f"resumed from epoch {epoch}, batch 0" in output, f"{why}\n{output[-4000:]}"
    assert Result.of(tmp_path / "runs" / "run").same_run_as(reference[0]), why
    assert strike["launcher"] > 0


def _wait_gone(pid: int, why: str, within: float = 30.0) -> None:
    """Until `pid` has exited: a pidfd turns readable then (no polling, no sleep)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        ready, _, _ = select.select([fd], [], [], within)
        assert ready, f"{why}: process {pid} outlived its launcher by {within} s"
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_a_hung_rank_is_detected_and_the_job_restarted(tmp_path, subprocess_env, reference):
    rng = random.Random(f"{SEED}-hung-rank")
    step = rng.randint(EVERY * STEPS + 1, EPOCHS * STEPS - 1)
    log = tmp_path / "faults.jsonl"
    env = _env(subprocess_env, log, f"signal:STOP:step:{step}", rank=1)
    start = time.monotonic()
    code, output = _run(_config(tmp_path, "run", **DDP), env, tmp_path / "out.txt")
    why = f"rank 1 stopped at step {step} (TRAINFLOW_FAULT_SEED={SEED})\n{output[-4000:]}"
    assert code == 0, why
    [strike] = _strikes(log)
    assert not _alive(strike["pid"]), why  # the stopped rank was killed, not left behind
    assert "1 restart(s) before this attempt" in output, why
    assert Result.of(tmp_path / "runs" / "run").same_run_as(reference[0]), why
    # Detected within the hang timeout (8 s) plus the launcher's 5 s grace, not left forever.
    assert time.monotonic() - start < 200, why


def test_rank_0_writes_the_curves_while_it_trains(tmp_path, subprocess_env, reference):
    """Read while rank 0 is frozen mid-run (SIGSTOP, after its first epoch): the run folder
    already shows the epochs it finished. The launcher's own write comes only at the end."""
    rng = random.Random(f"{SEED}-curves-while-training")
    step = rng.randint(STEPS + 1, EPOCHS * STEPS - 1)  # after epoch 0 ended
    log = tmp_path / "faults.jsonl"
    env = _env(subprocess_env, log, f"signal:STOP:step:{step}", rank=0)
    finished: list[tuple[int, str]] = []
    run = threading.Thread(
        target=lambda: finished.append(
            _run(_config(tmp_path, "run", **DDP), env, tmp_path / "out.txt")
        )
    )
    run.start()
    try:
        deadline = time.monotonic() + 240
        while not _strikes(log) and run.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        why = f"rank 0 stopped at step {step} (TRAINFLOW_FAULT_SEED={SEED})"
        assert _strikes(log), f"{why}: no strike\n{_text(tmp_path / 'out.txt')[-3000:]}"
        epochs = [step for step, _ in _curve(tmp_path / "runs" / "run")]
        finished_epochs = (step - 1) // STEPS  # epochs rank 0 ended before it was stopped
        assert epochs and epochs == list(range(len(epochs))), f"{why}: {epochs}"
        assert len(epochs) <= finished_epochs, f"{why}: {epochs}"
    finally:
        run.join(300)
    [(code, output)] = finished
    assert code == 0, output[-4000:]
    assert Result.of(tmp_path / "runs" / "run").same_run_as(reference[0])


def test_a_stopped_job_keeps_the_curves_of_every_epoch_rank_0_finished(tmp_path, subprocess_env):
    """SIGTERM to the launcher at a seeded step: the launcher stops the ranks (rank 0 dies
    at once), and the run folder still shows every epoch rank 0 had finished."""
    rng = random.Random(f"{SEED}-stopped-job-curves")
    step = rng.randint(2 * STEPS + 1, EPOCHS * STEPS - 1)
    log = tmp_path / "faults.jsonl"
    env = _env(subprocess_env, log, f"signal:TERM:step:{step}:launcher", rank=0)
    code, output = _run(_config(tmp_path, "run", **DDP), env, tmp_path / "out.txt")
    why = f"the launcher stopped at step {step} (TRAINFLOW_FAULT_SEED={SEED})"
    assert code != 0 and _strikes(log), f"{why}\n{output[-4000:]}"
    epochs = [e for e, _ in _curve(tmp_path / "runs" / "run")]
    finished = (step - 1) // STEPS  # epochs rank 0 had ended when the signal was sent
    assert epochs == list(range(len(epochs))) and len(epochs) >= finished, f"{why}: {epochs}"


@pytest.fixture
def tiny_disk(tmp_path):
    with tmpfs(tmp_path / "disk", "2m") as disk:
        yield disk


def _last_line(output: str) -> str:
    return output.strip().splitlines()[-1]


def test_a_full_run_folder_is_one_line_before_the_ranks_start(tmp_path, subprocess_env, tiny_disk):
    fill(tiny_disk)
    config = _config(tmp_path, "full", runs_dir=str(tiny_disk), **DDP)
    code, output = _run(config, subprocess_env, tmp_path / "out.txt")
    assert code == 1, output[-4000:]
    assert _last_line(output) == (
        f"train_flow.py: error: cannot write the run folder '{tiny_disk / 'full'}': "
        "no space left on the device"
    ), output[-4000:]
    assert "rank 0/2" not in output and "restart" not in output, output[-4000:]  # none started


def test_a_diverging_job_is_one_line_and_neither_restarted_nor_retried(tmp_path, subprocess_env):
    """A non-finite loss comes back in every attempt: as with one process, the job stops at
    once with one line naming the epoch and batch (exit 1), no rank restarted, no retry."""
    config = _config(tmp_path, "diverging", lr=5.0, epochs=30, max_restarts=3, **DDP)
    code, output = _run(config, subprocess_env, tmp_path / "out.txt")
    assert code == 1, output[-4000:]
    error = r"train_flow.py: error: non-finite \w+ loss at epoch \d+, batch \d+; stopping"
    assert re.fullmatch(error, _last_line(output)), output[-4000:]
    assert "attempts left" not in output and "Retry" not in output, output[-4000:]
    assert "Traceback" not in output, output[-4000:]


def test_a_run_folder_that_fills_while_ranks_train_is_one_line_when_training_ends(
    tmp_path, subprocess_env, tiny_disk
):
    """The disk fills at a seeded step of rank 0, after its first epoch's points are on it:
    rank 0 trains on (its curves stop with a warning: no restart, no retry), and the run ends
    in one line naming the run folder, as one process's does."""
    # Epochs enough that rank 0's points outgrow the pages its files already hold.
    epochs = 300
    step = random.Random(f"{SEED}-filling").randint(STEPS + 1, 5 * STEPS)
    log = tmp_path / "faults.jsonl"
    env = _env(subprocess_env, log, f"fill:step:{step}:{tiny_disk}", rank=0)
    config = _config(tmp_path, "filling", runs_dir=str(tiny_disk), epochs=epochs, **DDP)
    code, output = _run(config, env, tmp_path / "out.txt")
    why = f"the disk filled at step {step} (TRAINFLOW_FAULT_SEED={SEED})\n{output[-4000:]}"
    assert code == 1 and _strikes(log), why
    # Whichever write of the run folder meets the full disk first names it.
    line = _last_line(output)
    assert line.startswith("train_flow.py: error: cannot write "), why
    assert str(tiny_disk / "filling") in line and line.endswith(": no space left on the device")
    # The ranks ran once, to the end: no restart, and no retry of the task.
    assert output.count("rank 0/2:") == 1, why
    assert f"rank 0/2: {epochs * STEPS} steps" in output, why
    assert "0 restart(s) before this attempt" in output, why
    assert "warning: the curves in the run folder" in output, why  # rank 0's, via the launcher


def _text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def test_two_nodes_on_one_machine(tmp_path, subprocess_env, reference):
    """Two launchers (one process each) meet at a c10d rendezvous on 127.0.0.1, each with its
    own run folder and cache, as two machines would have."""
    endpoint = f"127.0.0.1:{_free_port()}"
    env = _env(subprocess_env, tmp_path / "faults.jsonl")
    children = []
    for node in (0, 1):
        config = _config(
            tmp_path / f"node{node}",
            "run",
            nproc=1,
            nnodes=2,
            node_rank=node,
            rdzv_endpoint=endpoint,
            hang_timeout=60.0,
            # A time cadence too: rank 0's clock decides, the other node is told every step.
            checkpoint_every_seconds=0.5,
        )
        command = [sys.executable, str(REPO / "flows" / "train_flow.py"), *_flags(config)]
        out = (tmp_path / f"node{node}.txt").open("w")
        child = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=out, stderr=out)
        children.append((child, out))
    try:
        codes = [child.wait(timeout=240) for child, _ in children]
    finally:
        for child, out in children:
            if child.poll() is None:
                child.kill()
                child.wait()
            out.close()
    outputs = [(tmp_path / f"node{node}.txt").read_text() for node in (0, 1)]
    assert codes == [0, 0], "\n\n".join(o[-3000:] for o in outputs)
    for node in (0, 1):
        got = Result.of(tmp_path / f"node{node}" / "runs" / "run")
        # 2 nodes x 1 process: world size 2, the same gloo reduction as 1 node x 2 processes.
        assert got.same_run_as(reference[0]), f"node {node}\n{outputs[node][-3000:]}"


def test_the_ranks_are_handed_the_code_the_lineage_key_covers(tmp_path, monkeypatch):
    """A rank checks the code it imported against the code in its Job (a rank started after
    an edit must refuse): train-epochs must hand it the key's, or there is nothing to check."""
    import trainflow.tasks.train_epochs as stage
    from trainflow.tasks.cache.code_keys import differs_from_imported

    handed = []

    def capture(launch, job, *args, **kwargs):
        handed.append(job)
        raise KeyboardInterrupt  # stops the run here, before any rank starts

    monkeypatch.setattr(stage, "launch_ranks", capture)
    with pytest.raises(KeyboardInterrupt):
        train_flow(_config(tmp_path, "handed", **DDP))
    [job] = handed
    assert job.code is not None and differs_from_imported(job.code) is None
    modules = {source.module for source in job.code.sources}
    assert {"trainflow.tasks.engine.loop", "trainflow.tasks.engine.step"} <= modules, modules


def test_a_rank_restarted_after_an_edit_of_the_flow_script_refuses(
    tmp_path, subprocess_env, reference
):
    """In a copy of the project: rank 1 edits the flow's script at a seeded step and dies,
    and the launcher restarts the ranks, which import afresh: spawn re-runs the main script,
    code outside every key (an edit of a key's module is refused by the key's own check).
    They must refuse; with the file put back, the same command ends as an uninterrupted run,
    so nothing the edited code could compute was kept."""
    edited = "flows/train_flow.py"
    project = tmp_path / "project"
    for package in ("tasks", "flows"):
        shutil.copytree(REPO / package, project / "trainflow" / package)
    path = project / "trainflow" / edited
    original = path.read_bytes()
    # A file changed after a process started is one it may not have run: the copy must be
    # older than the run by more than the start time's resolution (clock ticks).
    time.sleep(1.0)
    step = random.Random(f"{SEED}-edited-{edited}").randint(EVERY * STEPS + 1, EPOCHS * STEPS - 1)
    log = tmp_path / "faults.jsonl"
    env = _env({**subprocess_env, "PYTHONPATH": str(project)}, log, f"edit:step:{step}:{path}", 1)
    config = _config(tmp_path, "run", max_restarts=1, **DDP)
    script = project / "trainflow" / "flows" / "train_flow.py"
    code, output = _run(config, env, tmp_path / "edited.txt", script=script)
    why = f"{edited} edited at step {step} (TRAINFLOW_FAULT_SEED={SEED})\n{output[-4000:]}"
    assert code != 0 and _strikes(log), why
    assert "the source changed after the run started; run it again" in output, why
    path.write_bytes(original)
    time.sleep(1.0)
    code, output = _run(config, env, tmp_path / "rerun.txt", script=script)
    assert code == 0, output[-4000:]
    assert Result.of(tmp_path / "runs" / "run").same_run_as(reference[0])


@pytest.mark.parametrize(
    "error",
    [InputError("--data d.csv: bad"), NonFiniteLoss("validation", 3, 1), StorageError("full")],
)
def test_a_user_error_a_rank_hands_over_is_raised_as_itself(tmp_path, error):
    if isinstance(error, StorageError):
        error.errno = 28
    path = str(tmp_path / "final")
    raise_handed_over(path)  # nothing handed over: nothing raised
    _hand_over(error, path)
    _hand_over(InputError("a second rank's"), path)  # the first rank's stays
    with pytest.raises(type(error)) as raised:
        raise_handed_over(path)
    assert str(raised.value) == str(error) and os.listdir(tmp_path) == ["final"]
    assert getattr(raised.value, "errno", None) == getattr(error, "errno", None)


@pytest.mark.parametrize(("code", "handed_over"), [(errno.ENOSPC, True), (errno.EIO, False)])
def test_a_rank_hands_over_a_lasting_write_error_and_lets_a_passing_one_restart_the_job(
    tmp_path, monkeypatch, code, handed_over
):
    """A full disk fails every attempt: the launcher raises it. An I/O error may pass: the rank
    fails as in a crash, and the launcher restarts the ranks."""
    from trainflow.tasks.engine import launch

    error = StorageError(f"cannot write a checkpoint: {os.strerror(code)}")
    error.errno = code

    def fails(job):
        raise error

    monkeypatch.setattr(launch, "_train_rank", fails)
    monkeypatch.setenv("RANK", "1")
    job = launch.Job({}, 1, "cpu", None, None, "", "", 1, 10.0, final=str(tmp_path / "final"))
    if handed_over:
        assert launch.run_rank(job).steps == 0
        with pytest.raises(StorageError):
            raise_handed_over(job.final)
    else:
        with pytest.raises(StorageError):
            launch.run_rank(job)
        assert not (tmp_path / "final").exists()


def test_a_bad_process_layout_is_one_line_naming_the_field(capsys):
    from trainflow.flows.cli import parse_config

    with pytest.raises(SystemExit) as info:
        parse_config(TrainConfig, ["--nproc", "2", "--device", "cuda:1"], prog="train_flow.py")
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("train_flow.py: error: --device cuda:1 names one GPU"), err


@pytest.mark.parametrize("rows", [16, 15, 3, 1])
def test_the_ranks_chunks_make_up_each_global_batch(rows):
    from trainflow.tasks.data.batches import TensorBatches
    from trainflow.tasks.engine.ranks import RankBatches

    x = torch.arange(rows * 2, dtype=torch.float32).reshape(rows, 2)
    inner = TensorBatches(x, x[:, :1], 16, seed=7)
    g = torch.Generator().manual_seed(7)
    expected = next(iter(inner.epoch(g)))[0]
    chunks, weights = [], []
    for rank in range(4):
        batches = RankBatches(inner, rank, 4, torch.device("cpu"))
        chunk, _ = next(iter(batches.epoch(torch.Generator().manual_seed(7))))
        chunks.append(chunk)
        weights.append(batches.weight)
    # The same permutation on every rank, cut in rank order: the one-process batch.
    assert torch.equal(torch.cat(chunks), expected)
    assert sum(weights) == pytest.approx(4)  # chunk means, so weighted, average to the batch's
    assert max(len(c) for c in chunks) - min(len(c) for c in chunks) <= 1


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"nnodes": 2}, "--nnodes 2 needs --rdzv-endpoint"),
        ({"nnodes": 2, "node_rank": 2, "rdzv_endpoint": "h:1"}, "--node-rank 2 must be below"),
        ({"rdzv_endpoint": "nohost"}, "--rdzv-endpoint 'nohost' must be host:port"),
        ({"nproc": 2, "device": "mps"}, "--nproc 2: torch.distributed can't train on mps"),
    ],
)
def test_a_process_layout_that_cannot_work_is_refused(flags, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**flags)


def test_more_processes_than_gpus_is_an_input_error():
    from trainflow.tasks.engine.launch import check_launch
    from trainflow.tasks.engine.options import Launch
    from trainflow.tasks.errors import InputError

    if torch.cuda.device_count() >= 64:
        pytest.skip("a machine with 64 GPUs")
    with pytest.raises(InputError, match="--nproc 64: this machine has"):
        check_launch(Launch(nproc=64), "cuda")


def _deployment_run(api: str, config: TrainConfig) -> str:
    """A flow run of a `train` deployment (no worker: the test runs it as one would), whose
    code is this checkout."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        deployment = client.create_deployment(
            flow_id=client.create_flow_from_name("train"),
            name=f"ddp-fence-{os.getpid()}-{time.monotonic_ns()}",
            entrypoint="flows/train_flow.py:train_flow",
            pull_steps=[
                {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}
            ],
        )
        run = client.create_flow_run_from_deployment(
            deployment, parameters={"config": config.model_dump(mode="json")}
        )
        return str(run.id)


def _states(api: str, run_id: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        return sorted(client.read_flow_run_states(run_id), key=lambda s: s.timestamp)


def _files_under(*folders: Path) -> dict[str, list[int]]:
    return {
        str(p): [p.stat().st_size, p.stat().st_mtime_ns]
        for folder in folders
        for p in folder.rglob("*")
        if p.is_file()
    }


def test_a_job_whose_flow_run_was_taken_over_writes_nothing_more(
    tmp_path, subprocess_env, prefect_api
):
    """Split-brain under DDP: the deployment run is marked Crashed (as the silent-run
    automation marks a run whose heartbeats stopped, before its re-run) while its ranks train.
    Rank 0 learns it at its next question to the server, before a checkpoint: from then on
    nothing is written, the launcher exits with the fenced-out status (0: a crash would land
    on the re-run), its ranks die with it, and the server hears nothing more from them."""
    rng = random.Random(f"{SEED}-taken-over")
    ask = rng.randint(2, 3)  # rank 0's 2nd or 3rd question: after a checkpoint of its own
    # 3,200 training rows: 200 global batches an epoch; a checkpoint (and a question) every
    # 1.5 s of training, over 10 epochs.
    config = _config(
        tmp_path,
        "run",
        **{**DDP, "hang_timeout": 60.0},
        n_samples=4000,
        epochs=10,
        checkpoint_every_epochs=0,
        checkpoint_every_seconds=1.5,
    )
    run_id = _deployment_run(prefect_api, config)
    log = tmp_path / "faults.jsonl"
    folders = os.pathsep.join(str(tmp_path / f) for f in ("cache", "runs"))
    env = {
        **_env(subprocess_env, log, f"takeover:ask:{ask}:{folders}", rank=0),
        "PREFECT__FLOW_RUN_ID": run_id,
    }
    with (tmp_path / "out.txt").open("w") as out:
        engine = subprocess.run(
            [sys.executable, "-m", "prefect.engine"],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=300,
        )
    output = (tmp_path / "out.txt").read_text()
    why = f"taken over at rank 0's question {ask} (TRAINFLOW_FAULT_SEED={SEED})\n{output[-4000:]}"
    [strike] = _strikes(log)
    assert strike["set_state"] == "ACCEPT", why
    assert engine.returncode == 0 and "was taken over" in output, why
    for pid in [e["pid"] for e in _events(log) if e["event"] == "start"]:
        _wait_gone(pid, why)
    # Nothing written after rank 0 was told: no checkpoint, no run-folder file.
    assert _files_under(tmp_path / "cache", tmp_path / "runs") == strike["files"], why
    assert any("/checkpoints/" in path for path in strike["files"]), why  # it had written some
    # The last state is the takeover's: the fenced process reported nothing over it.
    last = _states(prefect_api, run_id)[-1]
    assert (last.type.value, last.message) == ("CRASHED", "taken over"), why
