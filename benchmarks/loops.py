"""The training loops the benchmarks race, on the same data, model, optimizer and batch order.

- `seed_loop`: the tutorial's loop as the book writes it (DataLoader, `.item()` every step,
  `np.mean`), with a sampler that draws the same per-epoch permutation trainflow draws, so
  both see identical batches and their losses can be compared value for value;
- `trainflow_loop`: trainflow's own `train_model` (the train-epochs task's body); with
  `sgd_step=True`, its loop with every update through `SGD.step` instead of the plain-SGD
  fast path, which is what the fast path saves;
- `autograd_free_loop`: hand-written gradients for linear regression with SGD: the
  Python-level limit for the seed's model;
- `bare_loop`: trainflow's epoch loop without validation metrics or a schedule, the loop as
  it was before them, against which `trainflow` (metrics on, as always) and `trainflow,
  cosine` (metrics, warm-up and a cosine schedule) show what those cost (#15: at most 10%),
  and `bare, nn.MSELoss` / `bare, loss.backward` what the loop's MSE kernel and its own
  call into autograd's engine save (#14).

    python benchmarks/loops.py [--scale seed] [--rounds 5] [--device cpu]

races them in one process, round after round (so a busy machine slows each alike), and
prints steps/s with the ratios side by side.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from seed_script import make_train_step_fn, make_val_step_fn, mini_batch
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

import tasks.loop
from tasks.data import Dataset, synthetic
from tasks.loaders import epoch_order, make_loaders
from tasks.loop import EpochLoop
from tasks.model import ModelSpec, initial_model, instantiate
from tasks.options import TrainingOptions
from tasks.split import Split, split_indices
from tasks.train import make_loss, train_model

COSINE = TrainingOptions(lr_schedule="cosine", warmup_epochs=5)


@dataclass(frozen=True)
class Scale:
    name: str
    rows: int
    features: int
    model: str
    hidden: tuple[int, ...]
    batch_size: int
    lr: float
    epochs: int


# Wall time by default; `--clock cpu` counts this process's CPU time instead, which a machine
# shared with other jobs disturbs far less (run with OMP_NUM_THREADS=1 for one thread's time).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


SEED_SCALE = Scale("seed", 100, 1, "linear", (), 16, 0.1, 300)
LARGE_SCALE = Scale("large", 1_000_000, 32, "mlp", (64, 64), 256, 0.01, 1)


def make_data(scale: Scale) -> Dataset:
    if scale.name == "seed":
        return synthetic()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(scale.rows, scale.features, generator=g)
    w = torch.randn(scale.features, 1, generator=g)
    return Dataset(x, x @ w + 0.1 * torch.randn(scale.rows, 1, generator=g), (), ())


@dataclass
class LoopResult:
    seconds: float
    train_steps: int
    train_loss: list[float]
    val_loss: list[float]

    @property
    def steps_per_s(self) -> float:
        return self.train_steps / self.seconds


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _steps(scale: Scale, parts: Split, epochs: int) -> int:
    return -(-len(parts.train) // scale.batch_size) * epochs


class EpochOrder(Sampler[int]):
    """One permutation per epoch from `generator`, as trainflow's loaders draw it (a
    RandomSampler given a generator draws a second, unused one at each epoch's end)."""

    def __init__(self, n: int, generator: torch.Generator):
        self.n, self.generator = n, generator

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        yield from epoch_order(self.n, self.generator).tolist()


def seed_loop(
    scale: Scale, device: torch.device, epochs: int, shuffle_seed: int = 42
) -> LoopResult:
    data, parts = make_data(scale), split_indices(scale.rows, 0.2, 13)
    initial = initial_model(ModelSpec(scale.model, scale.features, 1, scale.hidden), 42)
    model = instantiate(initial.spec, initial.state).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=scale.lr)
    loss_fn = nn.MSELoss(reduction="mean")
    train_data = TensorDataset(data.x[parts.train], data.y[parts.train])
    val_data = TensorDataset(data.x[parts.val], data.y[parts.val])
    # RandomSampler's draw once per epoch: the batches trainflow's loaders see.
    sampler = EpochOrder(len(train_data), torch.Generator().manual_seed(shuffle_seed))
    train_loader = DataLoader(train_data, batch_size=scale.batch_size, sampler=sampler)
    val_loader = DataLoader(val_data, batch_size=scale.batch_size)

    train_step = make_train_step_fn(model, loss_fn, optimizer)
    val_step = make_val_step_fn(model, loss_fn)
    losses, val_losses = [], []
    _sync(device)
    start = clock()
    for _ in range(epochs):
        losses.append(float(mini_batch(device, train_loader, train_step)))
        with torch.no_grad():
            val_losses.append(float(mini_batch(device, val_loader, val_step)))
    _sync(device)
    return LoopResult(clock() - start, _steps(scale, parts, epochs), losses, val_losses)


class SGDStep(torch.optim.SGD):
    """SGD itself, under another name: the loop's fast path declines it, so every update runs
    `SGD.step`, the code the fast path replaces."""


def trainflow_loop(
    scale: Scale,
    device: torch.device,
    epochs: int,
    sgd_step: bool = False,
    options: TrainingOptions = TrainingOptions(),  # noqa: B008 (frozen)
    bare: bool = False,
    without: str = "",
) -> LoopResult:
    data, parts = make_data(scale), split_indices(scale.rows, 0.2, 13)
    loaders = make_loaders(data, parts, scale.batch_size, 42, "tensor", 0, device)
    initial = initial_model(ModelSpec(scale.model, scale.features, 1, scale.hidden), 42)
    _sync(device)
    start = clock()
    if sgd_step or bare:  # train_model's own steps, with the optimizer it can't build / no metrics
        model = instantiate(initial.spec, initial.state).to(device)
        sgd = SGDStep if sgd_step else torch.optim.SGD
        optimizer = sgd(model.parameters(), lr=scale.lr)
        # `without` one of the loop's shortcuts: the loss module, or `loss.backward()` itself
        loss_fn = nn.MSELoss() if without == "mse kernel" else make_loss("mse")
        engine_call = tasks.loop._engine_run_backward
        if without == "engine call":
            tasks.loop._engine_run_backward = None  # its backward() is then loss.backward()
        try:
            loop = EpochLoop(model, loaders.train, loaders.val, loss_fn, optimizer, epochs)
            history = loop.run()
        finally:
            tasks.loop._engine_run_backward = engine_call
        train_loss, val_loss = history.train, history.val
    else:
        trained = train_model(
            initial, loaders, "sgd", scale.lr, 0.0, 0.0, "mse", epochs, device, options=options
        )
        train_loss, val_loss = trained.train_loss, trained.val_loss
    _sync(device)
    steps = _steps(scale, parts, epochs)
    return LoopResult(clock() - start, steps, train_loss, val_loss)


def autograd_free_loop(device: torch.device, epochs: int) -> LoopResult:
    """Linear regression with SGD, gradients written out: no autograd, no optimizer object."""
    scale = SEED_SCALE
    data, parts = make_data(scale), split_indices(scale.rows, 0.2, 13)
    loaders = make_loaders(data, parts, scale.batch_size, 42, "tensor", 0, device)
    initial = initial_model(ModelSpec("linear", 1, 1), 42)
    w, b = (initial.state[k].clone().to(device) for k in ("0.weight", "0.bias"))
    losses = []
    _sync(device)
    start = clock()
    shuffle = loaders.train.shuffle()
    for _ in range(epochs):
        batch_losses = []
        for x, y in loaders.train.epoch(shuffle):
            error = x @ w.T + b - y
            batch_losses.append((error * error).mean())
            w -= scale.lr * 2 * (error.T @ x) / x.shape[0]
            b -= scale.lr * 2 * error.mean(0)
        losses.append(torch.stack(batch_losses).mean())
    result = torch.stack(losses).tolist()
    _sync(device)
    return LoopResult(clock() - start, _steps(scale, parts, epochs), result, [])


LOOPS: dict[str, Callable[[Scale, torch.device, int], LoopResult]] = {
    "seed loop": seed_loop,
    "trainflow, SGD.step": lambda scale, device, n: trainflow_loop(scale, device, n, True),
    "trainflow": trainflow_loop,
    "trainflow, bare": lambda scale, device, n: trainflow_loop(scale, device, n, bare=True),
    "trainflow, cosine": lambda scale, device, n: trainflow_loop(scale, device, n, options=COSINE),
    "bare, nn.MSELoss": lambda scale, device, n: trainflow_loop(
        scale, device, n, bare=True, without="mse kernel"
    ),
    "bare, loss.backward": lambda scale, device, n: trainflow_loop(
        scale, device, n, bare=True, without="engine call"
    ),
    "autograd-free limit": lambda scale, device, n: autograd_free_loop(device, n),
}


def main() -> None:
    parser = argparse.ArgumentParser(description="Race the training loops; print steps/s.")
    parser.add_argument("--scale", choices=("seed", "large"), default="seed")
    parser.add_argument("--rounds", type=int, default=5, help="measurements per loop")
    parser.add_argument("--epochs", type=int, help="per measurement (default: the scale's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clock", choices=CLOCKS, default="wall")
    args = parser.parse_args()
    global clock
    clock = CLOCKS[args.clock]
    scale = {"seed": SEED_SCALE, "large": LARGE_SCALE}[args.scale]
    device, epochs = torch.device(args.device), args.epochs or scale.epochs
    loops = {k: v for k, v in LOOPS.items() if scale is SEED_SCALE or "autograd" not in k}
    for run in loops.values():  # first-call costs (lazy imports, allocator) are not steps
        run(scale, device, max(1, epochs // 20))
    rates: dict[str, list[float]] = {name: [] for name in loops}
    results: dict[str, LoopResult] = {}
    for _ in range(args.rounds):
        for name, run in loops.items():
            results[name] = run(scale, device, epochs)
            rates[name].append(results[name].steps_per_s)
    seed, ours = results["seed loop"], results["trainflow"]
    same = (seed.train_loss, seed.val_loss) == (ours.train_loss, ours.val_loss)
    same_step = (results["trainflow, SGD.step"].train_loss, results["trainflow"].train_loss)
    base, step = (
        statistics.median(rates["seed loop"]),
        statistics.median(rates["trainflow, SGD.step"]),
    )
    print(f"loops at {scale.name} scale on {device}, {epochs} epochs, median of {args.rounds}")
    print(f"{'loop':<22}{'steps/s (min–max)':>28}{'vs seed loop':>15}{'vs SGD.step':>13}")
    for name, values in rates.items():
        median = statistics.median(values)
        spread = f"{median:,.0f} ({min(values):,.0f}–{max(values):,.0f})"
        print(f"{name:<22}{spread:>28}{median / base:>14.2f}×{median / step:>12.2f}×")
    print(
        f"losses: trainflow = seed loop, bit for bit: {same}; "
        f"fast path = SGD.step: {same_step[0] == same_step[1]}"
    )
    # The best round too: on a machine others load, it is the closest to the loop's own cost.
    bare, best = statistics.median(rates["trainflow, bare"]), max(rates["trainflow, bare"])
    for name in ("bare, nn.MSELoss", "bare, loss.backward"):
        same = (results[name].train_loss, results[name].val_loss) == (
            results["trainflow, bare"].train_loss,
            results["trainflow, bare"].val_loss,
        )
        print(
            f"trainflow, bare / {name}: {bare / statistics.median(rates[name]):.3f} median "
            f"(what that shortcut saves); losses bit for bit the same: {same}"
        )
    for name in ("trainflow", "trainflow, cosine"):
        print(
            f"{name} / trainflow, bare: {statistics.median(rates[name]) / bare:.3f} median, "
            f"{max(rates[name]) / best:.3f} best round (metrics, and the schedule: must stay "
            ">= 0.90)"
        )


if __name__ == "__main__":
    main()
