"""train-epochs on many processes: torch's elastic launcher starts the ranks, each trains its
shard of every batch under DistributedDataParallel, and rank 0's result comes back.

README: "Many processes and machines (DDP)". The launcher is torch's own (`elastic_launch`,
what `torchrun` runs): it restarts all ranks when one dies (`max_restarts`), and each attempt
resumes from the newest checkpoint, so a restarted job ends bit for bit where an uninterrupted
one of the same world size does.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import math
import multiprocessing
import os
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from trainflow.tasks.cache.code_keys import (
    CodeKey,
    Source,
    differs_from_imported,
    differs_from_loaded,
)
from trainflow.tasks.data.batches import Batches, Loaders, TensorBatches
from trainflow.tasks.engine.checkpoint import CheckpointSettings
from trainflow.tasks.engine.fit import Progress, train_model
from trainflow.tasks.engine.loop import EpochHook
from trainflow.tasks.engine.models import load_model_code
from trainflow.tasks.engine.options import Launch
from trainflow.tasks.engine.ranks import DistributedRanks, Fence, RankBatches
from trainflow.tasks.engine.stops import Interrupted
from trainflow.tasks.errors import (
    InputError,
    UserError,
    from_record,
    is_final,
    user_error_record,
)

# (train losses, validation losses, metrics) of the epochs done -> a context manager that is
# also the per-epoch hook.
CurvesFactory = Callable[
    [list[float], list[float], dict[str, list[float]]], AbstractContextManager[EpochHook]
]


@dataclass(frozen=True)
class Job:
    """What every rank needs to train: the train-epochs inputs, sent to each by pickling
    (in flight between processes of one job, never stored)."""

    inputs: dict[str, Any]  # train_model's, but those of the run and the rank (below)
    epochs: int
    device: str
    checkpointing: CheckpointSettings | None
    lineage: str | None
    run_dir: str
    progress: str  # a file local rank 0 appends its progress lines to
    threads: int  # torch threads per rank
    hang_timeout: float
    fence: Fence | None = None  # asked by rank 0 before a checkpoint, for the launcher
    launcher: int = 0  # the launcher's pid (set by launch_ranks)
    fenced: str = ""  # a file rank 0 creates when a re-run took the flow run over (ditto)
    # A file the first rank to meet a final user error (bad input, a diverging loss, a folder
    # that can't be written for a lasting reason) writes it to (ditto): the launcher raises it,
    # as one process would, where a rank's exception would have the ranks restarted into the
    # same error, then retried.
    final: str = ""
    code: CodeKey | None = None  # what the lineage key covers: a rank must run that code
    # Every editable module the launcher had loaded (its main script too): a rank must run
    # those bytes as well, key or not.
    loaded: tuple[Source, ...] = ()
    # Rank 0's TensorBoard curves, made from the history it starts from (a resumed run's):
    # written as it trains, as one process writes them. The caller's, so the engine knows no
    # run folder layout.
    curves: CurvesFactory | None = None


@dataclass(frozen=True)
class RankReport:
    rank: int
    steps: int  # training steps this attempt took
    seconds: float  # this attempt, from the rank's start
    train_seconds: float  # of which in train_model
    restarts: int  # how many times the launcher had restarted the ranks before this attempt
    trained: Any = None  # Trained, from each node's local rank 0
    curves_written: bool = False  # rank 0: its run folder holds every epoch's points


class RanksStopped(Interrupted):
    def __init__(self, signum: int):
        BaseException.__init__(
            self,
            f"interrupted by {signal.Signals(signum).name}; the launcher stopped the ranks: the "
            "next run of this config resumes from their last checkpoint",
        )
        self.signum = signum


def rank_device(device: str, local_rank: int) -> torch.device:
    """One GPU per local rank under CUDA; the CPU otherwise."""
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def check_launch(launch: Launch, device: str) -> None:
    """What the machine must offer for `launch`; an InputError naming the setting if not."""
    wants_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if launch.distributed and wants_cuda and torch.cuda.device_count() < launch.nproc:
        raise InputError(
            f"--nproc {launch.nproc}: this machine has {torch.cuda.device_count()} CUDA "
            "device(s), one per process is needed"
        )
    if launch.distributed and device == "mps":
        raise InputError(f"--nproc {launch.nproc}: torch.distributed can't train on mps")


def _die_with_the_launcher(launcher: int) -> None:
    # If the launcher (the train-epochs process) is killed outright it can't stop its ranks;
    # left running, they would train on and write checkpoints beside a re-run's.
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return  # not Linux: no such switch
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != launcher:  # the launcher died before the switch was set
        os._exit(1)


def run_rank(job: Job) -> RankReport:
    """One rank, from process-group start to its report (the launcher's entry point). A user
    error is handed to the launcher (`job.final`), and the rank ends as if done: a restart
    after another rank's trains nothing."""
    if job.final and os.path.exists(job.final):
        return _trained_nothing()
    try:
        return _train_rank(job)
    except Exception as error:
        if not job.final or not is_final(error):  # anything else: restarted, as a crash
            raise
        _hand_over(error, job.final)
        return _trained_nothing()


def _trained_nothing() -> RankReport:
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    return RankReport(int(os.environ["RANK"]), 0, 0.0, 0.0, restarts)


def _hand_over(error: UserError, path: str) -> None:
    """Write `error` to `path` unless another rank did first (a link never replaces a file)."""
    draft = f"{path}.{os.getpid()}"
    Path(draft).write_text(json.dumps(user_error_record(error)))
    with contextlib.suppress(FileExistsError):
        os.link(draft, path)
    os.unlink(draft)


def raise_handed_over(path: str) -> None:
    """The user error a rank handed over, raised here, if there is one."""
    with contextlib.suppress(FileNotFoundError):
        raise from_record(json.loads(Path(path).read_text()))


def _train_rank(job: Job) -> RankReport:
    # A rank is a process of its own: it imported the code from disk at its start, maybe
    # after an edit. Its checkpoints are filed under the launcher's key, so it must be running
    # the code that key covers, or a later run would resume from another code's steps.
    if job.code is not None and (initial := job.inputs.get("initial")) is not None:
        load_model_code(initial.spec.name)  # a plugin's module is checked too
    if job.code is not None and (differs := differs_from_imported(job.code)) is not None:
        raise InputError(f"{differs}: the source changed after the run started; run it again")
    if (differs := differs_from_loaded(job.loaded)) is not None:  # code outside the key too
        raise InputError(f"{differs}: the source changed after the run started; run it again")
    _die_with_the_launcher(job.launcher)
    start = time.perf_counter()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    torch.set_num_threads(job.threads)
    device = rank_device(job.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    # Generous for the start (ranks import torch and unpickle the data at their own pace);
    # training's collectives run in groups with the hang timeout (Ranks).
    start_timeout = timedelta(seconds=max(600, job.hang_timeout))
    dist.init_process_group(
        backend,
        store=_attempt_store(rank, world, restarts, start_timeout),
        rank=rank,
        world_size=world,
        timeout=start_timeout,
    )
    try:
        loaders: Loaders = job.inputs["loaders"]
        train = RankBatches(_on(loaders.train, device), rank, world, device)
        val = RankBatches(_on(loaders.val, device), 0, 1, device)  # whole on every rank
        # All here before the groups with the short timeout connect (a slow start is no hang).
        dist.barrier()
        ranks = DistributedRanks(
            rank, world, device, train, job.hang_timeout, job.fence, job.fenced
        )
        checkpointing = job.checkpointing
        checkpoints = (
            checkpointing.open(job.lineage, job.run_dir) if checkpointing and job.lineage else None
        )
        resume = (
            ranks.resume(checkpoints, job.epochs)
            if checkpoints is not None and checkpointing.resume
            else None
        )
        hooks: list[EpochHook] = []
        if local_rank == 0:
            if resume is not None:
                _appender(job.progress)(f"resumed from epoch {resume.epoch}, batch {resume.batch}")
            hooks.append(Progress(_appender(job.progress), job.epochs, len(train)))
        inputs = {**job.inputs, "loaders": Loaders(train, val, loaders.sample)}
        live = None
        if rank == 0 and job.curves is not None:
            history = ([], [], {})
            if resume is not None:
                history = (resume.train_loss, resume.val_loss, resume.metrics)
            live = LiveCurves(job.curves, history, job.run_dir, _appender(job.progress))
            hooks.append(live)
        with contextlib.closing(live) if live is not None else contextlib.nullcontext():
            training = time.perf_counter()
            trained = train_model(
                **inputs,
                epochs=job.epochs,
                device=device,
                on_epoch=_each_of(hooks),
                checkpoints=checkpoints,
                resume=resume,
                ranks=ranks,
            )
            training = time.perf_counter() - training
        ranks.check_equal(trained.state)
    finally:
        dist.destroy_process_group()
    done = (resume.epoch * len(train) + resume.batch) if resume else 0
    steps = len(trained.train_loss) * len(train) - done
    return RankReport(
        rank,
        steps,
        time.perf_counter() - start,
        training,
        restarts,
        trained if local_rank == 0 else None,
        live is not None and live.error is None,
    )


class LiveCurves:
    """Rank 0's curves, written as it trains: at best effort. A write that fails ends them
    with a warning, never the training (a rank's error would be restarted, then retried, as
    if it were a crash); the launcher, finding them incomplete, writes them from the whole
    history when training ends, and reports a folder it cannot write as one process does."""

    def __init__(
        self,
        factory: CurvesFactory,
        history: tuple[list[float], list[float], dict[str, list[float]]],
        run_dir: str,
        warn: Callable[[str], None],
    ):
        self.run_dir, self.warn = run_dir, warn
        self.error: OSError | None = None
        self.opened: AbstractContextManager[EpochHook] | None = None
        self.hook: EpochHook | None = None
        try:
            self.opened = factory(*history)
            self.hook = self.opened.__enter__()
        except OSError as exc:
            self._stop(exc)

    def __call__(self, epoch: int, train_loss: float, val_loss: float, values: dict) -> None:
        if self.hook is not None:
            try:
                self.hook(epoch, train_loss, val_loss, values)
            except OSError as exc:
                self._stop(exc)

    def close(self) -> None:
        if self.hook is not None:
            try:
                self.opened.__exit__(None, None, None)
            except OSError as exc:
                self._stop(exc)
            self.hook = None

    def _stop(self, exc: OSError) -> None:
        if self.error is None:
            self.warn(
                f"warning: the curves in the run folder {self.run_dir!r} stopped ({exc}); "
                "they are written from the whole history when training ends"
            )
        self.error = exc
        if self.hook is not None:
            self.hook = None
            with contextlib.suppress(OSError):
                self.opened.__exit__(None, None, None)


def _each_of(hooks: list[EpochHook]) -> EpochHook | None:
    if not hooks:
        return None
    if len(hooks) == 1:
        return hooks[0]

    def each(epoch: int, train_loss: float, val_loss: float, values: dict[str, float]) -> None:
        for hook in hooks:
            hook(epoch, train_loss, val_loss, values)

    return each


def _on(batches: Batches, device: torch.device) -> Batches:
    """Tensor batches on this rank's device, copied once (not a chunk at every step)."""
    if isinstance(batches, TensorBatches) and batches.x.device != device:
        x, y = batches.x.to(device), batches.y.to(device)
        return TensorBatches(x, y, batches.batch_size, batches.seed)
    return batches


def _attempt_store(rank: int, world: int, attempt: int, timeout: timedelta) -> dist.Store:
    """The launcher's store, under a prefix of this attempt: the process groups publish their
    addresses there, and an attempt must never read those of the ranks a restart replaced."""
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        is_master=rank == 0 and not agent_hosts,
        timeout=timeout,
    )
    return dist.PrefixStore(f"trainflow/attempt-{attempt}", store)


def _appender(path: str) -> Callable[[str], None]:
    def write(line: str) -> None:
        with open(path, "a") as f:
            f.write(line + "\n")

    return write


@dataclass
class _Tail:
    """Forwards the lines a file gains to `log`, about once a second, until stopped; exits
    this process (the launcher) once a rank has created `fenced`."""

    path: str
    log: Callable[[str], None]
    fenced: str = ""
    fenced_exit: Callable[[], NoReturn] | None = None  # the launcher's exit when fenced out
    stop: threading.Event = field(default_factory=threading.Event)
    offset: int = 0

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(1.0):
            self.flush()
            if self.fenced_exit is not None and os.path.exists(self.fenced):
                # Rank 0 said why on its stderr. The ranks die with this process.
                self.fenced_exit()

    def flush(self) -> None:
        try:
            with open(self.path) as f:
                f.seek(self.offset)
                text = f.read()
        except FileNotFoundError:
            return
        complete = text[: text.rfind("\n") + 1]
        self.offset += len(complete.encode())
        for line in complete.splitlines():
            self.log(line)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.flush()


def launch_ranks(
    launch: Launch,
    job: Job,
    log: Callable[[str], None],
    fenced_exit: Callable[[], NoReturn] | None = None,
) -> RankReport:
    """This node's lowest rank's report: its `trained`, and (rank 0) whether it wrote every
    epoch's curves into this node's run folder."""
    return min(run_ranks(launch, job, log, fenced_exit), key=lambda r: r.rank)


def run_ranks(
    launch: Launch,
    job: Job,
    log: Callable[[str], None],
    fenced_exit: Callable[[], NoReturn] | None = None,
) -> list[RankReport]:
    """Run `job` on `launch.nproc` local ranks (this node's share of the job) under torch's
    elastic agent; their reports, by rank. Progress lines of its local rank 0 go to `log` as
    they come, the ranks' summaries at the end."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if multiprocessing.current_process().daemon:
        raise InputError(
            f"--nproc {launch.nproc}: this process is a daemonic worker and can't start ranks; "
            "run Dask workers with DASK_DISTRIBUTED__WORKER__DAEMON=False"
        )
    endpoint = launch.rdzv_endpoint or f"127.0.0.1:{free_port()}"
    config = LaunchConfig(
        min_nodes=launch.nnodes,
        max_nodes=launch.nnodes,
        nproc_per_node=launch.nproc,
        # Nodes meet at their endpoint under one id; on one node, a fresh job every time.
        run_id="trainflow" if launch.rdzv_endpoint else uuid.uuid4().hex,
        rdzv_backend="c10d",
        rdzv_endpoint=endpoint,
        # The node that hosts the endpoint runs the store; on one node, this one.
        # torchrun's rule, made explicit (two nodes on one host both match its name): node 0
        # runs the rendezvous store at the endpoint.
        rdzv_configs={"is_host": launch.node_rank == 0, "timeout": 600},
        max_restarts=launch.max_restarts,
        monitor_interval=0.1,
        start_method="spawn",
        # A stopped rank ignores SIGTERM: SIGKILL it soon rather than after torch's 30 s.
        shutdown_timeout=5,
    )
    with tempfile.TemporaryDirectory(prefix="trainflow-ranks-") as folder:
        progress = str(Path(folder) / "progress.log")
        fenced, final = str(Path(folder) / "fenced"), str(Path(folder) / "final")
        job = dataclasses.replace(
            job, progress=progress, launcher=os.getpid(), fenced=fenced, final=final
        )
        tail = _Tail(job.progress, log, fenced, fenced_exit)
        try:
            reports: dict[int, RankReport] = elastic_launch(config, run_rank)(job)
            raise_handed_over(final)
        except ChildFailedError as exc:
            raise_handed_over(final)  # the ranks that met it ended well; the others, not
            rank, first = next(iter(sorted(exc.failures.items())))
            raise RuntimeError(
                f"the ranks failed {launch.max_restarts + 1} time(s) (--max-restarts "
                f"{launch.max_restarts}); the last time rank {rank} exited with "
                f"{first.exitcode}: {first.message or 'its log is above'}"
            ) from None
        except SignalException as exc:
            # SIGTERM/SIGINT: the launcher has stopped the ranks. An Interrupted, as for one
            # process: Prefect reports it, and does not retry it.
            raise RanksStopped(exc.sigval) from None
        finally:
            tail.close()
    ordered = sorted(reports.values(), key=lambda r: r.rank)
    for report in ordered:
        log(
            f"rank {report.rank}/{launch.world_size}: {report.steps} steps in "
            f"{report.seconds:.1f} s, {report.restarts} restart(s) before this attempt"
        )
    return ordered


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the rendezvous binds it next)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_threads(nproc: int) -> int:
    """torch threads per rank: this process's share, so the ranks don't oversubscribe."""
    return max(1, math.floor(torch.get_num_threads() / nproc))
