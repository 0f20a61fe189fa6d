"""Scaled grids: a per-layer or per-channel factor s in front of the grid (docs/paper.md §6).

A quantized weight with scale s lives on the scaled grid s·G = {s·l : l a level of G}, and is
computed as s·Q(x/s) (Q = Q_d or Q_s on G; one product, rounded once into the weight's dtype).
With the grid's default Δ (end levels ±1) the scaled end levels are ±s, so on the binary and
ternary grids s is exactly the level Δ:

| scale            | s                                          | as in                  |
|------------------|--------------------------------------------|------------------------|
| `none`           | 1                                          | the paper              |
| `he`             | √(2/fan_in), one constant per tensor       | McDonnell 2018         |
| `absmean`        | mean|w_r| over each output channel (dim 0) | XNOR-Net / BWN         |
|                  | of a tensor with ≥ 2 dims; over the whole  |                        |
|                  | of a 1-D one                               |                        |
| `absmean-tensor` | mean|w_r| over the whole tensor            | BitNet b1.58 (ternary) |

fan_in is the number of elements of one output channel (in_channels·k_h·k_w for a conv, 1 for
a 1-D tensor). A 1-D tensor (a bias, a norm's weight; quantized under the policy `all`) holds
one number per channel, so a per-channel absmean would be s_c = |w_c| and s_c·Q(w_c/s_c) = w_c:
the tensor would stay in full precision while listed as quantized. Per-channel scales
therefore apply to tensors with ≥ 2 dims only, and a 1-D tensor takes one scale, its mean|w_r|.

The absmean scales are measured from the latent weights w_r after every step, so they need a
method that keeps w_r (BC); methods without latent weights (SR, R, Bop, Bop2) take `none` or
`he`. With s = mean|w_r|, BitNet's w_b = γ·RoundClip(w_r/(γ + ε), −1, 1) is
s·Q_d(w_r/s) on the ternary grid; a zero scale (an all-zero channel) gives w_b = 0.

BC's clip box: with a fixed scale (`none`, `he`) w_r is clipped to the scaled grid's range
[−s·MΔ, s·MΔ], beyond which rounding no longer changes (the paper's reason to clip). An absmean
scale is measured from w_r itself, and clipping w_r to a range derived from it would pull every
|w_r| towards the mean at each step, so there w_r is clipped to the unscaled range [−MΔ, MΔ]
(BinaryConnect's ±1 box with the default Δ) and the scale follows w_r.
"""

from __future__ import annotations

import math

import torch

from qtrain.base.errors import UserError
from qtrain.base.names import unknown_name
from qtrain.quant import Grid, compute_dtype, round_nearest, round_stochastic

SCALES = ("none", "he", "absmean", "absmean-tensor")
MEASURED = ("absmean", "absmean-tensor")  # computed from the latent weights w_r
FIXED = ("none", "he")


def check_scale(scale: str, mode: str) -> str:
    """`scale` when `mode` can use it; ValueError naming the valid scales otherwise."""
    if scale not in SCALES:
        raise unknown_name("scale", scale, SCALES)
    if mode == "fp" and scale != "none":
        raise UserError(
            f"full-precision methods do not quantize, so scale {scale!r} has no effect; "
            "use scale='none'"
        )
    if mode not in ("bc", "fp") and scale in MEASURED:
        raise UserError(
            f"scale {scale!r} is measured from latent weights, which {mode} does not keep; "
            f"use one of {', '.join(FIXED)} (or a bc-* method)"
        )
    return scale


def fixed_scale(kind: str, p: torch.Tensor) -> torch.Tensor | None:
    """The constant scale of `kind` for parameter p (0-dim, compute dtype), None for measured."""
    dtype = compute_dtype(p.dtype)
    if kind == "none":
        return torch.ones((), dtype=dtype, device=p.device)
    if kind == "he":
        fan_in = p.numel() // p.shape[0] if p.dim() else 1
        return torch.full((), math.sqrt(2.0 / fan_in), dtype=dtype, device=p.device)
    return None


def measured_scale(kind: str, w_r: torch.Tensor) -> torch.Tensor:
    """mean|w_r| per output channel (shape (C,)) for `absmean` on a tensor with ≥ 2 dims, of
    the whole tensor (0-dim) for `absmean-tensor` and for 1-D tensors (module doc)."""
    return absmean(kind, w_r.to(compute_dtype(w_r.dtype)).abs())


def absmean(kind: str, a: torch.Tensor) -> torch.Tensor:
    """`measured_scale` from a = |w_r| already in the compute precision (a view will do)."""
    if kind == "absmean-tensor" or a.dim() < 2:
        return a.mean()
    return a.mean(dim=tuple(range(1, a.dim())))


def broadcastable(s: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """s shaped to broadcast over p: (C,) → (C, 1, …, 1); 0-dim stays."""
    return s.reshape(s.shape + (1,) * (p.dim() - s.dim())) if s.dim() else s


def scaled_round(
    x: torch.Tensor,
    s: torch.Tensor,
    grid: Grid,
    stochastic: bool,
    generator: torch.Generator | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """s·Q(x/s) in x's dtype (s broadcastable to x); a zero s gives 0.

    The result goes into `out` when given (x's shape and dtype; it may be x).
    """
    dtype = compute_dtype(x.dtype)
    s = s.to(dtype)
    work = out if out is not None and out.dtype == dtype else None
    u = torch.div(x.to(dtype), safe_divisor(s), out=work)
    q = round_stochastic(u, grid, generator, u) if stochastic else round_nearest(u, grid, u)
    if out is None:
        return (q * s).to(x.dtype)
    if work is None:
        return out.copy_(q * s)
    return torch.mul(q, s, out=out)


def safe_divisor(s: torch.Tensor) -> torch.Tensor:
    """max(s, tiny) in the compute precision: a zero scale would divide by zero, and the
    tiniest normal divisor sends x to an end level, which the product with s = 0 then zeroes."""
    dtype = compute_dtype(s.dtype)
    return s.to(dtype).clamp_min(torch.finfo(dtype).tiny)


def on_scaled_grid(w: torch.Tensor, s: torch.Tensor, grid: Grid) -> bool:
    """True when every element of w is exactly s·l for a level l of `grid` (as computed here)."""
    if not bool(torch.isfinite(w).all()):
        return False
    return torch.equal(scaled_round(w, s, grid, stochastic=False), w)
