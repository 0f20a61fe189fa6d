"""Binary activations for fully binary networks (BinaryNet, Hubara et al. 2016; docs/paper.md §6).

Forward, the sign with qtrain's tie rule (the same as Q_d on the binary grid {−1, +1}):

    sign(x) = +1 if x ≥ 0, −1 if x < 0

(`torch.sign` maps 0 to 0, which is not a binary value, so it is not used.) Backward, the
straight-through estimator clipped at |x| ≤ 1 (Hubara et al. 2016, eq. 4):

    ∂L/∂x = ∂L/∂sign(x) · 1_{|x| ≤ 1}

i.e. the gradient of the hard tanh clip(x, −1, 1): 1 inside the interval (its ends included),
0 outside, so units already saturated far from 0 stop receiving gradient.
"""

from __future__ import annotations

import torch
from torch import nn

from qtrain.base.names import unknown_name

ACTIVATIONS = ("float", "binary")


class _SignSTE(torch.autograd.Function):
    """sign(x) ∈ {−1, +1} forward; the clipped straight-through gradient backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        one = torch.ones((), dtype=x.dtype, device=x.device)
        return torch.where(x >= 0, one, -one)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)


def binary_sign(x: torch.Tensor) -> torch.Tensor:
    """sign(x) with sign(0) = +1 and the straight-through gradient 1_{|x| ≤ 1}; shape kept."""
    return _SignSTE.apply(x)


class BinaryActivation(nn.Module):
    """x ↦ sign(x) ∈ {−1, +1} (sign(0) = +1); backward ∂L/∂x = ∂L/∂y · 1_{|x| ≤ 1}.

    Placed right before a quantized convolution, it makes that convolution's input binary,
    so the layer computes a product of ±1 weights and ±1 activations (XNOR + popcount on
    hardware that has them).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[*] → [*] with values in {−1, +1}, same dtype."""
        return binary_sign(x)


def check_activations(activations: str) -> str:
    """`activations` itself, or a ValueError naming the valid choices."""
    if activations not in ACTIVATIONS:
        raise unknown_name("activations", activations, ACTIVATIONS)
    return activations
