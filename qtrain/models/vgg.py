"""VGG-style CIFAR networks of the paper (docs/paper.md §3, Tables 2 and 3).

Every 3×3 convolution (padding 1, no bias: the BatchNorm after it has its own shift) is
followed by BatchNorm2d + ReLU; "M" is a 2×2 max-pool halving the resolution. Three pools
take a 32×32 input to 4×4, so the classifier sees C_last·4·4 features. Every hidden linear
layer is followed by BatchNorm1d + ReLU; the last linear layer gives the logits.

    VGG-9:  conv 64, 64, M, 128, 128, M, 256, 256, 256, M → linear 4096→256→classes
    VGG-BC: conv 128, 128, M, 256, 256, M, 512, 512, M    → linear 8192→1024→1024→classes
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import register_model, scaled

FEATURE_SIDE = 4  # 32×32 input after three 2×2 pools

VGG9_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M")
VGG9_HIDDEN = (256,)
VGG_BC_LAYERS = (128, 128, "M", 256, 256, "M", 512, 512, "M")
VGG_BC_HIDDEN = (1024, 1024)


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """3×3 same-padding convolution, BatchNorm2d, ReLU: [B, C_in, H, W] → [B, C_out, H, W]."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class VGG(nn.Module):
    """Conv/BN/ReLU feature stack with max-pools, then an MLP classifier with BN + ReLU."""

    def __init__(
        self,
        layers: tuple,
        hidden: tuple[int, ...],
        num_classes: int,
        width: float,
        in_channels: int,
    ) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        channels = in_channels
        for spec in layers:
            if spec == "M":
                blocks.append(nn.MaxPool2d(2))
            else:
                out = scaled(spec, width)
                blocks.append(conv_bn_relu(channels, out))
                channels = out
        self.features = nn.Sequential(*blocks)
        head: list[nn.Module] = []
        features = channels * FEATURE_SIDE * FEATURE_SIDE
        for size in hidden:
            out = scaled(size, width)
            head += [nn.Linear(features, out), nn.BatchNorm1d(out), nn.ReLU(inplace=True)]
            features = out
        head.append(nn.Linear(features, num_classes))
        self.classifier = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C_in, 32, 32] → logits [B, num_classes]."""
        return self.classifier(torch.flatten(self.features(x), 1))


@register_model("vgg9")
def vgg9(num_classes: int, width: float, in_channels: int) -> nn.Module:
    """VGG-9 for CIFAR: 7 conv (64-64-128-128-256-256-256) + 2 linear (4096→256→classes)."""
    return VGG(VGG9_LAYERS, VGG9_HIDDEN, num_classes, width, in_channels)


@register_model("vgg_bc")
def vgg_bc(num_classes: int, width: float, in_channels: int) -> nn.Module:
    """VGG-BC (BinaryConnect's net): 6 conv (128…512) + 3 linear (8192→1024→1024→classes)."""
    return VGG(VGG_BC_LAYERS, VGG_BC_HIDDEN, num_classes, width, in_channels)
