"""Tiny networks for the demo and fast tests; any input size, any channel count.

tiny_cnn: conv3×3 32, conv3×3 32, max-pool 2, conv3×3 64 (each conv + BN + ReLU), global
average pool, linear 64→classes; binary activations are placed as in `vgg`. It trains on 8×8
digits in seconds per epoch on a CPU and also accepts 32×32 CIFAR images. tiny_mlp:
average-pool to 4×4, a 4×4 convolution to 64 channels (on a 4×4 input this is exactly a fully
connected layer; written as a conv so the paper's conv-only quantization policy applies to
it), BN, ReLU, linear 64→classes: the cheapest network with a quantizable layer, for fast
tests.
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import register_model, scaled
from .vgg import conv_stack

TINY_CNN_LAYERS = (32, 32, "M", 64)
MLP_GRID = 4  # inputs are average-pooled to 4×4 so the MLP works for every image size


class TinyCNN(nn.Module):
    """Three conv/BN/ReLU layers, one max-pool, global average pooling, one linear layer."""

    def __init__(
        self, num_classes: int, width: float, in_channels: int, activations: str = "float"
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *conv_stack(TINY_CNN_LAYERS, in_channels, width, activations),
            nn.AdaptiveAvgPool2d(1),
        )
        self.fc = nn.Linear(scaled(TINY_CNN_LAYERS[-1], width), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C_in, H, W] (H, W ≥ 2) → logits [B, num_classes]."""
        return self.fc(torch.flatten(self.features(x), 1))


class TinyMLP(nn.Module):
    """Average-pool to 4×4, then a one-hidden-layer perceptron with BatchNorm."""

    def __init__(self, num_classes: int, width: float, in_channels: int) -> None:
        super().__init__()
        hidden = scaled(64, width)
        self.hidden = nn.Sequential(
            nn.AdaptiveAvgPool2d(MLP_GRID),
            nn.Conv2d(in_channels, hidden, MLP_GRID, bias=False),  # [B, hidden, 1, 1]
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
        )
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C_in, H, W] → logits [B, num_classes]."""
        return self.fc(torch.flatten(self.hidden(x), 1))


@register_model("tiny_cnn", input_size=8, dataset="digits", binary_activations=True)
def tiny_cnn(
    num_classes: int, width: float, in_channels: int, activations: str = "float"
) -> nn.Module:
    """Tiny CNN for the demo: 3 conv (32-32-64) + global average pool + 1 linear, any input size."""
    return TinyCNN(num_classes, width, in_channels, activations)


@register_model("tiny_mlp", input_size=8, dataset="synthetic")
def tiny_mlp(num_classes: int, width: float, in_channels: int) -> nn.Module:
    """Tiny MLP for fast tests: pool to 4×4, dense 64 (as a 4×4 conv), BN, ReLU, linear."""
    return TinyMLP(num_classes, width, in_channels)
