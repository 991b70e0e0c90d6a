"""train-epochs' loop: the seed's computation, its optimizers and losses."""

import math
import sys
import warnings
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from trainflow.tasks.data.batches import Loaders, make_loaders
from trainflow.tasks.data.splits import split_indices
from trainflow.tasks.data.tensors import Dataset, synthetic
from trainflow.tasks.engine.fit import train_model
from trainflow.tasks.engine.loop import seed_mean
from trainflow.tasks.engine.losses import make_loss, output_width
from trainflow.tasks.engine.models import ModelSpec, initial_model, instantiate
from trainflow.tasks.engine.step import make_train_step
from trainflow.tasks.errors import InputError, NonFiniteLoss

from ..conftest import REPO

CPU = torch.device("cpu")


def _train(
    data: Dataset,
    epochs=200,
    optimizer="sgd",
    loss="mse",
    lr=0.1,
    model="linear",
    hidden=(),
    momentum=0.0,
    kind="tensor",
):
    parts = split_indices(len(data), 0.2, 13)
    loaders = make_loaders(data, parts, 16, 42, kind, 0, CPU)
    spec = ModelSpec(model, data.n_features, output_width(loss, data.y), hidden)
    initial = initial_model(spec, 42)
    trained = train_model(initial, loaders, optimizer, lr, momentum, 0.0, loss, epochs, CPU)
    return trained, parts


@dataclass
class SeedRun:
    """What benchmarks/seed_script.py's main() did, recorded from outside its code."""

    initial: dict[str, torch.Tensor] = field(default_factory=dict)
    final: dict[str, torch.Tensor] = field(default_factory=dict)
    train_batches: list[list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=list)
    val_batches: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)


@pytest.fixture(scope="module")
def seed_run() -> SeedRun:
    """The book's script as written, default flags on the CPU: its own data, split, global
    RNG, DataLoader(shuffle=True), step functions and mini_batch. Only the TensorBoard writer
    is replaced (by a recorder), and its step functions are wrapped to record their batches."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import seed_script

    run = SeedRun()
    make_train_step_fn = seed_script.make_train_step_fn
    make_val_step_fn = seed_script.make_val_step_fn

    def recording_train_step_fn(model, loss_fn, optimizer):
        run.initial = {k: v.clone() for k, v in model.state_dict().items()}
        run.final = model.state_dict()  # live: holds the final weights once main() returns
        step = make_train_step_fn(model, loss_fn, optimizer)

        def train_step(x, y):
            if not run.train_batches or len(run.train_batches[-1]) == 5:  # 80 rows, batch 16
                run.train_batches.append([])
            run.train_batches[-1].append((x.clone(), y.clone()))
            return step(x, y)

        return train_step

    def recording_val_step_fn(model, loss_fn):
        step = make_val_step_fn(model, loss_fn)

        def val_step(x, y):
            if len(run.val_batches) < 2:  # 20 rows: the same two batches every epoch
                run.val_batches.append((x.clone(), y.clone()))
            return step(x, y)

        return val_step

    class Recorder:
        def __init__(self, logdir: str) -> None:
            pass

        def add_graph(self, model, sample) -> None:
            pass

        def add_scalars(self, main_tag, tag_scalar_dict, global_step) -> None:
            run.losses.append(tag_scalar_dict["training"])
            run.val_losses.append(tag_scalar_dict["validation"])

        def close(self) -> None:
            pass

    with pytest.MonkeyPatch.context() as patch, torch.random.fork_rng(devices=[]):
        numpy_state = np.random.get_state()
        patch.setattr(seed_script, "make_train_step_fn", recording_train_step_fn)
        patch.setattr(seed_script, "make_val_step_fn", recording_val_step_fn)
        patch.setattr(seed_script, "SummaryWriter", Recorder)
        patch.setattr(sys, "argv", ["seed_script.py", "--device", "cpu"])
        try:
            seed_script.main()
        finally:
            np.random.set_state(numpy_state)
    assert len(run.losses) == len(run.train_batches) == 200
    return run


class Replay:
    """Batches the seed run drew, epoch after epoch, in its order: trainflow's loop fed exactly
    what the book's loop was fed."""

    def __init__(self, epochs: list[list[tuple[torch.Tensor, torch.Tensor]]]):
        self.epochs, self.batch_size, self.size = iter(epochs), 16, len(epochs[0])

    def __len__(self) -> int:
        return self.size

    def shuffle(self) -> None:
        return None  # the order is the recording's

    def epoch(self, generator, start_batch=0):
        assert generator is None and start_batch == 0
        yield from next(self.epochs)


def test_the_seed_run_and_a_default_run_share_data_split_and_initial_weights(seed_run):
    data, parts = synthetic(), split_indices(100, 0.2, 13)
    x_train, y_train = data.x[parts.train], data.y[parts.train]
    x_seen = torch.cat([x for x, _ in seed_run.train_batches[0]])
    y_seen = torch.cat([y for _, y in seed_run.train_batches[0]])
    seen, ours = x_seen[:, 0].argsort(), x_train[:, 0].argsort()  # the same rows, in any order
    assert torch.equal(x_seen[seen], x_train[ours]) and torch.equal(y_seen[seen], y_train[ours])
    assert torch.equal(torch.cat([x for x, _ in seed_run.val_batches]), data.x[parts.val])
    assert torch.equal(torch.cat([y for _, y in seed_run.val_batches]), data.y[parts.val])
    initial = initial_model(ModelSpec("linear", 1, 1), 42).state
    assert initial.keys() == seed_run.initial.keys()
    assert all(torch.equal(initial[k], seed_run.initial[k]) for k in initial)


def test_on_the_seed_runs_batches_the_loop_computes_its_losses_and_weights_bit_for_bit(seed_run):
    train, val = Replay(seed_run.train_batches), Replay([seed_run.val_batches] * 200)
    loaders = Loaders(train=train, val=val, sample=seed_run.train_batches[0][0][0])
    initial = initial_model(ModelSpec("linear", 1, 1), 42)
    trained = train_model(initial, loaders, "sgd", 0.1, 0.0, 0.0, "mse", 200, CPU)
    assert trained.train_loss == seed_run.losses
    assert trained.val_loss == seed_run.val_losses
    assert all(torch.equal(trained.state[k], v) for k, v in seed_run.final.items())


@pytest.mark.parametrize("n", [1, 2, 5, 7, 8, 9, 16, 17, 129, 300])
def test_the_epoch_mean_is_numpys_mean_bit_for_bit(n):
    """The curves' means are the seed's np.mean over Python floats; below 8 values trainflow
    adds them itself. A numpy whose summation order changes fails here."""
    g = np.random.default_rng(n)
    for _ in range(200):
        # float32 losses, spread over magnitudes so that the order of the sum shows in the bits
        values = (g.random(n) * 10.0 ** g.integers(-18, 18, n)).astype(np.float32).tolist()
        assert seed_mean(values).hex() == np.mean(values).hex()
    assert math.isnan(seed_mean([1.0, math.nan])) and seed_mean([-0.0]).hex() == "0x0.0p+0"


def test_a_default_run_draws_its_own_batch_order_and_ends_near_the_seed_run(seed_run):
    """The seed's DataLoader(shuffle=True) draws each epoch's order from torch's global RNG;
    trainflow draws it from a generator of its own (--shuffle-seed), so the losses differ,
    and the final weights agree to within 5e-3."""
    trained, _ = _train(synthetic())
    assert trained.train_loss != seed_run.losses
    for key, value in seed_run.final.items():
        torch.testing.assert_close(trained.state[key], value, rtol=0, atol=5e-3)


def test_the_dataloader_path_trains_exactly_what_the_tensor_path_does():
    tensor, _ = _train(synthetic(), epochs=30)
    loader, _ = _train(synthetic(), epochs=30, kind="dataloader")
    assert tensor.train_loss == loader.train_loss and tensor.val_loss == loader.val_loss
    assert all(torch.equal(tensor.state[k], loader.state[k]) for k in tensor.state)


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
    trained, _ = _train(
        synthetic(), epochs=40, optimizer=optimizer, loss=loss, lr=0.05, model="mlp", hidden=(8,)
    )
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


# --- the train step against the seed's, step by step, bit for bit -------------------------


class _Model(torch.nn.Module):
    """An MLP with the parameters SGD.step treats specially: a frozen one (no grad at all)
    and one the forward pass never reaches (its grad stays None)."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.hidden = torch.nn.Parameter(torch.randn(3, 8, generator=g, dtype=dtype))
        self.out = torch.nn.Parameter(torch.randn(8, 1, generator=g, dtype=dtype))
        self.frozen = torch.nn.Parameter(
            torch.randn(8, generator=g, dtype=dtype), requires_grad=False
        )
        self.unused = torch.nn.Parameter(torch.randn(2, generator=g, dtype=dtype))

    def forward(self, x):
        return torch.tanh(x @ self.hidden + self.frozen) @ self.out


# Learning rates set between steps, as a schedule (#15) does: floats of every size, an int.
LRS = [0.1, 0.1, 0.05, 0.3, 1e-3, 7.0, 1, 0.1 / 3, 2.5e-7, 0.2]


def _seed_step_fn():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from seed_script import make_train_step_fn

    return make_train_step_fn


def _twins(dtype, steps, sgd_options, set_lr=None):
    """The same steps on two copies of a model: one through train-epochs' step function,
    one through the seed's `make_train_step_fn` as written (optimizer.step(), zero_grad())."""
    make_train_step_fn = _seed_step_fn()
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(16, 3, generator=g, dtype=dtype), torch.randn(16, 1, generator=g, dtype=dtype))
        for _ in range(steps)
    ]
    loss_fn = torch.nn.MSELoss()
    ours, seeds = _Model(dtype), _Model(dtype)
    params = [p for p in ours.parameters() if p.requires_grad]
    ours_opt = torch.optim.SGD(params, **sgd_options)
    seeds_opt = torch.optim.SGD([p for p in seeds.parameters() if p.requires_grad], **sgd_options)
    our_step = make_train_step(ours, loss_fn, ours_opt)
    seed_step = make_train_step_fn(seeds, loss_fn, seeds_opt)
    for i, (x, y) in enumerate(batches):
        if set_lr is not None:
            set_lr(ours_opt, i)
            set_lr(seeds_opt, i)
        assert our_step(x, y).item() == seed_step(x, y)
    return ours, seeds


def _set_lr(optimizer, i):
    optimizer.param_groups[0]["lr"] = LRS[i]


@pytest.fixture
def sgd_steps(monkeypatch):
    """Count SGD.step calls: each twin calls it once a step."""
    calls = []
    real = torch.optim.SGD.step

    def counted(self, *args, **kwargs):
        calls.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", counted)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "options",
    [{"lr": 0.1}, {"lr": 0.1, "foreach": False}, {"lr": 1}, {"lr": 3e-4}],
    ids=["lr", "foreach-false", "int-lr", "small-lr"],
)
@pytest.mark.parametrize("changing_lr", [False, True], ids=["fixed", "lr-set-each-step"])
def test_plain_sgd_steps_equal_the_seeds_bit_for_bit(sgd_steps, dtype, options, changing_lr):
    ours, seeds = _twins(dtype, len(LRS), options, _set_lr if changing_lr else None)
    assert len(sgd_steps) == 2 * len(LRS)  # both twins called SGD.step at every step
    for (name, a), b in zip(ours.named_parameters(), seeds.parameters(), strict=True):
        assert torch.equal(a, b), name
        assert a.grad is None and b.grad is None


@pytest.mark.parametrize(
    "options",
    [
        {"momentum": 0.9},
        {"weight_decay": 0.01},
        {"momentum": 0.5, "nesterov": True},
        {"maximize": True},
        {"dampening": 0.1},
        {"foreach": True},
        {"fused": True},
        {"lr": torch.tensor(0.1)},
    ],
    ids=[
        "momentum",
        "weight-decay",
        "nesterov",
        "maximize",
        "dampening",
        "foreach",
        "fused",
        "tensor-lr",
    ],
)
def test_every_sgd_option_steps_as_the_seeds(sgd_steps, options):
    ours, seeds = _twins(torch.float32, 6, {"lr": 0.1, **options})
    assert len(sgd_steps) == 12  # both twins called SGD.step at every step
    for a, b in zip(ours.parameters(), seeds.parameters(), strict=True):
        assert torch.equal(a, b)


def test_an_lr_schedule_steps_as_the_seeds_without_a_call_order_warning(sgd_steps):
    """A scheduler wraps optimizer.step to note the call (for its call-order warning): the
    step calls it, reads the scheduled lr at every step, and equals the seed's."""

    def scheduled(optimizer, i):  # a scheduler per twin, stepped after each step
        if i == 0:
            optimizer.schedule = torch.optim.lr_scheduler.StepLR(optimizer, 2, gamma=0.5)
        else:
            optimizer.schedule.step()

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()"
        ours, seeds = _twins(torch.float32, 7, {"lr": 0.1}, scheduled)
    assert len(sgd_steps) == 14
    for a, b in zip(ours.parameters(), seeds.parameters(), strict=True):
        assert torch.equal(a, b)


def test_the_optimizers_hooks_and_wrappers_run_at_every_step():
    """The step calls `optimizer.step()` as the seed does, so what a user hangs on it runs."""
    model = _Model(torch.float32)
    optimizer = torch.optim.SGD([model.hidden, model.out], lr=0.1)
    seen = []
    optimizer.register_step_pre_hook(lambda *args: seen.append("pre"))
    optimizer.register_step_post_hook(lambda *args: seen.append("post"))
    real = optimizer.step

    def wrapper(*args, **kwargs):
        seen.append("wrapper")
        return real(*args, **kwargs)

    optimizer.step = wrapper
    step = make_train_step(model, torch.nn.MSELoss(), optimizer)
    x, y = torch.randn(4, 3), torch.randn(4, 1)
    for _ in range(2):
        step(x, y)
    assert seen == ["wrapper", "pre", "post"] * 2


def _class_ids(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.randint(0, n, (16, 1), generator=g).float()


STEP_CASES = [  # (model spec, loss, targets): each model kind, each loss, two dtypes
    (ModelSpec("linear", 3, 1), "mse", lambda g: torch.randn(16, 1, generator=g)),
    (ModelSpec("mlp", 3, 2, (8, 8)), "mse", lambda g: torch.randn(16, 2, generator=g)),
    (ModelSpec("mlp", 3, 1, (8,)), "huber", lambda g: torch.randn(16, 1, generator=g)),
    (ModelSpec("linear", 3, 1), "l1", lambda g: torch.randn(16, 1, generator=g)),
    (ModelSpec("linear", 3, 1), "bce_with_logits", lambda g: torch.rand(16, 1, generator=g)),
    (ModelSpec("mlp", 3, 4, (8,)), "cross_entropy", lambda g: _class_ids(4, g)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", STEP_CASES, ids=lambda c: f"{c[0].name}-{c[1]}")
def test_each_model_and_loss_steps_as_the_seeds_bit_for_bit(case, dtype):
    """trainflow's models and losses through its step, against the seed's step function on
    the same model: the same loss at every step, and the same weights after."""
    spec, loss_name, targets = case
    g = torch.Generator().manual_seed(3)
    batches = [
        (torch.randn(16, 3, generator=g, dtype=dtype), targets(g).to(dtype)) for _ in range(5)
    ]
    initial = initial_model(spec, 7)
    ours, seeds = (instantiate(spec, initial.state).to(dtype) for _ in range(2))
    loss_fn = make_loss(loss_name)
    our_step = make_train_step(ours, loss_fn, torch.optim.SGD(ours.parameters(), lr=0.1))
    seed_step = _seed_step_fn()(seeds, loss_fn, torch.optim.SGD(seeds.parameters(), lr=0.1))
    for x, y in batches:
        loss = our_step(x, y)
        assert loss.dtype == dtype and not loss.requires_grad
        assert loss.item() == seed_step(x, y)
    for (name, a), b in zip(ours.named_parameters(), seeds.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_mse_is_mse_loss_bit_for_bit_and_broadcasts_as_it_does():
    g = torch.Generator().manual_seed(5)
    pred = torch.randn(33, 2, generator=g, requires_grad=True)
    y = torch.randn(33, 2, generator=g)
    ours, theirs = make_loss("mse")(pred, y), torch.nn.MSELoss()(pred, y)
    assert torch.equal(ours, theirs)
    (a,) = torch.autograd.grad(ours, pred)
    (b,) = torch.autograd.grad(theirs, pred)
    assert torch.equal(a, b)
    with pytest.warns(UserWarning, match="different to the input size"):
        broadcast = make_loss("mse")(pred[:, :1], y[:, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(broadcast, torch.nn.MSELoss()(pred[:, :1], y[:, 0]))
