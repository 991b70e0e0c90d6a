"""train-epochs on many processes: torch's elastic launcher starts the ranks, each trains its
shard of every batch under DistributedDataParallel, and rank 0's result comes back.

README: "Many processes and machines (DDP)". The launcher is torch's own (`elastic_launch`,
what `torchrun` runs): it restarts all ranks when one dies (`max_restarts`), and each attempt
resumes from the newest checkpoint, so a restarted job ends bit for bit where an uninterrupted
one of the same world size does.
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
import multiprocessing
import os
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
import xxhash
from torch import Tensor, nn

from tasks import fence
from tasks.checkpoint import Checkpoints, CheckpointSettings, TrainState, decode
from tasks.code_keys import CodeKey, differs_from_imported
from tasks.errors import InputError
from tasks.loaders import Batch, Batches, Loaders, TensorBatches
from tasks.loop import Interrupted, LossFn
from tasks.model import load_model_code
from tasks.options import Launch


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
    owner: fence.Owner | None = None  # the deployment flow run the launcher trains for
    launcher: int = 0  # the launcher's pid (set by launch_ranks)
    fenced: str = ""  # a file rank 0 creates when a re-run took the flow run over (ditto)
    code: CodeKey | None = None  # what the lineage key covers: a rank must run that code


@dataclass(frozen=True)
class RankReport:
    rank: int
    steps: int  # training steps this attempt took
    seconds: float  # this attempt, from the rank's start
    train_seconds: float  # of which in train_model
    restarts: int  # how many times the launcher had restarted the ranks before this attempt
    trained: Any = None  # Trained, from each node's local rank 0


class RankBatches:
    """One rank's part of every batch of `inner`: the global batch split into `world`
    contiguous chunks (`tensor_split`: sizes differ by at most one row).

    `batch_size` stays global: every rank draws the same permutation from the same seeded
    generator and takes its chunk of each batch, so W ranks step through the rows one process
    would. `weight` is the chunk's share of the batch (rows × W / batch rows), by which its
    mean loss is scaled so that DDP's average of the ranks' gradients is the gradient of the
    batch's mean loss even when chunks differ in size (a last partial batch).
    """

    def __init__(self, inner: Batches, rank: int, world: int, device: torch.device):
        self.inner, self.rank, self.world, self.device = inner, rank, world, device
        self.batch_size = inner.batch_size
        self.weight = 1.0

    def __len__(self) -> int:
        return len(self.inner)

    def shuffle(self) -> torch.Generator | None:
        return self.inner.shuffle()

    def epoch(self, generator: torch.Generator | None, start_batch: int = 0) -> Iterator[Batch]:
        for x, y in self.inner.epoch(generator, start_batch):
            chunk = torch.tensor_split(torch.arange(x.shape[0]), self.world)[self.rank]
            start, stop = (int(chunk[0]), int(chunk[-1]) + 1) if len(chunk) else (0, 0)
            self.weight = (stop - start) * self.world / x.shape[0]
            yield x[start:stop].to(self.device), y[start:stop].to(self.device)


class Ranks:
    """This process's place in the job, and the collectives the epoch loop needs.

    Every collective of training waits at most `hang_timeout` seconds: a rank that hangs
    (stopped, deadlocked) fails the others within it, and the launcher restarts the job
    instead of waiting forever. Control traffic (checkpoint decisions, losses, RNG states) goes
    over a gloo group on the CPU whatever the training backend, off the GPU's stream.
    """

    def __init__(
        self,
        rank: int,
        world: int,
        device: torch.device,
        batches: RankBatches,
        hang_timeout: float,
        owner: fence.Owner | None = None,
        fenced: str = "",
    ):
        self.rank, self.world, self.device, self.batches = rank, world, device, batches
        self.owner, self.fenced = owner, fenced
        timeout = timedelta(seconds=hang_timeout)
        backend = "nccl" if device.type == "cuda" else "gloo"
        self.group = dist.new_group(backend=backend, timeout=timeout)
        self.control = (
            self.group if backend == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
        )

    @property
    def writes(self) -> bool:
        return self.rank == 0

    def hold(self) -> bool:
        """Rank 0, before it writes a checkpoint: whether the launcher still owns its
        deployment flow run (the split-brain fence, tasks/fence.py, asked on its behalf)."""
        return fence.hold(self.owner, self._fenced_out) if self.owner is not None else True

    def _fenced_out(self) -> NoReturn:
        # The launcher is the process the re-run replaced: it must exit (as one process would,
        # with fence.FENCED_EXIT), and the ranks die with it. This rank writes nothing more
        # meanwhile; the others wait for it in their next collective.
        Path(self.fenced).touch()
        threading.Event().wait()
        raise AssertionError("unreachable")

    def wrap(self, model: nn.Module) -> nn.Module:
        ids = [self.device] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, process_group=self.group)

    def shard_loss(self, loss_fn: LossFn) -> LossFn:
        def loss(pred: Tensor, y: Tensor) -> Tensor:
            if y.shape[0] == 0:  # no row here: zero gradients, still one DDP all-reduce
                return pred.sum() * 0.0
            value = loss_fn(pred, y)
            weight = self.batches.weight
            return value if weight == 1.0 else value * weight

        return loss

    def agree(self, due: bool) -> bool:
        """Rank 0's answer, on every rank (its clock decides a time-cadence checkpoint)."""
        flag = torch.tensor([int(due and self.rank == 0)])
        dist.broadcast(flag, src=0, group=self.control)
        return bool(flag)

    def gather(self, local: Tensor) -> Tensor:
        """Every rank's `local` (same shape everywhere), stacked in rank order."""
        local = local.detach().to("cpu").contiguous()
        if local.numel() == 0:  # equal on every rank: nothing to send
            return local.expand(self.world, *local.shape).clone()
        parts = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(parts, local, group=self.control)
        return torch.stack(parts)

    def mean_losses(self, local: Tensor) -> Tensor:
        """The batches' losses: the ranks' weighted chunk losses summed in rank order over W.
        Gathered rather than all-reduced, so every rank adds the same numbers in the same
        order and reports the same loss, bit for bit."""
        return self.gather(local.double()).sum(0) / self.world

    def rng_states(self, states: dict[str, Tensor]) -> dict[str, Tensor]:
        """Every rank's RNG states, for a checkpoint: rank 0's under their usual names (a
        checkpoint reads as one process's), rank r's as `rank<r>.<name>`."""
        out = {}
        for name, state in states.items():
            for r, value in enumerate(self.gather(state)):
                out[name if r == 0 else f"rank{r}.{name}"] = value
        return out

    def own_rng_states(self, saved: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.rank == 0:
            return {k: v for k, v in saved.items() if not k.startswith("rank")}
        prefix = f"rank{self.rank}."
        return {k[len(prefix) :]: v for k, v in saved.items() if k.startswith(prefix)}

    def own_losses(self, saved: Tensor) -> Tensor:
        return saved[self.rank]  # a checkpoint holds every rank's batch losses, by rank

    def resume(self, checkpoints: Checkpoints, max_epoch: int) -> TrainState | None:
        """The newest checkpoint, read by rank 0 and sent to all: every rank starts from the
        same one, and a node without the cache's file system still gets it."""
        data = checkpoints.latest_bytes(max_epoch) if self.rank == 0 else b""
        size = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64)
        dist.broadcast(size, src=0, group=self.control)
        if int(size) == 0:
            return None
        buffer = (
            torch.frombuffer(bytearray(data), dtype=torch.uint8)
            if self.rank == 0
            else torch.empty(int(size), dtype=torch.uint8)
        )
        dist.broadcast(buffer, src=0, group=self.control)
        return decode(buffer.numpy().tobytes())

    def check_equal(self, state: dict[str, Tensor]) -> None:
        """Fails every rank if their weights differ: DDP keeps them equal, bit for bit."""
        hasher = xxhash.xxh3_64()
        for value in state.values():
            hasher.update(value.to("cpu").contiguous().numpy().tobytes())
        digest = torch.tensor([hasher.intdigest() >> 1], dtype=torch.int64)  # fits an int64
        if len(set(self.gather(digest).flatten().tolist())) != 1:
            raise RuntimeError("the ranks' final weights differ (DDP keeps them equal)")


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
    """One rank, from process-group start to its report (the launcher's entry point)."""
    from tasks.train import Progress, train_model  # tasks.train imports this module

    # A rank is a process of its own: it imported the code from disk at its start, maybe
    # after an edit. Its checkpoints are filed under the launcher's key, so it must be running
    # the code that key covers, or a later run would resume from another code's steps.
    if job.code is not None and (initial := job.inputs.get("initial")) is not None:
        load_model_code(initial.spec.name)  # a plugin's module is checked too
    if job.code is not None and (differs := differs_from_imported(job.code)) is not None:
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
        ranks = Ranks(rank, world, device, train, job.hang_timeout, job.owner, job.fenced)
        checkpointing = job.checkpointing
        checkpoints = (
            checkpointing.open(job.lineage, job.run_dir) if checkpointing and job.lineage else None
        )
        resume = (
            ranks.resume(checkpoints, job.epochs)
            if checkpoints is not None and checkpointing.resume
            else None
        )
        on_epoch = None
        if local_rank == 0:
            if resume is not None:
                _appender(job.progress)(f"resumed from epoch {resume.epoch}, batch {resume.batch}")
            on_epoch = Progress(_appender(job.progress), job.epochs, len(train))

        inputs = {**job.inputs, "loaders": Loaders(train, val, loaders.sample)}
        training = time.perf_counter()
        trained = train_model(
            **inputs,
            epochs=job.epochs,
            device=device,
            on_epoch=on_epoch,
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
    )


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
    stop: threading.Event = field(default_factory=threading.Event)
    offset: int = 0

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(1.0):
            self.flush()
            if self.fenced and os.path.exists(self.fenced):
                # Rank 0 said why on its stderr. The ranks die with this process.
                fence.exit_now()

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


def launch_ranks(launch: Launch, job: Job, log: Callable[[str], None]) -> Any:
    return min(run_ranks(launch, job, log), key=lambda r: r.rank).trained


def run_ranks(launch: Launch, job: Job, log: Callable[[str], None]) -> list[RankReport]:
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
        fenced = str(Path(folder) / "fenced")
        job = dataclasses.replace(job, progress=progress, launcher=os.getpid(), fenced=fenced)
        tail = _Tail(job.progress, log, fenced)
        try:
            reports: dict[int, RankReport] = elastic_launch(config, run_rank)(job)
        except ChildFailedError as exc:
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
