"""In-memory image data sets: the whole split as one uint8 tensor.

Pixel values are kept as uint8 0..255 everywhere; normalisation happens per batch in the
loader, x = (pixel − mean) / std with mean and std per channel in the same 0..255 units.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qtrain.base.errors import UserError
from qtrain.base.names import unknown_name

from .augment import USUAL_AUGMENTATION, Augmentation
from .loader import BatchLoader

SPLITS = ("train", "test")


def check_split(split: str) -> str:
    """``split`` if it is one of SPLITS (every data set has the same two), else ValueError."""
    if split not in SPLITS:
        raise unknown_name("split", split, SPLITS)
    return split


@dataclass
class ArrayDataset:
    """``images`` uint8 [N, C, H, W] and ``labels`` int64 [N] of one split."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise UserError(
                f"images must be a uint8 tensor [N, C, H, W], got {self.images.dtype} "
                f"of shape {tuple(self.images.shape)}; convert the pixels to uint8 first"
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
            raise UserError(
                f"labels must be an int64 tensor [N] with N = {self.images.shape[0]}, got "
                f"{self.labels.dtype} of shape {tuple(self.labels.shape)}; pass one label per image"
            )

    def __len__(self) -> int:
        return self.images.shape[0]

    def take(self, indices: torch.Tensor) -> ArrayDataset:
        """The images and labels at ``indices`` (int64 [n]), in that order."""
        return ArrayDataset(self.images[indices], self.labels[indices])


@dataclass
class DataSplits:
    """A train/test pair plus what a model and loader need to know about it.

    ``mean`` and ``std`` are per channel in pixel units (0..255), computed on the training
    split. ``augment`` is the set's default for training-time augmentation (4-pixel padded
    random crop + horizontal flip).
    """

    train: ArrayDataset
    test: ArrayDataset
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool
    name: str
    class_names: list[str] | None = None

    def loader(
        self,
        split: str,
        batch_size: int,
        *,
        seed: int,
        device: torch.device | str = "cpu",
        augment: bool | None = None,
        augmentation: Augmentation = USUAL_AUGMENTATION,
        channels_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        local_world_size: int = 1,
    ) -> BatchLoader:
        """A `BatchLoader` of ``split``: "train" shuffles (and augments as ``augmentation``
        says unless ``augment`` is false or the set's default is off), "test" keeps the order
        and never augments.
        ``local_world_size`` is accepted for the common loader protocol; in-memory batches
        need no worker processes."""
        check_split(split)
        return BatchLoader(
            self.train if split == "train" else self.test,
            batch_size,
            mean=self.mean,
            std=self.std,
            train=split == "train",
            augment=self.augment if augment is None else augment,
            augmentation=augmentation,
            seed=seed,
            device=device,
            channels_last=channels_last,
            rank=rank,
            world_size=world_size,
        )


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 [N, C, H, W] in pixel units.

    Exact and fast: from the per-channel histogram h_c(v) of the 256 pixel values,
    mean_c = Σ v·h_c(v) / n and std_c = √(Σ v²·h_c(v) / n − mean_c²) in float64.
    """
    histograms = torch.stack(
        [torch.bincount(images[:, c].reshape(-1), minlength=256) for c in range(images.shape[1])]
    ).to(torch.float64)  # [C, 256]
    values = torch.arange(256, dtype=torch.float64)
    count = histograms.sum(1)
    mean = (histograms * values).sum(1) / count
    std = ((histograms * values.square()).sum(1) / count - mean.square()).clamp_min(0).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())
