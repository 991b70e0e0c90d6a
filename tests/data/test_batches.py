import itertools

import pytest
import torch

from trainflow.tasks.data.batches import make_loaders
from trainflow.tasks.data.splits import split_indices
from trainflow.tasks.data.tensors import Dataset

CPU = torch.device("cpu")


def _data(n: int = 37) -> Dataset:
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1)
    return Dataset(x, 2 * x, ("x",), ("y",))


def _loaders(kind: str, n: int = 37, batch_size: int = 8, seed: int = 3):
    data = _data(n)
    return make_loaders(data, split_indices(n, 0.2, 13), batch_size, seed, kind, 0, CPU)


def _rows(batches, generator, start_batch=0):
    return [x[:, 0].long().tolist() for x, _ in batches.epoch(generator, start_batch)]


def _epochs(batches, count):
    shuffle = batches.shuffle()
    return [_rows(batches, shuffle) for _ in range(count)]


def test_training_epoch_covers_each_training_row_once_with_a_partial_last_batch():
    parts = split_indices(37, 0.2, 13)
    loaders = _loaders("tensor")
    batches = _rows(loaders.train, loaders.train.shuffle())
    assert [len(b) for b in batches] == [8, 8, 8, 5]
    assert len(loaders.train) == 4
    assert sorted(itertools.chain.from_iterable(batches)) == sorted(parts.train.tolist())


def test_validation_is_in_split_order_and_unshuffled_every_epoch():
    parts = split_indices(37, 0.2, 13)
    loaders = _loaders("tensor")
    assert loaders.val.shuffle() is None
    assert list(itertools.chain.from_iterable(_rows(loaders.val, None))) == parts.val.tolist()
    assert _rows(loaders.val, None) == _rows(loaders.val, None)


def test_shuffle_is_seeded_and_changes_between_epochs():
    first, second = _epochs(_loaders("tensor").train, 2), _epochs(_loaders("tensor").train, 2)
    assert first == second
    assert first[0] != first[1]  # the generator moves on
    assert _epochs(_loaders("tensor", seed=4).train, 1) != first[:1]


@pytest.mark.parametrize("kind", ["tensor", "dataloader"])
def test_the_batches_keep_no_position_between_calls(kind):
    """A retried task gets the same Loaders object: whatever an earlier attempt read, a new
    generator from shuffle() replays the same epochs."""
    loaders = _loaders(kind)
    before = _epochs(loaders.train, 3)
    abandoned = loaders.train.epoch(loaders.train.shuffle(), 1)
    next(abandoned)  # an attempt that failed mid-epoch
    _epochs(loaders.train, 2)  # and one that trained two epochs
    assert _epochs(loaders.train, 3) == before


@pytest.mark.parametrize("kind", ["tensor", "dataloader"])
def test_an_order_needs_its_generator(kind):
    loaders = _loaders(kind)
    with pytest.raises(ValueError, match="the generator from shuffle"):
        next(loaders.train.epoch(None))
    with pytest.raises(ValueError, match="no generator"):
        next(loaders.val.epoch(torch.Generator()))


def test_targets_stay_paired_with_their_inputs():
    loaders = _loaders("tensor")
    for x, y in loaders.train.epoch(loaders.train.shuffle()):
        assert torch.equal(y, 2 * x)


@pytest.mark.parametrize("kind", ["tensor", "dataloader"])
def test_resume_mid_epoch_replays_the_same_remaining_batches(kind):
    loaders = _loaders(kind)
    shuffle = loaders.train.shuffle()
    _rows(loaders.train, shuffle)  # move past epoch 0
    state = shuffle.get_state()
    full_epoch = _rows(loaders.train, shuffle)
    resumed = torch.Generator()
    resumed.set_state(state)
    assert _rows(loaders.train, resumed, start_batch=2) == full_epoch[2:]
    assert _rows(loaders.train, resumed) == _epochs(_loaders(kind).train, 3)[2]


def test_dataloader_path_visits_rows_in_the_same_order_as_the_tensor_path():
    assert _epochs(_loaders("tensor").train, 3) == _epochs(_loaders("dataloader").train, 3)
    assert _rows(_loaders("tensor").val, None) == _rows(_loaders("dataloader").val, None)


def test_sample_is_a_real_training_batch_on_the_cpu():
    loaders = _loaders("tensor", batch_size=8)
    assert loaders.sample.shape == (8, 1)
    assert loaders.sample.device == CPU


@pytest.mark.parametrize("rows", [0, 5, 16, 40, 81])
@pytest.mark.parametrize("start_batch", [0, 1, 3])
def test_tensor_batches_are_the_views_slicing_gives(rows, start_batch):
    """The batches split() makes: the same storage, offsets, shapes and strides as slicing
    batch by batch, from any batch on; an empty set has no batch at all."""
    from trainflow.tasks.data.batches import TensorBatches

    x = torch.arange(rows * 3, dtype=torch.float32).reshape(rows, 3)
    y = torch.arange(rows, dtype=torch.float32).reshape(rows, 1)
    got = list(TensorBatches(x, y, 16, seed=None).epoch(None, start_batch))
    starts = range(start_batch * 16, rows, 16)
    expected = [(x[s : s + 16], y[s : s + 16]) for s in starts]
    assert len(got) == len(expected)
    for (gx, gy), (ex, ey) in zip(got, expected, strict=True):
        for g, e in ((gx, ex), (gy, ey)):
            assert g.untyped_storage().data_ptr() == e.untyped_storage().data_ptr()
            assert (g.storage_offset(), g.shape, g.stride()) == (
                e.storage_offset(),
                e.shape,
                e.stride(),
            )
