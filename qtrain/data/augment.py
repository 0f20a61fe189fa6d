"""Training-time augmentation of in-memory images: a padded random crop and a horizontal flip.

For a batch x (uint8 [B, C, H, W]) and an `Augmentation` (p, fill, flip):

    x_pad = x padded by p pixels on each side                  [B, C, H+2p, W+2p]
            (fill "zeros": zero pixels; "reflect": the image mirrored at its edge, without
            repeating the edge pixel, as `F.pad(mode="reflect")`)
    out[i, c, h, w] = x_pad[i, c, h + dy_i, w' + dx_i],  w' = W−1−w if flip_i else w

with crop offsets dy_i, dx_i uniform in {0, …, 2p} (a shift of at most p pixels each way), so
the crop and the flip are one `gather` over flat pixel indices. The flip of image n in epoch e:

    random       flip ~ Bernoulli(½), drawn afresh for every image in every epoch
    alternating  f_n XOR (e odd), with f_n ~ Bernoulli(½) drawn once per run

"alternating" is airbench's derandomised flip (Jordan 2024, "94% on CIFAR-10 in 3.29 seconds"):
any two consecutive epochs show every image once each way, where random flips show it the same
way in both with probability ½. The crop offsets stay random either way. airbench94 crops
with p = 2 and fill "reflect"; qtrain's default (p = 4, zeros, random) is the usual CIFAR
recipe's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qtrain.base.errors import UserError
from qtrain.base.names import unknown_name

FILLS = ("zeros", "reflect")
FLIPS = ("random", "alternating")


@dataclass(frozen=True)
class Augmentation:
    """How training images are cropped and flipped (module docstring)."""

    padding: int = 4
    fill: str = "zeros"
    flip: str = "random"

    def __post_init__(self) -> None:
        padding = self.padding
        if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise UserError(
                f"crop_padding must be a whole number of pixels >= 0 (0: no shift), got {padding!r}"
            )
        if self.fill not in FILLS:
            raise unknown_name("crop_fill", self.fill, FILLS)
        if self.flip not in FLIPS:
            raise unknown_name("flip", self.flip, FLIPS)

    def check_image(self, height: int, width: int) -> None:
        """A reflection is taken inside the image, so it needs p < H and p < W."""
        if self.fill == "reflect" and self.padding >= min(height, width):
            raise UserError(
                f"crop_fill 'reflect' mirrors the image inside its edge, so crop_padding "
                f"({self.padding}) must be smaller than its {height}×{width} pixels; lower "
                "crop_padding or use crop_fill 'zeros'"
            )


def draw_augmentation(
    size: int, padding: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Crop offsets dy, dx (int64 [size], uniform in 0..2·padding) and flips (bool [size])."""
    dy = torch.randint(0, 2 * padding + 1, (size,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (size,), generator=generator)
    flip = torch.rand(size, generator=generator) < 0.5
    return dy, dx, flip


def alternating_flips(first: torch.Tensor, epoch: int) -> torch.Tensor:
    """The flips of `epoch` under "alternating": `first` (bool, the run's f_n), inverted in
    odd epochs."""
    return first ^ bool(epoch % 2)


def crop_flip(
    images: torch.Tensor,
    dy: torch.Tensor,
    dx: torch.Tensor,
    flip: torch.Tensor,
    padding: int,
    fill: str = "zeros",
) -> torch.Tensor:
    """Padded crop and horizontal flip of uint8 [B, C, H, W], as one gather (module docstring).

    Image i is padded by ``padding`` pixels of ``fill`` on every side, cropped back to H×W at
    offset (dy_i, dx_i) of the padded image, and mirrored left-right where flip_i is true.
    """
    batch, channels, height, width = images.shape
    mode = "constant" if fill == "zeros" else "reflect"
    padded = F.pad(images, (padding,) * 4, mode=mode)  # [B, C, H+2p, W+2p]
    padded_width = width + 2 * padding
    columns = torch.arange(width, device=images.device)
    rows = dy[:, None] + torch.arange(height, device=images.device)  # [B, H]
    cols = dx[:, None] + torch.where(flip[:, None], columns.flip(0), columns)  # [B, W]
    flat = (rows[:, :, None] * padded_width + cols[:, None, :]).reshape(batch, 1, -1)
    picked = padded.reshape(batch, channels, -1).gather(2, flat.expand(-1, channels, -1))
    return picked.reshape(batch, channels, height, width)


# The usual CIFAR recipe's crop and flip, the default of every in-memory loader.
USUAL_AUGMENTATION = Augmentation()
