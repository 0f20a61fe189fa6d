"""Per-output-channel scales of quantized weights, read back from the weights themselves.

A scaled grid keeps a grid's multiples m and gives every output channel c (index 0 of the
weight) its own resolution Δ_c: w[c, …] = m[c, …]·Δ_c. Because the model holds the deployed
weights, Δ_c can be recovered from them: on the binary grid every |w[c, …]| equals Δ_c, and on the
ternary grid every nonzero one does. So Δ_c is taken as the smallest nonzero |w[c, …]|; on a
k-bit grid that is Δ_c whenever level ±Δ_c occurs in the channel, and any other choice that
restores the channel exactly is as good for storage. A channel whose weights are all zero has
Δ_c = 0 (only on grids with a zero level).

A weight is restored as (m·Δ_c) in float32 (float64 for float64 weights), cast to its dtype;
`channel_codes` returns codes only when that restores every element bit for bit.
"""

from __future__ import annotations

import torch

from qtrain.quant import Grid
from qtrain.quant.grids import compute_dtype


def channel_codes(weight: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(codes [n] int64 in row-major order, Δ [C]) of `weight` on `grid` scaled per channel.

    None when Δ_c = the smallest nonzero |w[c, …]| does not restore every channel exactly.
    """
    if weight.dim() == 0 or weight.numel() == 0:
        return None
    w = weight.detach().to(compute_dtype(weight.dtype)).reshape(weight.shape[0], -1)
    magnitude = w.abs()
    smallest = torch.where(magnitude > 0, magnitude, torch.inf).amin(dim=1)
    scale = torch.where(torch.isfinite(smallest), smallest, 0.0)
    multiples = torch.round(w / torch.where(scale > 0, scale, 1.0)[:, None]).to(torch.int64)
    top = grid.max_multiple
    valid = (multiples.abs() <= top) & ((multiples + top) % grid.step == 0)
    if not bool(valid.all()):
        return None
    restored = restore(multiples, scale, weight.dtype)
    if not torch.equal(restored, weight.detach().reshape(restored.shape)):
        return None
    return ((multiples + top) // grid.step).reshape(-1), scale


def restore(multiples: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """m·Δ_c per row c of `multiples` [C, …], computed in the compute precision, as `dtype`."""
    precision = compute_dtype(dtype)
    shape = (scale.numel(),) + (1,) * (multiples.dim() - 1)
    return (multiples.to(precision) * scale.to(precision).reshape(shape)).to(dtype)


def weight_from_codes(
    codes: torch.Tensor, scale: torch.Tensor, grid: Grid, shape: list[int], dtype: torch.dtype
) -> torch.Tensor:
    """The weight of `shape` whose channel c is (code·step − M)·Δ_c."""
    multiples = codes.to(torch.int64) * grid.step - grid.max_multiple
    return restore(multiples.reshape(shape), scale, dtype)
