import itertools

import pytest
import torch

from tasks.data import Dataset
from tasks.loaders import make_loaders
from tasks.split import split_indices

CPU = torch.device("cpu")


def _data(n: int = 37) -> Dataset:
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1)
    return Dataset(x, 2 * x, ("x",), ("y",))


def _loaders(kind: str, n: int = 37, batch_size: int = 8, seed: int = 3):
    data = _data(n)
    return make_loaders(data, split_indices(n, 0.2, 13), batch_size, seed, kind, 0, CPU)


def _rows(batches, start_batch=0):
    return [x[:, 0].long().tolist() for x, _ in batches.epoch(start_batch)]


def test_training_epoch_covers_each_training_row_once_with_a_partial_last_batch():
    parts = split_indices(37, 0.2, 13)
    loaders = _loaders("tensor")
    batches = _rows(loaders.train)
    assert [len(b) for b in batches] == [8, 8, 8, 5]
    assert len(loaders.train) == 4
    assert sorted(itertools.chain.from_iterable(batches)) == sorted(parts.train.tolist())


def test_validation_is_in_split_order_and_unshuffled_every_epoch():
    parts = split_indices(37, 0.2, 13)
    loaders = _loaders("tensor")
    assert list(itertools.chain.from_iterable(_rows(loaders.val))) == parts.val.tolist()
    assert _rows(loaders.val) == _rows(loaders.val)


def test_shuffle_is_seeded_and_changes_between_epochs():
    first, second = _loaders("tensor"), _loaders("tensor")
    epoch_one = _rows(first.train)
    assert epoch_one == _rows(second.train)
    assert _rows(first.train) != epoch_one  # the generator moves on


def test_targets_stay_paired_with_their_inputs():
    for x, y in _loaders("tensor").train.epoch():
        assert torch.equal(y, 2 * x)


@pytest.mark.parametrize("kind", ["tensor", "dataloader"])
def test_resume_mid_epoch_replays_the_same_remaining_batches(kind):
    loaders = _loaders(kind)
    _rows(loaders.train)  # move past epoch 0
    state = loaders.train.state_dict()
    full_epoch = _rows(loaders.train)
    loaders.train.load_state_dict(state)
    assert _rows(loaders.train, start_batch=2) == full_epoch[2:]
    assert _rows(loaders.train) == _rows(_advance(_loaders(kind), epochs=2).train)


def _advance(loaders, epochs):
    for _ in range(epochs):
        _rows(loaders.train)
    return loaders


def test_dataloader_path_visits_rows_in_the_same_order_as_the_tensor_path():
    tensor, loader = _loaders("tensor"), _loaders("dataloader")
    for _ in range(3):
        assert _rows(tensor.train) == _rows(loader.train)
    assert _rows(tensor.val) == _rows(loader.val)


def test_sample_is_a_real_training_batch_on_the_cpu():
    loaders = _loaders("tensor", batch_size=8)
    assert loaders.sample.shape == (8, 1)
    assert loaders.sample.device == CPU
