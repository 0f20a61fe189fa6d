"""Test-time augmentation: the logits of a batch averaged over fixed views of each image.

With f the network in evaluation mode, flip(x) the left-right mirror and shift(x, d) the image
moved by d pixels along both axes (reflect-padded by one pixel, then cropped back):

| tta              | logits                                                              |
|------------------|---------------------------------------------------------------------|
| `none`           | f(x)                                                                |
| `flip`           | m(x) = ½·(f(x) + f(flip(x)))                                        |
| `flip-translate` | ½·m(x) + ¼·m(shift(x, −1)) + ¼·m(shift(x, +1))     (six views)       |

Source: cifar10-airbench's `infer` (tta_level 1 and 2; Keller Jordan 2024). `flip` logits are
the same for an image and its mirror; `flip-translate` costs six forward passes per image.
Only evaluation uses it; training batches are never averaged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qtrain.base.names import unknown_name

TTA_MODES = ("none", "flip", "flip-translate")


def check_tta(mode: str) -> str:
    """`mode` when it is one of TTA_MODES, else ValueError with a did-you-mean."""
    if mode not in TTA_MODES:
        raise unknown_name("tta", mode, TTA_MODES)
    return mode


def shift(x: torch.Tensor, d: int) -> torch.Tensor:
    """x [B, C, H, W] moved by d ∈ {−1, +1} pixels down and right (reflect padding)."""
    height, width = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")  # [B, C, H+2, W+2]
    start = 1 - d
    return padded[..., start : start + height, start : start + width]


def _mirror_mean(model, x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (model(x).float() + model(x.flip(-1)).float())


def tta_logits(model, x: torch.Tensor, mode: str = "none") -> torch.Tensor:
    """Logits [B, K] of x [B, C, H, W] under the views of `mode` (module docstring)."""
    check_tta(mode)
    if mode == "none":
        return model(x)
    mirrored = _mirror_mean(model, x)
    if mode == "flip":
        return mirrored
    moved = 0.5 * (_mirror_mean(model, shift(x, -1)) + _mirror_mean(model, shift(x, 1)))
    return 0.5 * mirrored + 0.5 * moved
