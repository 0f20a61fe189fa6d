"""Activation quantization: per-token absmax rounding to b-bit integers (BitNet b1.58's A8).

For an input x [..., K] (the last dimension holds one token's K features) and b bits:

    Qp  = 2^(b−1) − 1                                    127 for b = 8
    m   = max(max_j |x_j|, 1e−5)                         one per token
    s_x = Qp / m
    x̂   = clamp(round(s_x · x), −Qp − 1, Qp) / s_x        round half to even (torch.round)

so each token is stored as b-bit integers q ∈ {−Qp−1, …, Qp} and one float scale 1/s_x; a
token of zeros gives zeros (m is at least 1e−5), never NaN. The arithmetic is float32 whatever
the input's dtype, and x̂ is cast back to that dtype. The constants and the order of the
operations are those of transformers' BitNet layers (`transformers/integrations/bitnet.py`,
`ActQuant` and `BitLinear.activation_quant`), so a model exported to its `bitnet` format
computes the same x̂: in particular s_x is written `Qp / m` as there, which torch evaluates
as Qp · (1/m) (`Tensor.__rtruediv__` is a reciprocal and a product).

Gradient: straight-through, ∂L/∂x = ∂L/∂x̂ exactly (the backward is the identity, also where
the clamp saturates), as in BitNet and transformers' `ActQuant`.
"""

from __future__ import annotations

import torch

from qtrain.base.errors import UserError

ACT_BITS = tuple(range(2, 9))  # 8 is BitNet b1.58's A8
EPS = 1e-5  # the least m: a token of zeros is quantized to zeros


def check_act_bits(bits: object) -> int:
    """`bits` when it is a supported activation width (an int 2..8), else UserError."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in ACT_BITS:
        raise UserError(
            f"activation bits must be an integer from {ACT_BITS[0]} to {ACT_BITS[-1]} "
            f"(8 is BitNet b1.58's A8), got {bits!r}"
        )
    return bits


def absmax_quantize(x: torch.Tensor, bits: int) -> torch.Tensor:
    """x̂ of the module docstring: per-token (last dimension) absmax rounding to `bits` bits,
    computed in float32 and returned in x's dtype. No gradient rule of its own."""
    dtype = x.dtype
    x = x.float()
    qp = 2 ** (bits - 1) - 1
    scale = qp / x.abs().amax(dim=-1, keepdim=True).clamp(min=EPS)  # [..., 1]
    return ((x * scale).round().clamp(-qp - 1, qp) / scale).to(dtype)


class _StraightThrough(torch.autograd.Function):
    """x̂ forward, identity backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bits: int) -> torch.Tensor:
        return absmax_quantize(x, bits)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def quantize_activations(x: torch.Tensor, bits: int) -> torch.Tensor:
    """x̂ = absmax_quantize(x, bits) with the straight-through gradient ∂L/∂x = ∂L/∂x̂."""
    return _StraightThrough.apply(x, bits)
