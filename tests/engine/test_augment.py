"""Per-batch augmentation: torchvision's crop and flip, drawn from (seed, epoch, batch) alone."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from trainflow.tasks.engine.augment import (
    AUGMENTATIONS,
    BatchAugment,
    batch_generator,
    batch_seed,
    built_in,
    compose,
    horizontal_flip,
    random_crop,
)


def _images(shape, dtype=torch.uint8, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.rand(shape, generator=g).to(dtype)
    return torch.randint(1, 200, shape, generator=g).to(dtype)


def _crop_reference(x, padding, g):
    # Draws in the order random_crop documents: N row offsets, then N column offsets.
    n, (h, w) = x.shape[0], x.shape[-2:]
    rows = torch.randint(2 * padding + 1, (n,), generator=g)
    cols = torch.randint(2 * padding + 1, (n,), generator=g)
    out = []
    for i in range(n):
        padded = F.pad(x[i], (padding, padding, padding, padding))
        r, c = int(rows[i]), int(cols[i])
        out.append(padded[..., r : r + h, c : c + w])
    return torch.stack(out)


@pytest.mark.parametrize(
    ("shape", "padding"),
    [
        ((16, 3, 7, 9), 1),
        ((16, 3, 8, 8), 4),
        ((12, 6, 5), 2),
        ((8, 2, 3, 4, 4), 3),
        ((8, 1, 3, 3), 5),
    ],
)
def test_crop_equals_a_per_sample_loop_over_the_drawn_offsets(shape, padding):
    x = _images(shape)
    out = random_crop(padding)(x, batch_generator(5, 1, 2))
    assert torch.equal(out, _crop_reference(x, padding, batch_generator(5, 1, 2)))


def test_crop_takes_values_from_the_sample_itself_or_zero():
    x = torch.arange(1, 32 * 3 * 6 * 6 + 1).view(32, 3, 6, 6)
    out = random_crop(3)(x, batch_generator(0, 0, 0))
    for i in range(32):
        assert torch.isin(out[i], torch.cat([x[i].flatten(), torch.zeros(1, dtype=x.dtype)])).all()
    assert (out == 0).any() and (out != 0).any()


def test_crop_with_padding_zero_is_the_identity_and_a_new_tensor():
    x = _images((4, 3, 5, 5))
    out = random_crop(0)(x, batch_generator(0, 0, 0))
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()


def test_crop_offsets_cover_every_position_about_evenly():
    padding, size, n = 2, 9, 5000
    positions = 2 * padding + 1
    # Each pixel holds its own index: where the centre pixel lands gives the drawn offset.
    x = torch.arange(size * size).view(1, size, size).expand(n, size, size)
    out = random_crop(padding)(x, batch_generator(3, 0, 0))
    centre = (size // 2) * size + size // 2
    at = (out == centre).flatten(1).float().argmax(1)
    assert ((out == centre).flatten(1).sum(1) == 1).all()
    counts = torch.bincount(at, minlength=size * size).view(size, size)
    lo, hi = size // 2 - padding, size // 2 + padding + 1
    assert counts.sum() == counts[lo:hi, lo:hi].sum()  # nowhere else
    expected = n / positions**2
    assert counts[lo:hi, lo:hi].min() > 0.6 * expected
    assert counts[lo:hi, lo:hi].max() < 1.4 * expected


def test_flip_flips_exactly_the_drawn_samples_along_w():
    x = _images((64, 3, 4, 6))
    out = horizontal_flip(0.5)(x, batch_generator(1, 2, 3))
    drawn = torch.rand((64,), generator=batch_generator(1, 2, 3)) < 0.5
    assert drawn.any() and not drawn.all()
    for i in range(64):
        assert torch.equal(out[i], x[i].flip(-1) if drawn[i] else x[i])


def test_flip_with_p_zero_is_the_identity_and_with_p_one_flips_all():
    x = _images((32, 2, 5, 7))
    assert torch.equal(horizontal_flip(0.0)(x, batch_generator(0, 0, 0)), x)
    assert torch.equal(horizontal_flip(1.0)(x, batch_generator(0, 0, 0)), x.flip(-1))


def test_compose_draws_on_from_the_same_generator():
    x = _images((16, 3, 8, 8))
    out = compose([random_crop(2), horizontal_flip()])(x, batch_generator(9, 0, 4))
    g = batch_generator(9, 0, 4)
    assert torch.equal(out, horizontal_flip()(random_crop(2)(x, g), g))
    assert torch.equal(compose([])(x, g), x)


def _augment(seed=7, rank=0):
    return BatchAugment(compose(built_in(AUGMENTATIONS)), seed, rank=rank)


def test_a_resumed_batch_draws_what_the_uninterrupted_run_drew():
    xs = [_images((32, 3, 8, 8), seed=b) for b in range(6)]
    augment = _augment()
    in_order = [augment(x, 2, b) for b, x in enumerate(xs)]
    torch.manual_seed(1234)  # the global generator plays no part
    assert torch.equal(_augment()(xs[3], 2, 3), in_order[3])


def test_another_batch_epoch_rank_or_seed_draws_differently():
    x = _images((32, 3, 8, 8))
    out = _augment()(x, 2, 3)
    for other in (
        _augment()(x, 2, 4),
        _augment()(x, 3, 3),
        _augment(rank=1)(x, 2, 3),
        _augment(seed=8)(x, 2, 3),
    ):
        assert not torch.equal(out, other)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.bfloat16, torch.int64])
def test_the_input_is_left_alone_and_dtype_and_shape_kept(dtype):
    data = _images((40, 3, 6, 6), dtype)
    before = data.clone()
    x = data[8:24]  # a view into the cached training tensor
    out = _augment()(x, 0, 0)
    assert torch.equal(data, before)
    assert out.dtype == dtype and out.shape == x.shape


def test_grayscale_batches_without_a_channel_axis_work():
    x = _images((16, 8, 8))
    out = _augment()(x, 1, 1)
    g = batch_generator(7, 1, 1)
    assert torch.equal(out, horizontal_flip()(_crop_reference(x, 4, g), g))


def test_a_channels_last_batch_gives_the_contiguous_result():
    x = _images((16, 3, 8, 8))
    out = _augment()(x.contiguous(memory_format=torch.channels_last), 0, 5)
    assert torch.equal(out, _augment()(x, 0, 5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_draws_what_the_cpu_draws():
    x = _images((64, 3, 16, 16))
    assert torch.equal(_augment()(x.cuda(), 4, 2).cpu(), _augment()(x, 4, 2))


def test_batch_seed_is_pinned_because_checkpoints_resume_through_it():
    assert batch_seed(0, 0, 0, 0) == 1195769770526638388
    assert batch_seed(42, 3, 17, 1) == 1575716957797294494
    assert batch_seed(42, 3, 17) == batch_seed(42, 3, 17, 0)


def test_batch_seeds_are_distinct_and_63_bit():
    values = range(-1, 5)
    seeds = {batch_seed(*four) for four in itertools.product(values, repeat=4)}
    assert len(seeds) == len(values) ** 4
    assert all(0 <= s < 2**63 for s in seeds)


def test_an_unknown_augmentation_is_named():
    with pytest.raises(ValueError, match="'blur'"):
        built_in(["flip", "blur"])


def test_a_batch_that_is_not_images_is_refused():
    x = torch.zeros(8, 5)
    with pytest.raises(ValueError, match="at least 3-D"):
        _augment()(x, 0, 0)
    for transform in built_in(AUGMENTATIONS):
        with pytest.raises(ValueError, match="at least 3-D"):
            transform(x, batch_generator(0, 0, 0))
