"""A validation split held out of the training images, and seeded samples of training images.

Honest protocol (docs/speedrun.md): settings are chosen on images the run never trains on,
and the test split is kept for the reported numbers. With N training images and n = val_images:

    perm  = a permutation of range(N) drawn from stream_generator(seed, "validation")
    val   = train[perm[:n]]                 (in that order)
    train = train[sort(perm[n:])]           (the rest, in their original order)

The draw depends only on (seed, N, n), so the same images are held out whatever else the run
changes (model, method, train_subset, which is drawn afterwards from what remains). The
per-channel mean and std of the data set stay those of all training images: 0..255 statistics
of 50,000 images move by well under a pixel level when 5,000 are left out.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from qtrain.base.errors import UserError
from qtrain.base.streams import stream_generator


def hold_out(splits, size: int, seed: int):
    """(``splits`` without ``size`` held-out training images, the held-out images).

    The second value is a split of the same kind as ``splits.train`` (it has ``take`` and a
    length); build its loader with `validation_loader`.
    """
    total = len(splits.train)
    if isinstance(size, bool) or not isinstance(size, int) or not 0 < size < total:
        raise UserError(
            f"val_images must be a whole number between 1 and {total - 1} (the data set has "
            f"{total} training images), got {size!r}; lower val_images"
        )
    perm = torch.randperm(total, generator=stream_generator(seed, "validation"))
    kept = perm[size:].sort().values
    return replace(splits, train=splits.train.take(kept)), splits.train.take(perm[:size])


def validation_loader(splits, held_out, batch_size: int, **options):
    """A loader of ``held_out`` that reads like the test split: in order, never augmented."""
    return replace(splits, test=held_out).loader("test", batch_size, **options)


def sample_images(splits, size: int, seed: int, stream: str):
    """``size`` training images (all if fewer) drawn by the run's random ``stream``."""
    total = len(splits.train)
    keep = torch.randperm(total, generator=stream_generator(seed, stream))[: min(size, total)]
    return splits.train.take(keep)
