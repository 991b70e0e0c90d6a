import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tasks.data import Dataset, synthetic
from tasks.errors import InputError, NonFiniteLoss
from tasks.loaders import EpochSampler, make_loaders
from tasks.model import ModelSpec, initial_model, instantiate
from tasks.split import split_indices
from tasks.train import make_loss, output_width, train_model

CPU = torch.device("cpu")


def _train(data: Dataset, epochs=200, optimizer="sgd", loss="mse", lr=0.1, model="linear",
           hidden=(), momentum=0.0, kind="tensor"):  # fmt: skip
    parts = split_indices(len(data), 0.2, 13)
    loaders = make_loaders(data, parts, 16, 42, kind, 0, CPU)
    spec = ModelSpec(model, data.n_features, output_width(loss, data.y), hidden)
    initial = initial_model(spec, 42)
    trained = train_model(initial, loaders, optimizer, lr, momentum, 0.0, loss, epochs, CPU)
    return trained, parts


def _seed_loop(data: Dataset, parts, epochs):
    """The book's chapter-2 loop, written as the seed writes it (.item() per step, np.mean)."""
    model = instantiate(initial_model(ModelSpec("linear", 1, 1), 42).spec,
                        initial_model(ModelSpec("linear", 1, 1), 42).state)  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.MSELoss(reduction="mean")
    train_data = TensorDataset(data.x[parts.train], data.y[parts.train])
    val_data = TensorDataset(data.x[parts.val], data.y[parts.val])
    sampler = EpochSampler(len(train_data), torch.Generator().manual_seed(42))
    train_loader = DataLoader(train_data, batch_size=16, sampler=sampler)
    val_loader = DataLoader(val_data, batch_size=16)

    def train_step(x, y):
        model.train()
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()

    def val_step(x, y):
        model.eval()
        return loss_fn(model(x), y).item()

    def mini_batch(loader, step):
        return np.mean([step(x, y) for x, y in loader])

    losses, val_losses = [], []
    for _ in range(epochs):
        losses.append(mini_batch(train_loader, train_step))
        with torch.no_grad():
            val_losses.append(mini_batch(val_loader, val_step))
    return model, losses, val_losses


@pytest.mark.parametrize("kind", ["tensor", "dataloader"])
def test_losses_and_weights_equal_the_seed_loop_in_the_same_order(kind):
    data = synthetic()
    trained, parts = _train(data, epochs=30, kind=kind)
    model, losses, val_losses = _seed_loop(data, parts, epochs=30)
    np.testing.assert_allclose(trained.train_loss, losses, rtol=1e-6)
    np.testing.assert_allclose(trained.val_loss, val_losses, rtol=1e-6)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(trained.state[key], value)


def test_default_run_reaches_the_least_squares_optimum_of_its_training_split():
    data = synthetic()
    trained, parts = _train(data)
    x = torch.cat([data.x[parts.train], torch.ones(80, 1)], dim=1).double()
    (w, b), *_ = np.linalg.lstsq(x.numpy(), data.y[parts.train].double().numpy(), rcond=None)
    assert trained.state["0.weight"].item() == pytest.approx(w.item(), abs=5e-3)
    assert trained.state["0.bias"].item() == pytest.approx(b.item(), abs=5e-3)
    assert len(trained.train_loss) == len(trained.val_loss) == 200
    assert trained.epochs_trained == 200


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("loss", ["mse", "l1", "huber"])
def test_every_optimizer_and_regression_loss_learns(optimizer, loss):
    trained, _ = _train(synthetic(), epochs=40, optimizer=optimizer, loss=loss, lr=0.05,
                        model="mlp", hidden=(8,))  # fmt: skip
    assert trained.train_loss[-1] < trained.train_loss[0]


def _classes(n=120, n_classes=3) -> Dataset:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, n_classes, (n, 1), generator=g).float()
    x = torch.randn(n, 2, generator=g) + 3 * y
    return Dataset(x, y, ("a", "b"), ("label",))


def test_cross_entropy_uses_one_logit_per_class_and_learns():
    data = _classes()
    assert output_width("cross_entropy", data.y) == 3
    trained, _ = _train(data, epochs=30, loss="cross_entropy", optimizer="adam", lr=0.05)
    assert trained.state["0.weight"].shape == (3, 2)
    assert trained.train_loss[-1] < trained.train_loss[0]


def test_bce_with_logits_learns_binary_targets():
    data = _classes(n_classes=2)
    trained, _ = _train(data, epochs=30, loss="bce_with_logits", optimizer="adam", lr=0.05)
    assert trained.train_loss[-1] < trained.train_loss[0]


@pytest.mark.parametrize(
    ("loss", "y", "message"),
    [
        ("cross_entropy", torch.tensor([[0.5], [1.0]]), "class ids"),
        ("cross_entropy", torch.tensor([[0.0, 1.0], [1.0, 0.0]]), "one target column"),
        ("cross_entropy", torch.tensor([[-1.0], [1.0]]), "class ids"),
        ("bce_with_logits", torch.tensor([[2.0], [0.0]]), "between 0 and 1"),
    ],
)
def test_a_loss_that_does_not_fit_the_targets_is_an_input_error(loss, y, message):
    with pytest.raises(InputError, match=message):
        output_width(loss, y)


def test_cross_entropy_loss_casts_float_class_ids():
    loss = make_loss("cross_entropy")(torch.tensor([[5.0, -5.0]]), torch.tensor([[0.0]]))
    assert loss.item() < 1e-3


def test_diverging_training_stops_naming_epoch_and_batch():
    with pytest.raises(NonFiniteLoss, match=r"epoch \d+, batch \d+") as info:
        _train(synthetic(), epochs=50, lr=1e25)
    assert info.value.epoch < 50
