"""Random but learnable images for fast tests: class prototypes plus Gaussian pixel noise.

Class k has a prototype P_k with pixels uniform in 0..255; an image of class k is
clip(round(P_k + σ·ε), 0, 255) with ε ~ N(0, 1) per pixel. With the default σ = 64 the
classes overlap in single pixels but are separable from whole images, so a small model
learns them within a few epochs. Everything is drawn from one seeded `torch.Generator`.
"""

from __future__ import annotations

import torch

from qtrain.base.errors import UserError

from .arrays import ArrayDataset, DataSplits, channel_stats


def _sample(
    prototypes: torch.Tensor, count: int, noise: float, generator: torch.Generator
) -> ArrayDataset:
    classes = prototypes.shape[0]
    labels = torch.arange(count) % classes
    labels = labels[torch.randperm(count, generator=generator)]
    base = prototypes[labels]
    pixels = base + noise * torch.randn(base.shape, generator=generator)
    return ArrayDataset(pixels.round().clamp(0, 255).to(torch.uint8), labels)


def make_synthetic(
    num_train: int = 512,
    num_test: int = 128,
    num_classes: int = 4,
    in_channels: int = 3,
    image_size: int = 8,
    noise: float = 64.0,
    seed: int = 0,
) -> DataSplits:
    """A synthetic train/test pair of shape [N, in_channels, image_size, image_size]."""
    for label, value in (
        ("num_train", num_train),
        ("num_test", num_test),
        ("num_classes", num_classes),
        ("in_channels", in_channels),
        ("image_size", image_size),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"synthetic data needs {label} >= 1 (an integer), got {value!r}")
    generator = torch.Generator().manual_seed(seed)
    shape = (num_classes, in_channels, image_size, image_size)
    prototypes = torch.randint(0, 256, shape, generator=generator).float()
    train = _sample(prototypes, num_train, noise, generator)
    test = _sample(prototypes, num_test, noise, generator)
    mean, std = channel_stats(train.images)
    return DataSplits(
        train=train,
        test=test,
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        mean=mean,
        std=std,
        augment=False,
        name="synthetic",
        class_names=[f"class {k}" for k in range(num_classes)],
    )
