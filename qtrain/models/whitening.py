"""A patch-whitening first layer and its initialisation from training images.

Source: cifar10-airbench (Keller Jordan, 2024), after tysam-code's hlb-CIFAR10: the first layer
is a k×k convolution whose filters whiten the k×k patches of the training images.

With p ∈ ℝ^d (d = C·k·k) the patches of n normalised images at every position, the
(uncentred) patch covariance and its eigendecomposition are

    Σ = (1/n) Σ_i p_i p_iᵀ = V Λ Vᵀ,   Λ = diag(λ_1 ≥ … ≥ λ_d)

and the layer's 2d filters are

    W_j = v_j / √(λ_j + ε),   W_{d+j} = −W_j        (j = 1 … d, ε = 5·10⁻⁴ as in airbench)

so the first d output channels are z = (Λ + εI)^{-1/2} Vᵀ p, whose covariance over the
training patches is Λ(Λ + εI)^{-1} ≈ I: decorrelated and of unit variance (ZCA-like, in the
eigenbasis). The negated copy lets a following ReLU/GELU keep both signs of every component.

The filters are a buffer, not a parameter: the layer is frozen (as in airbench, where only the
bias trains), so no optimizer, and no quantization policy, ever touches them. That is why a
network with this layer keeps its first layer in float under every policy: its 2d·d weights
are a fixed linear change of basis of the input, which a sign would destroy. Without
whitening initialisation the filters keep their random (Kaiming-uniform) draw, so the layer is
a fixed random projection; the ablation of docs/speedrun.md compares the two.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from qtrain.base.errors import UserError

EPS = 5e-4  # airbench's ε: bounds the gain of the near-zero-variance directions


class PatchWhitening(nn.Module):
    """x [B, C, H, W] → conv2d(x, W, b) [B, 2·C·k², H−k+1, W−k+1] with frozen filters W.

    ``weight`` (a buffer) holds the filters [2d, C, k, k]; ``bias`` [2d] is trained.
    """

    def __init__(self, in_channels: int, kernel_size: int = 2) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.kernel_size = kernel_size
        d = in_channels * kernel_size * kernel_size
        self.out_channels = 2 * d
        weight = torch.empty(2 * d, in_channels, kernel_size, kernel_size)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # nn.Conv2d's default draw
        self.register_buffer("weight", weight)
        self.bias = nn.Parameter(torch.zeros(2 * d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight.to(x.dtype), self.bias.to(x.dtype))


def image_patches(images: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Every k×k patch of float [N, C, H, W] as rows: [N·(H−k+1)·(W−k+1), C·k·k]."""
    n, c = images.shape[:2]
    k = kernel_size
    cols = F.unfold(images, k)  # [N, C·k·k, L], patch elements in (c, i, j) order
    return cols.transpose(1, 2).reshape(-1, c * k * k)


def whitening_filters(patches: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """The 2d whitening filters [2d, d] of patches [n, d] (module docstring), in float64.

    Rows j < d are v_j/√(λ_j + ε) with λ in descending order; rows d + j are their negatives.
    """
    p = patches.to(torch.float64)
    covariance = p.T @ p / p.shape[0]  # [d, d]
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)
    scaled = eigenvectors.T / torch.sqrt(eigenvalues.clamp_min(0) + eps)[:, None]  # [d, d]
    return torch.cat([scaled, -scaled])


@torch.no_grad()
def whiten_(layer: PatchWhitening, images: torch.Tensor, eps: float = EPS) -> None:
    """Set ``layer``'s filters to the whitening filters of the patches of ``images``.

    ``images`` float [N, C, H, W] are what the layer will see (normalised training images).
    """
    if images.dim() != 4 or images.shape[1] != layer.in_channels:
        raise UserError(
            f"whitening needs images [N, {layer.in_channels}, H, W], got shape "
            f"{tuple(images.shape)}; pass the normalised training images the layer reads"
        )
    k = layer.kernel_size
    filters = whitening_filters(image_patches(images.float().cpu(), k), eps)
    layer.weight.copy_(filters.reshape(layer.weight.shape).to(layer.weight.dtype))


def whitening_layers(model: nn.Module) -> list[PatchWhitening]:
    """The model's `PatchWhitening` layers, in module order."""
    return [m for m in model.modules() if isinstance(m, PatchWhitening)]


def whiten_model_(model: nn.Module, images: torch.Tensor, eps: float = EPS) -> None:
    """`whiten_` the model's one whitening layer (its first layer) from ``images``.

    Only a layer that reads the input images can be whitened from them, so a model has at
    most one, its first layer; a model without one is refused with a sentence.
    """
    layers = whitening_layers(model)
    if not layers:
        raise UserError(
            f"{type(model).__name__} has no patch-whitening layer to initialise; use a model "
            "with one (speednet) or set whiten_init = false"
        )
    if len(layers) > 1:
        raise UserError(
            f"{type(model).__name__} has {len(layers)} patch-whitening layers, but only a "
            "first layer reads the images it would be whitened from; keep one"
        )
    whiten_(layers[0], images, eps)
