from decimal import Decimal

import pytest
import torch
from torch.utils.data import random_split

from trainflow.tasks.data.splits import split_indices, split_sizes
from trainflow.tasks.errors import InputError


def _seed_sizes(n: int, ratio: str) -> tuple[int, int]:
    """The seed script's own arithmetic: `ratio = 0.8; n_train = int(n_total * ratio)`."""
    n_train = int(n * float(ratio))
    return n_train, n - n_train


def _val_fraction(ratio: str) -> float:
    """The --val-fraction a user gives for the seed's training ratio: 0.8 → 0.2."""
    return float(1 - Decimal(ratio))


@pytest.mark.parametrize(
    ("n", "ratio", "seed"),
    [
        (100, "0.8", 13),
        (10, "0.7", 0),
        (1000, "0.75", 7),
        (3, "0.5", 1),
        (10, "0.1", 3),
        (100, "0.29", 5),
    ],
)
def test_split_matches_random_split(n, ratio, seed):
    parts = split_indices(n, _val_fraction(ratio), seed)
    torch.manual_seed(seed)
    ref_train, ref_val = random_split(range(n), list(_seed_sizes(n, ratio)))
    assert parts.train.tolist() == ref_train.indices
    assert parts.val.tolist() == ref_val.indices
    assert parts.train.dtype == parts.val.dtype == torch.int64


def test_seed_split_is_80_20():
    assert split_sizes(100, 0.2) == (80, 20)


# Each case is one where `1 - val_fraction` in binary floats is not the decimal the seed
# writes, and truncating the product lands on the other side of an integer.
FLOAT_ERROR = [(10, "0.1"), (20, "0.1"), (100, "0.29"), (200, "0.29"), (100, "0.07")]


@pytest.mark.parametrize(("n", "ratio"), FLOAT_ERROR)
def test_float_error_gives_the_seed_s_sizes(n, ratio):
    val_fraction = _val_fraction(ratio)
    naive = int(n * (1 - val_fraction))
    assert naive != _seed_sizes(n, ratio)[0]  # the case really has float error
    assert split_sizes(n, val_fraction) == _seed_sizes(n, ratio)


def test_every_two_decimal_ratio_gives_the_seed_s_sizes():
    for ratio in (f"0.{k:02d}" for k in range(1, 100)):
        val_fraction = _val_fraction(ratio)
        for n in range(1, 1001):
            expected = _seed_sizes(n, ratio)
            if 0 in expected:
                continue  # refused, tested below
            assert split_sizes(n, val_fraction) == expected, (n, ratio)


@pytest.mark.parametrize(("n", "val_fraction"), [(1, 0.2), (1, 0.5), (2, 0.99), (10, 0.95)])
def test_split_that_leaves_a_side_empty_is_an_input_error(n, val_fraction):
    with pytest.raises(InputError, match="--val-fraction"):
        split_indices(n, val_fraction, 0)


def test_a_data_file_too_small_for_the_split_is_named():
    with pytest.raises(InputError) as error:
        split_sizes(1, 0.2, source="data/one.csv")
    assert str(error.value) == (
        "data file 'data/one.csv' has 1 row: --val-fraction 0.2 leaves the training split empty"
    )
    with pytest.raises(InputError, match=r"^--val-fraction 0\.5 leaves .* for 1 row$"):
        split_sizes(1, 0.5)


def test_split_leaves_global_rng_alone():
    before = torch.get_rng_state()
    split_indices(100, 0.2, 13)
    assert torch.equal(before, torch.get_rng_state())
