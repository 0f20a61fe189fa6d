"""VGG-style CIFAR networks of the paper (docs/paper.md §3, Tables 2 and 3).

Every 3×3 convolution (padding 1, no bias: the BatchNorm after it has its own shift) is
followed by BatchNorm2d + ReLU; "M" is a 2×2 max-pool halving the resolution. Three pools
take a 32×32 input to 4×4, so the classifier sees C_last·4·4 features. Every hidden linear
layer is followed by BatchNorm1d + ReLU; the last linear layer gives the logits.

    VGG-9:  conv 64, 64, M, 128, 128, M, 256, 256, 256, M → linear 4096→256→classes
    VGG-BC: conv 128, 128, M, 256, 256, M, 512, 512, M    → linear 8192→1024→1024→classes

Binary activations (``activations="binary"``) follow BinaryNet (Hubara et al. 2016): every
convolution but the first reads sign(x) of the previous block's output, which is
conv → BN (→ max-pool) with no ReLU, since a ReLU before the sign would make every activation
+1. The max-pool comes before the sign, as in BinaryNet and XNOR-Net, so the maximum is taken
over real values (the max of ±1 values is almost always +1); BatchNorm stays right after the
convolution, which commutes with the max-pool wherever its scale γ is positive. The last
convolution keeps its ReLU: it feeds the full-precision classifier, not a quantized layer.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .activations import BinaryActivation, check_activations
from .registry import register_model, scaled

FEATURE_SIDE = 4  # 32×32 input after three 2×2 pools

VGG9_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M")
VGG9_HIDDEN = (256,)
VGG_BC_LAYERS = (128, 128, "M", 256, 256, "M", 512, 512, "M")
VGG_BC_HIDDEN = (1024, 1024)


def conv_bn_relu(
    in_channels: int, out_channels: int, *, sign_input: bool = False, relu: bool = True
) -> nn.Sequential:
    """[sign,] 3×3 same-padding conv, BatchNorm2d[, ReLU]: [B, C_in, H, W] → [B, C_out, H, W].

    The default is the paper's conv → BN → ReLU; a binary-activation network passes
    ``sign_input=True`` (the conv reads sign(x)) and ``relu=False`` where a sign follows.
    """
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    named = OrderedDict((str(i), layer) for i, layer in enumerate(layers))
    if sign_input:
        # named, not numbered: parameter names stay those of the float network
        named = OrderedDict([("sign", BinaryActivation()), *named.items()])
    return nn.Sequential(named)


def conv_stack(layers: tuple, in_channels: int, width: float, activations: str) -> list[nn.Module]:
    """The feature blocks for `layers` (channel counts and "M" pools), width-scaled.

    With ``activations="binary"`` every conv but the first reads sign(x) and every conv whose
    output reaches a sign drops its ReLU (see the module docstring).
    """
    binary = check_activations(activations) == "binary"
    convs = [i for i, spec in enumerate(layers) if spec != "M"]
    blocks: list[nn.Module] = []
    channels = in_channels
    for i, spec in enumerate(layers):
        if spec == "M":
            blocks.append(nn.MaxPool2d(2))
            continue
        out = scaled(spec, width)
        first, last = i == convs[0], i == convs[-1]
        blocks.append(
            conv_bn_relu(channels, out, sign_input=binary and not first, relu=not binary or last)
        )
        channels = out
    return blocks


class VGG(nn.Module):
    """Conv/BN/ReLU feature stack with max-pools, then an MLP classifier with BN + ReLU."""

    def __init__(
        self,
        layers: tuple,
        hidden: tuple[int, ...],
        num_classes: int,
        width: float,
        in_channels: int,
        activations: str = "float",
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(*conv_stack(layers, in_channels, width, activations))
        channels = scaled(next(s for s in reversed(layers) if s != "M"), width)
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


@register_model("vgg9", binary_activations=True)
def vgg9(num_classes: int, width: float, in_channels: int, activations: str = "float") -> nn.Module:
    """VGG-9 for CIFAR: 7 conv (64-64-128-128-256-256-256) + 2 linear (4096→256→classes)."""
    return VGG(VGG9_LAYERS, VGG9_HIDDEN, num_classes, width, in_channels, activations)


@register_model("vgg_bc", binary_activations=True)
def vgg_bc(
    num_classes: int, width: float, in_channels: int, activations: str = "float"
) -> nn.Module:
    """VGG-BC (BinaryConnect's net): 6 conv (128…512) + 3 linear (8192→1024→1024→classes)."""
    return VGG(VGG_BC_LAYERS, VGG_BC_HIDDEN, num_classes, width, in_channels, activations)
