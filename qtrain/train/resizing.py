"""Progressive resizing: the early epochs train on downscaled images, the last ones at full size.

With `resize_min_side` = s₀ and `resize_until` = u, epoch e (0-based) of a run of E epochs
trains on images of side

    s(e) = round(s₀ + (S − s₀) · min(1, e / (u·E)))

where S is the data set's side and E = total steps / steps per epoch (a fitted run's partial
last epoch counts as its fraction): s₀ in the first epoch, growing linearly to S by epoch u·E,
S from there on. Crop and flip happen at side S, then the batch is downscaled with bilinear
interpolation and antialiasing (each output pixel averages the input pixels it covers, so a
small image is a blurred large one rather than an aliased sample of it). Evaluation always
sees side S.

Why it saves work: a convolution's FLOPs scale with the pixels of its map, so an epoch at side
s costs about (s/S)² of one at S. The network's own floors make it a little less (speednet's
2×2 whitening without padding and its three 2×2 pools: side 24 costs 0.54 of side 32). What
it costs: early epochs learn from blurred images, the last ones (from u·E on) restore the
full detail the test set has. After fast.ai's DAWNBench entries (progressive resizing) and
FFCV's ResNet recipes (a linear ramp of the side over epochs).

The side is a pure function of (epoch, run length, config): a resumed run trains the sides an
uninterrupted one would, and a fitted run's first epoch is at s₀ whatever the fit chooses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def side_at(epoch: int, epochs: float, full_side: int, min_side: int | None, until: float) -> int:
    """s(e) of the module docstring; `full_side` when resizing is off (`min_side` None)."""
    if min_side is None or min_side >= full_side:
        return full_side
    ramp = until * epochs
    progress = 1.0 if ramp <= 0 else min(1.0, epoch / ramp)
    return round(min_side + (full_side - min_side) * progress)


def downscale(images: torch.Tensor, side: int) -> torch.Tensor:
    """Images [B, C, H, W] → [B, C, side, side], bilinear with antialiasing, in the input's
    memory layout; the input itself when it already has that side."""
    if images.shape[-2:] == (side, side):
        return images
    channels_last = images.is_contiguous(memory_format=torch.channels_last)
    small = F.interpolate(images, size=(side, side), mode="bilinear", antialias=True,
                          align_corners=False)  # fmt: skip
    return small.contiguous(memory_format=torch.channels_last) if channels_last else small
