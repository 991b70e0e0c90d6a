import pytest
import torch
from torch.utils.data import random_split

from tasks.errors import InputError
from tasks.split import split_indices, split_sizes


@pytest.mark.parametrize(
    ("n", "val_fraction", "seed"), [(100, 0.2, 13), (10, 0.3, 0), (1000, 0.25, 7), (3, 0.5, 1)]
)
def test_split_matches_random_split(n, val_fraction, seed):
    parts = split_indices(n, val_fraction, seed)
    torch.manual_seed(seed)
    n_train = int(n * (1 - val_fraction) + 1e-9)
    ref_train, ref_val = random_split(range(n), [n_train, n - n_train])
    assert parts.train.tolist() == ref_train.indices
    assert parts.val.tolist() == ref_val.indices
    assert parts.train.dtype == parts.val.dtype == torch.int64


def test_seed_split_is_80_20():
    assert split_sizes(100, 0.2) == (80, 20)


def test_float_error_does_not_lose_a_row():
    assert split_sizes(10, 0.3) == (7, 3)  # 10 * 0.7 == 6.9999… in floating point


@pytest.mark.parametrize(("n", "val_fraction"), [(1, 0.2), (1, 0.5), (2, 0.99)])
def test_split_that_leaves_a_side_empty_is_an_input_error(n, val_fraction):
    with pytest.raises(InputError, match="--val-fraction"):
        split_indices(n, val_fraction, 0)


def test_split_leaves_global_rng_alone():
    before = torch.get_rng_state()
    split_indices(100, 0.2, 13)
    assert torch.equal(before, torch.get_rng_state())
