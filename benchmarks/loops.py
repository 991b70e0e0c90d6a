"""The training loops the benchmarks race, on the same data, model, optimizer and batch order.

- `seed_loop`: the tutorial's loop as the book writes it (DataLoader, `.item()` every step,
  `np.mean`), with a sampler that draws the same per-epoch permutation trainflow draws, so
  both see identical batches and their losses can be compared value for value;
- `trainflow_loop`: trainflow's own `train_model` (the train-epochs task's body);
- `autograd_free_loop`: hand-written gradients for linear regression with SGD: the
  Python-level limit for the seed's model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from seed_script import make_train_step_fn, make_val_step_fn, mini_batch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tasks.data import Dataset, synthetic
from tasks.loaders import EpochSampler, make_loaders
from tasks.model import ModelSpec, initial_model, instantiate
from tasks.split import Split, split_indices
from tasks.train import train_model


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
    sampler = EpochSampler(len(train_data), torch.Generator().manual_seed(shuffle_seed))
    train_loader = DataLoader(train_data, batch_size=scale.batch_size, sampler=sampler)
    val_loader = DataLoader(val_data, batch_size=scale.batch_size)

    train_step = make_train_step_fn(model, loss_fn, optimizer)
    val_step = make_val_step_fn(model, loss_fn)
    losses, val_losses = [], []
    _sync(device)
    start = time.perf_counter()
    for _ in range(epochs):
        losses.append(float(mini_batch(device, train_loader, train_step)))
        with torch.no_grad():
            val_losses.append(float(mini_batch(device, val_loader, val_step)))
    _sync(device)
    return LoopResult(time.perf_counter() - start, _steps(scale, parts, epochs), losses, val_losses)


def trainflow_loop(scale: Scale, device: torch.device, epochs: int) -> LoopResult:
    data, parts = make_data(scale), split_indices(scale.rows, 0.2, 13)
    loaders = make_loaders(data, parts, scale.batch_size, 42, "tensor", 0, device)
    initial = initial_model(ModelSpec(scale.model, scale.features, 1, scale.hidden), 42)
    _sync(device)
    start = time.perf_counter()
    trained = train_model(initial, loaders, "sgd", scale.lr, 0.0, 0.0, "mse", epochs, device)
    _sync(device)
    return LoopResult(time.perf_counter() - start, _steps(scale, parts, epochs),
                      trained.train_loss, trained.val_loss)  # fmt: skip


def autograd_free_loop(device: torch.device, epochs: int) -> LoopResult:
    """Linear regression with SGD, gradients written out: no autograd, no optimizer object."""
    scale = SEED_SCALE
    data, parts = make_data(scale), split_indices(scale.rows, 0.2, 13)
    loaders = make_loaders(data, parts, scale.batch_size, 42, "tensor", 0, device)
    initial = initial_model(ModelSpec("linear", 1, 1), 42)
    w, b = (initial.state[k].clone().to(device) for k in ("0.weight", "0.bias"))
    losses = []
    _sync(device)
    start = time.perf_counter()
    for _ in range(epochs):
        batch_losses = []
        for x, y in loaders.train.epoch():
            error = x @ w.T + b - y
            batch_losses.append((error * error).mean())
            w -= scale.lr * 2 * (error.T @ x) / x.shape[0]
            b -= scale.lr * 2 * error.mean(0)
        losses.append(torch.stack(batch_losses).mean())
    result = torch.stack(losses).tolist()
    _sync(device)
    return LoopResult(time.perf_counter() - start, _steps(scale, parts, epochs), result, [])
