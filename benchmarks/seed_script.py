"""The seed tutorial (chapter 2 of *Deep Learning with PyTorch Step-by-Step*), as the book
writes it: the baseline that trainflow's benchmarks compare against.

    python benchmarks/seed_script.py [--epochs 200] [--logdir runs/seed] [--device cpu]
"""

import argparse

import numpy as np
import torch
import torch.nn as nn
import torch.optim as optim
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.dataset import random_split
from torch.utils.tensorboard import SummaryWriter


def make_train_step_fn(model, loss_fn, optimizer):
    def perform_train_step_fn(x, y):
        model.train()
        yhat = model(x)
        loss = loss_fn(yhat, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()

    return perform_train_step_fn


def make_val_step_fn(model, loss_fn):
    def perform_val_step_fn(x, y):
        model.eval()
        yhat = model(x)
        loss = loss_fn(yhat, y)
        return loss.item()

    return perform_val_step_fn


def mini_batch(device, data_loader, step_fn):
    mini_batch_losses = []
    for x_batch, y_batch in data_loader:
        x_batch = x_batch.to(device)
        y_batch = y_batch.to(device)
        mini_batch_loss = step_fn(x_batch, y_batch)
        mini_batch_losses.append(mini_batch_loss)
    loss = np.mean(mini_batch_losses)
    return loss


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--logdir", default="runs/simple_linear_regression")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    # Data generation
    true_b, true_w, N = 1, 2, 100
    np.random.seed(42)
    x = np.random.rand(N, 1)
    epsilon = 0.1 * np.random.randn(N, 1)
    y = true_b + true_w * x + epsilon

    # Data preparation
    torch.manual_seed(13)
    x_tensor = torch.as_tensor(x).float()
    y_tensor = torch.as_tensor(y).float()
    dataset = TensorDataset(x_tensor, y_tensor)
    ratio = 0.8
    n_total = len(dataset)
    n_train = int(n_total * ratio)
    n_val = n_total - n_train
    train_data, val_data = random_split(dataset, [n_train, n_val])
    train_loader = DataLoader(dataset=train_data, batch_size=16, shuffle=True)
    val_loader = DataLoader(dataset=val_data, batch_size=16)

    # Model configuration
    device = args.device
    lr = 0.1
    torch.manual_seed(42)
    model = nn.Sequential(nn.Linear(1, 1)).to(device)
    optimizer = optim.SGD(model.parameters(), lr=lr)
    loss_fn = nn.MSELoss(reduction="mean")
    train_step_fn = make_train_step_fn(model, loss_fn, optimizer)
    val_step_fn = make_val_step_fn(model, loss_fn)
    writer = SummaryWriter(args.logdir)
    x_sample, y_sample = next(iter(train_loader))  # noqa: RUF059 (as the book writes it)
    writer.add_graph(model, x_sample.to(device))

    # Model training
    losses, val_losses = [], []
    for epoch in range(args.epochs):
        loss = mini_batch(device, train_loader, train_step_fn)
        losses.append(loss)
        with torch.no_grad():
            val_loss = mini_batch(device, val_loader, val_step_fn)
            val_losses.append(val_loss)
        writer.add_scalars(
            main_tag="loss",
            tag_scalar_dict={"training": loss, "validation": val_loss},
            global_step=epoch,
        )
    writer.close()
    print(f"final training loss {losses[-1]:.6f}, validation loss {val_losses[-1]:.6f}")


if __name__ == "__main__":
    main()
