"""Scales of quantized weights, read back from the weights themselves: one, or one per channel.

A scaled grid keeps a grid's multiples m and gives a weight a resolution Δ: one Δ for the whole
tensor (scale `he`, `absmean-tensor`, and `absmean` on a 1-D tensor), or one Δ_c per output
channel c (index 0 of the weight; `absmean` on a tensor with ≥ 2 dims): w[c, …] = m[c, …]·Δ_c.
Because the model holds the deployed weights, Δ can be recovered from them: on the binary grid
every |w| equals Δ, and on the ternary grid every nonzero one does. So Δ is taken as the
smallest nonzero |w| (of the tensor, or of channel c for Δ_c); on a k-bit grid that is Δ
whenever level ±Δ occurs, and any other choice that restores the weight exactly is as good
for storage. A weight (or channel) whose values are all zero has Δ = 0 (only on grids with a
zero level).

`scaled_codes` tries one Δ for the whole tensor first, then one per channel, and returns the
scales as a 1-D tensor: [1] for one scale, [C] for one per channel. A weight is restored as
(m·Δ) in float32 (float64 for float64 weights), cast to its dtype; codes are returned only
when that restores every element bit for bit.
"""

from __future__ import annotations

import torch

from qtrain.quant import Grid
from qtrain.quant.grids import compute_dtype


def scaled_codes(weight: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(codes [n] int64 in row-major order, Δ [1] or Δ_c [C]) of `weight` on `grid` scaled.

    One Δ when it restores the whole tensor exactly, else one Δ_c per output channel; None
    when neither does.
    """
    if weight.dim() == 0 or weight.numel() == 0:
        return None
    return _codes(weight, grid, rows=1) or _codes(weight, grid, rows=weight.shape[0])


def _codes(weight: torch.Tensor, grid: Grid, rows: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`scaled_codes` with one Δ per row of `weight` seen as [rows, n/rows]."""
    w = weight.detach().to(compute_dtype(weight.dtype)).reshape(rows, -1)
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
    """m·Δ_c per row c of `multiples` [C, …] (one Δ, scale [1], for all rows), computed in
    the compute precision, as `dtype`."""
    precision = compute_dtype(dtype)
    shape = (scale.numel(),) + (1,) * (multiples.dim() - 1)
    return (multiples.to(precision) * scale.to(precision).reshape(shape)).to(dtype)


def weight_from_codes(
    codes: torch.Tensor, scale: torch.Tensor, grid: Grid, shape: list[int], dtype: torch.dtype
) -> torch.Tensor:
    """The weight of `shape` whose channel c is (code·step − M)·Δ_c, with `scale` [C] or [1]."""
    multiples = codes.to(torch.int64) * grid.step - grid.max_multiple
    return restore(multiples.reshape(shape), scale, dtype)
