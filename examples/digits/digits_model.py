"""A small CNN for images of any size, channel count and class count: the digits' model."""

from torch import nn


def build(spec) -> nn.Module:
    """Two padded 3×3 convolutions, 2×2 pooling, then a linear layer over the flattened maps."""
    channels, height, width = spec.input_shape
    return nn.Sequential(
        nn.Conv2d(channels, 16, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * (height // 2) * (width // 2), spec.n_outputs),
    )
