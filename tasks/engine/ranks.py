"""The rank protocol the epoch loop trains through: one process is its do-nothing case
(`SingleProcess`), DistributedDataParallel its other (`DistributedRanks`: each rank trains its
shard of every batch, and the collectives keep the ranks' results bit-identical).

The fence against a second attempt and a cancellation's exception are handed in by the caller:
the engine imports no Prefect.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import NoReturn, Protocol

import torch
import torch.distributed as dist
import xxhash
from torch import Tensor, nn

from trainflow.tasks.data.batches import Batch, Batches
from trainflow.tasks.engine.checkpoint import Checkpoints, TrainState, decode
from trainflow.tasks.engine.step import LossFn

# Asked before a checkpoint is written: whether this attempt still owns its run; called with
# what to do when it doesn't (the fence may also exit the process itself).
Fence = Callable[[Callable[[], NoReturn]], bool]


class Ranks(Protocol):
    """What the epoch loop asks of its place in a job, at its pause points and per epoch."""

    rank: int
    world: int

    @property
    def writes(self) -> bool: ...  # this process writes the checkpoints
    def hold(self) -> bool: ...  # the fence, asked before a checkpoint is written
    def cancellation(self, signum: int) -> BaseException | None: ...
    def wrap(self, model: nn.Module) -> nn.Module: ...
    def shard_loss(self, loss_fn: LossFn) -> LossFn: ...
    def agree(self, due: bool) -> bool: ...
    def gather(self, local: Tensor) -> Tensor: ...
    def epoch_losses(self, train: list[Tensor], val: list[Tensor]) -> list[Tensor]: ...
    def rng_states(self, states: dict[str, Tensor]) -> dict[str, Tensor]: ...
    def own_rng_states(self, saved: dict[str, Tensor]) -> dict[str, Tensor]: ...
    def own_losses(self, saved: Tensor) -> Tensor: ...


class SingleProcess:
    """One process: every collective is the value itself, and a checkpoint reads as this
    process's. `hold` (the fence) and `cancellation` come from the caller; by default, none."""

    rank, world, writes = 0, 1, True

    def __init__(
        self,
        hold: Callable[[], bool] | None = None,
        cancellation: Callable[[int], BaseException | None] | None = None,
    ):
        self._hold, self._cancellation = hold, cancellation

    def hold(self) -> bool:
        return self._hold() if self._hold is not None else True

    def cancellation(self, signum: int) -> BaseException | None:
        return self._cancellation(signum) if self._cancellation is not None else None

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def shard_loss(self, loss_fn: LossFn) -> LossFn:
        return loss_fn

    def agree(self, due: bool) -> bool:
        return due

    def gather(self, local: Tensor) -> Tensor:
        return local

    def epoch_losses(self, train: list[Tensor], val: list[Tensor]) -> list[Tensor]:
        """The epoch's batch losses for its one readout: training's, then validation's."""
        return [torch.stack([*train, *val])]

    def rng_states(self, states: dict[str, Tensor]) -> dict[str, Tensor]:
        return states

    def own_rng_states(self, saved: dict[str, Tensor]) -> dict[str, Tensor]:
        return saved

    def own_losses(self, saved: Tensor) -> Tensor:
        return saved


SINGLE_PROCESS = SingleProcess()  # no fence: tests, benchmarks, a library caller


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


class DistributedRanks:
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
        fence: Fence | None = None,
        fenced: str = "",
    ):
        self.rank, self.world, self.device, self.batches = rank, world, device, batches
        self.fence, self.fenced = fence, fenced
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
        deployment flow run (the split-brain fence, tasks/runs/fence.py, asked on its behalf)."""
        return self.fence(self._fenced_out) if self.fence is not None else True

    def cancellation(self, signum: int) -> BaseException | None:
        return None  # the ranks never stop on a signal of their own: the launcher stops them

    def _fenced_out(self) -> NoReturn:
        # The launcher is the process the re-run replaced: it must exit (as one process would,
        # with the fence's exit code), and the ranks die with it. This rank writes nothing more
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

    def epoch_losses(self, train: list[Tensor], val: list[Tensor]) -> list[Tensor]:
        """Training's batch losses averaged over the ranks, then validation's (every rank
        validates the whole split, so its own are every rank's)."""
        return [self.mean_losses(torch.stack(train)), torch.stack(val)]

    def mean_losses(self, local: Tensor) -> Tensor:
        """The batches' losses: the ranks' weighted chunk losses summed in rank order over W.
        Gathered rather than all-reduced, so every rank adds the same numbers in the same
        order and reports the same loss, bit for bit."""
        return (self.gather(local.double()).sum(0) / self.world).to(local.device)

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
