"""Per-batch training augmentation on the device, drawn from (seed, epoch, batch) so it resumes."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

AUGMENTATIONS = ("crop", "flip")

# (batch x, generator) -> a new batch of x's dtype and shape; draws only from the generator.
Transform = Callable[[Tensor, torch.Generator], Tensor]

_MASK64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def batch_seed(seed: int, epoch: int, batch: int, rank: int = 0) -> int:
    """A 63-bit seed mixed from the four ints (each taken modulo 2**64) by splitmix64 rounds.

    Checkpoints resume through this formula: changing it changes what a resumed run draws.
    """
    # Each round is a bijection of its input, so two seeds that differ only in their last
    # int never collide; any other pair does by chance alone.
    h = 0
    for value in (seed, epoch, batch, rank):
        h = _splitmix64(h ^ (value & _MASK64))
    return h >> 1


def batch_generator(seed: int, epoch: int, batch: int, rank: int = 0) -> torch.Generator:
    """A CPU generator for one batch: the same draws on every device, whatever came before."""
    return torch.Generator().manual_seed(batch_seed(seed, epoch, batch, rank))


def _check_images(x: Tensor) -> None:
    if x.dim() < 3:
        raise ValueError(
            f"augmentation needs a batch of images, N×…×H×W (at least 3-D); got shape "
            f"{tuple(x.shape)}"
        )


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    # A plain copy from pageable memory would make the host wait for the queued steps.
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _crop(x: Tensor, g: torch.Generator, padding: int) -> Tensor:
    _check_images(x)
    if padding == 0:
        return x.clone()
    n, (h, w) = x.shape[0], x.shape[-2:]
    hp, wp = h + 2 * padding, w + 2 * padding
    rows = torch.randint(2 * padding + 1, (n,), generator=g)
    cols = torch.randint(2 * padding + 1, (n,), generator=g)
    padded = x.new_zeros((*x.shape[:-2], hp, wp))
    padded[..., padding : padding + h, padding : padding + w] = x
    planes = math.prod(x.shape[1:-2])
    per_sample = planes * hp * wp
    # Every offset in the padded batch viewed as the start of a window (they overlap): taking
    # one window per sample is then a single index_select, which copies whole windows instead
    # of computing an index for every element as gather does.
    span = (planes - 1) * hp * wp + (h - 1) * wp + w
    windows = padded.as_strided(
        (max(n * per_sample - span + 1, 0), planes, h, w), (1, hp * wp, wp, 1)
    )
    starts = torch.arange(n) * per_sample + rows * wp + cols
    return windows.index_select(0, _to_device(starts, x.device)).view(x.shape)


def random_crop(padding: int) -> Transform:
    """torchvision's RandomCrop(size=(H, W), padding=padding) per sample: zero-pad H and W by
    `padding` on each side and take an H×W window at an offset drawn uniformly from the
    2 * padding + 1 positions per axis (draws: N row offsets, then N column offsets; none when
    padding is 0)."""
    if padding < 0:
        raise ValueError(f"crop padding must be at least 0, got {padding}")
    return partial(_crop, padding=padding)


def _flip(x: Tensor, g: torch.Generator, p: float) -> Tensor:
    _check_images(x)
    n = x.shape[0]
    flipped = torch.rand((n,), generator=g) < p
    # Both versions of every sample, then one index_select picks each sample's: a
    # per-sample torch.where is many times slower on the CPU.
    both = torch.cat([x, x.flip(-1)])
    pick = torch.arange(n) + n * flipped.long()
    return both.index_select(0, _to_device(pick, x.device))


def horizontal_flip(p: float = 0.5) -> Transform:
    """Per sample, flip the last axis (W) with probability p (draws: N uniforms)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"flip probability must be in [0, 1], got {p}")
    return partial(_flip, p=p)


def _compose(x: Tensor, g: torch.Generator, transforms: tuple[Transform, ...]) -> Tensor:
    if not transforms:
        return x.clone()
    for transform in transforms:
        x = transform(x, g)
    return x


def compose(transforms: Sequence[Transform]) -> Transform:
    """The transforms in order, drawing one after another from the same generator."""
    return partial(_compose, transforms=tuple(transforms))


def built_in(names: Sequence[str], padding: int = 4) -> list[Transform]:
    """The transforms for `names`, each one of AUGMENTATIONS, in the order given."""
    made = {"crop": lambda: random_crop(padding), "flip": horizontal_flip}
    unknown = [name for name in names if name not in made]
    if unknown:
        raise ValueError(
            f"unknown augmentation {unknown[0]!r}; choose from {', '.join(AUGMENTATIONS)}"
        )
    return [made[name]() for name in names]


@dataclass(frozen=True)
class BatchAugment:
    """The training loop's hook: `BatchAugment(transform, seed, rank=0)(x, epoch, batch)`.

    A batch's draws depend on (seed, epoch, batch, rank) alone, so a run resumed at
    (epoch, batch) augments exactly as an uninterrupted one; x itself is never modified.
    """

    transform: Transform
    seed: int
    rank: int = 0

    def __call__(self, x: Tensor, epoch: int, batch: int) -> Tensor:
        _check_images(x)
        return self.transform(x, batch_generator(self.seed, epoch, batch, self.rank))
