"""The two rounding functions of the paper: deterministic Q_d and stochastic Q_s.

Both work in units of Δ (u = w/Δ), pick a multiple m of the grid (see `grids`), and return
m·Δ. They preserve shape, dtype and device, and clip to a bounded grid's range [−MΔ, MΔ]
first. Arithmetic runs in float32 (float64 for float64 inputs), so half-precision weights round
exactly as their float32 values do.

Non-finite input, the same for every grid and both functions (and `fast_rounding`): NaN stays
NaN, so a diverged weight remains visible instead of landing on a level; ±∞ is clipped to the
end level ±MΔ of a bounded grid and stays ±∞ on the unbounded lattice.

These are projections that the training methods apply outside autograd; they carry no
gradient of their own.
"""

from __future__ import annotations

import torch

from qtrain.quant.grids import Grid, compute_dtype


def _units(w: torch.Tensor, grid: Grid) -> torch.Tensor:
    """u = clip(w, lo, hi)/Δ in the compute precision (a fresh tensor, safe to modify)."""
    u = w.to(compute_dtype(w.dtype)) / grid.delta
    if grid.bounded:
        u.clamp_(-grid.max_multiple, grid.max_multiple)
    return u


def round_nearest(w: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Deterministic rounding Q_d(w): the nearest level, ties away from zero.

    With u = clip(w)/Δ: m = sign(u)·(⌊|u| + ½⌋) on step-1 grids (ternary, lattice) and
    m = sign(u)·(2⌊|u|/2⌋ + 1) on the odd-multiple grids (binary, k-bit), where sign(0) = +1;
    m is clipped to [−M, M]. On the binary grid Q_d is sign(w)·Δ with sign(0) = +1, and Q_d is
    idempotent: Q_d(Q_d(w)) = Q_d(w). NaN stays NaN; ±∞ goes to ±MΔ (±∞ on the lattice).
    """
    u = _units(w, grid)
    if grid.kind == "binary":
        # NaN compares false both ways, so it keeps u (NaN) rather than becoming −1
        m = torch.where(u >= 0, 1.0, torch.where(u < 0, -1.0, u))
        return grid.from_multiples(m, w.dtype)
    negative = u < 0
    a = u.abs_()
    if grid.step == 1:
        m = a.add_(0.5).floor_()
    else:
        m = a.mul_(0.5).floor_().mul_(2.0).add_(1.0)
    if grid.bounded:
        m.clamp_(max=grid.max_multiple)
    # adding +0.0 turns −0.0 (from negating a zero level) into +0.0
    m = torch.where(negative, -m, m).add_(0.0)
    return grid.from_multiples(m, w.dtype)


def round_stochastic(
    w: torch.Tensor, grid: Grid, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Stochastic rounding Q_s(w), unbiased inside the grid's range.

    With lo the level at or below clip(w) and hi = lo + spacing: Q_s(w) = hi with probability
    p = (w − lo)/spacing, else lo. Hence E[Q_s(w)] = w and the per-coordinate variance is
    p(1 − p)·spacing² ≤ spacing·|w − w'| for any level w' (Lemma 1's bound).

    `generator` (on w's device) makes the draw reproducible; it advances by one uniform draw
    per element. NaN stays NaN; ±∞ goes to ±MΔ (±∞ on the lattice).
    """
    u = _units(w, grid)
    step = float(grid.step)
    # offset 1 on odd-multiple grids: lo = step·⌊(u − 1)/step⌋ + 1
    base = 0.0 if grid.step == 1 else 1.0
    t = u.sub_(base).div_(step)  # position in level units
    lo = torch.floor(t)
    r = torch.rand(t.shape, generator=generator, dtype=t.dtype, device=t.device)
    # t − lo is p; r < p rounds up. A value clipped to the top level has p = 0 and stays.
    m = lo.add_((r < t.sub_(lo)).to(t.dtype)).mul_(step).add_(base)
    return grid.from_multiples(m, w.dtype)


def quantize(
    w: torch.Tensor, grid: Grid, stochastic: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Q_s(w) when `stochastic`, else Q_d(w) (non-finite values as in the module docstring)."""
    return round_stochastic(w, grid, generator) if stochastic else round_nearest(w, grid)
