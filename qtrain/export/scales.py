"""Scales of quantized weights, read back from the weights themselves: one, or one per channel.

A scaled grid keeps a grid's multiples m and gives a weight a resolution: one scale for the
whole tensor (scale `he`, `absmean-tensor`, and `absmean` on a 1-D tensor), or one per output
channel c (index 0 of the weight; `absmean` on a tensor with ≥ 2 dims). Because the model holds
the deployed weights, the scale can be recovered from them, in one of two representations:

    multiples  w[c, …] = fl(m[c, …]·Δ_c)           Δ_c the smallest nonzero |w| of channel c
    levels     w[c, …] = fl(L(m[c, …])·s_c)        L(m) = fl(m·Δ_g), the grid's own levels

(fl: rounding to the compute precision, float32, or float64 for float64 weights; the result
is then cast to the weight's dtype). Training computes the second: `scaled_round` multiplies
the level L(m) that rounding produced by the scale s. On the binary grid every |w| equals
fl(Δ_g·s), and on the ternary grid every nonzero one does, so Δ = that value restores them as
multiples. On a k-bit grid fl(3·fl(Δ_g·s)) can differ from fl(fl(3·Δ_g)·s) by one ulp, so a
weight trained there may restore only as levels; then s_c is found from the channel's largest
|w| divided by its level, trying the float neighbours of that quotient until the restore is
bit-exact. As multiples, m is w/Δ_c rounded (the smallest nonzero |w| taken as multiple 1);
as levels, m is j·w/Δ_c rounded with j the first of 1, 1 + step, … ≤ M that restores the
channel (a 3-bit channel at levels 3, 5 and 7 only has j = 3). A weight (or channel) whose
values are all zero has scale 0 (only on grids with a zero level). float32 and float64
weights trained with a scale restore; a float16 or bfloat16 one may not (its final rounding
leaves s too loosely determined for a search near one quotient).

`scaled_codes` tries multiples before levels (so files that restore as multiples are written
as before), and within each one scale for the whole tensor before one per channel. It returns
the codes, the scales as a 1-D tensor ([1] for one, [C] for one per channel) and which
representation they multiply; codes are returned only when they restore every element bit for
bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qtrain.quant import Grid
from qtrain.quant.grids import compute_dtype

MULTIPLES, LEVELS = "multiples", "levels"  # what a scale multiplies
NEIGHBOURS = 4  # float steps tried on each side of the quotient |w|/L(m) (it is within two)


@dataclass(frozen=True)
class ScaledCodes:
    """Codes [n] int64 in row-major order, scale [1] or [C], and what the scale multiplies:
    the multiples m ("multiples") or the grid's levels L(m) ("levels")."""

    codes: torch.Tensor
    scale: torch.Tensor
    scale_of: str


def scaled_codes(weight: torch.Tensor, grid: Grid) -> ScaledCodes | None:
    """The codes and scales of `weight` on `grid` scaled (module doc); None when none restores
    it exactly."""
    if weight.dim() == 0 or weight.numel() == 0:
        return None
    for scale_of in (MULTIPLES, LEVELS):
        for rows in (1, weight.shape[0]):
            found = _codes(weight, grid, rows, scale_of)
            if found is not None:
                return found
    return None


def _codes(weight: torch.Tensor, grid: Grid, rows: int, scale_of: str) -> ScaledCodes | None:
    """`scaled_codes` with one scale per row of `weight` seen as [rows, n/rows]."""
    w = weight.detach().to(compute_dtype(weight.dtype)).reshape(rows, -1)
    magnitude = w.abs()
    smallest = torch.where(magnitude > 0, magnitude, torch.inf).amin(dim=1)
    smallest = torch.where(torch.isfinite(smallest), smallest, 0.0)
    target = weight.detach().reshape(rows, -1)
    if scale_of == MULTIPLES:
        multiples, valid = _multiples(w, smallest, 1, grid)
        scale = smallest
        if not bool(valid.all()):
            return None
        if not torch.equal(restore(multiples, scale, weight.dtype), target):
            return None
    else:
        found = _level_codes(w, smallest, target, grid)
        if found is None:
            return None
        multiples, scale = found
    codes = (multiples + grid.max_multiple) // grid.step
    return ScaledCodes(codes.reshape(-1), scale, scale_of)


def _multiples(
    w: torch.Tensor, smallest: torch.Tensor, j: int, grid: Grid
) -> tuple[torch.Tensor, torch.Tensor]:
    """(m, valid [rows]): m = j·w/(the row's smallest nonzero |w|) rounded, and whether every
    m of a row is a multiple of `grid`."""
    m = torch.round(j * w / torch.where(smallest > 0, smallest, 1.0)[:, None]).to(torch.int64)
    top = grid.max_multiple
    return m, ((m.abs() <= top) & ((m + top) % grid.step == 0)).all(dim=1)


def _level_codes(
    w: torch.Tensor, smallest: torch.Tensor, target: torch.Tensor, grid: Grid
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(m [rows, n], s [rows]) with fl(L(m)·s_r) equal to every element of row r of `target`,
    or None when some row has none.

    m is `_multiples` with j, the multiple of the row's smallest nonzero |w|, tried as 1, then
    1 + step, … up to M, the first j that restores a row taken. j matters even in a row of
    one magnitude (a channel at ±3 only): fl(L(1)·s′) misses some floats that fl(L(3)·s)
    reaches, because L(1) < 1 spreads the products of neighbouring s′ wider than the floats
    near them.
    """
    multiples = torch.zeros_like(target, dtype=torch.int64)
    scale = torch.full(smallest.shape, torch.nan, dtype=smallest.dtype)
    ratio = w.abs().amax(dim=1) / torch.where(smallest > 0, smallest, 1.0)
    for j in range(1, grid.max_multiple + 1, grid.step):
        if not bool((scale.isnan() & (j * ratio <= grid.max_multiple + 0.5)).any()):
            break  # every open row's largest m would pass M from this j on
        candidate, valid = _multiples(w, smallest, j, grid)
        rows = scale.isnan() & valid
        if bool(rows.any()):
            found = _search(candidate[rows], target[rows], grid)
            multiples[rows] = torch.where(found.isnan()[:, None], multiples[rows], candidate[rows])
            scale[rows] = found
        if not bool(scale.isnan().any()):
            break
    return None if bool(scale.isnan().any()) else (multiples, scale)


def _search(multiples: torch.Tensor, target: torch.Tensor, grid: Grid) -> torch.Tensor:
    """s [rows] with fl(L(m)·s_r) equal to row r of `target`, NaN where no s was found.

    The start is the quotient |w|/L(m) at each row's largest |m| (the largest |w|, whose
    relative rounding error is the smallest); the search steps it by one float at a time,
    alternately up and down, and keeps for each row the first value that restores it.
    """
    precision = compute_dtype(target.dtype)
    levels = grid.from_multiples(multiples, precision)
    top = multiples.abs().argmax(dim=1, keepdim=True)
    start = (target.to(precision).gather(1, top) / levels.gather(1, top)).abs().reshape(-1)
    start = torch.where(torch.isfinite(start), start, 0.0)  # a row of zeros: level 0 only
    scale = torch.full_like(start, torch.nan)
    up, down = start.clone(), start.clone()
    for step in range(2 * NEIGHBOURS + 1):
        if step % 2:
            up = torch.nextafter(up, torch.full_like(up, torch.inf))
            candidate = up
        elif step:
            down = torch.nextafter(down, torch.zeros_like(down))
            candidate = down
        else:
            candidate = start
        exact = (_scaled_levels(levels, candidate, target.dtype) == target).all(dim=1)
        scale = torch.where(exact & scale.isnan(), candidate, scale)
    return scale


def _scaled_levels(levels: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """L·s_r per row r of `levels` [R, …] (scale [R] or [1]), as `scaled_round` computes it,
    cast to `dtype`."""
    shape = (scale.numel(),) + (1,) * (levels.dim() - 1)
    return (levels * scale.to(levels.dtype).reshape(shape)).to(dtype)


def restore(multiples: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """m·Δ_c per row c of `multiples` [C, …] (one Δ, scale [1], for all rows), computed in
    the compute precision, as `dtype`."""
    return _scaled_levels(multiples.to(compute_dtype(dtype)), scale, dtype)


def weight_from_codes(
    codes: torch.Tensor,
    scale: torch.Tensor,
    grid: Grid,
    shape: list[int],
    dtype: torch.dtype,
    scale_of: str = MULTIPLES,
) -> torch.Tensor:
    """The weight of `shape` whose channel c is (code·step − M)·Δ_c, or with `scale_of`
    "levels" L(code·step − M)·s_c, with `scale` [C] or [1]."""
    multiples = (codes.to(torch.int64) * grid.step - grid.max_multiple).reshape(shape)
    if scale_of == MULTIPLES:
        return restore(multiples, scale, dtype)
    return _scaled_levels(grid.from_multiples(multiples, compute_dtype(dtype)), scale, dtype)
