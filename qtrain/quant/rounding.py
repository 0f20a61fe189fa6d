"""The two rounding functions of the paper: deterministic Q_d and stochastic Q_s.

Both work in units of Δ (u = w/Δ), pick a multiple m of the grid (see `grids`), and return
m·Δ. They preserve shape, dtype and device, and clip to a bounded grid's range [−MΔ, MΔ]
first. Arithmetic runs in float32 (float64 for float64 inputs), so half-precision weights round
exactly as their float32 values do.

Non-finite input, the same for every grid and both functions: NaN stays NaN, so a diverged
weight remains visible instead of landing on a level; ±∞ is clipped to the end level ±MΔ of a
bounded grid and stays ±∞ on the unbounded lattice.

Both take `out=` (w's shape and dtype; it may be w itself) and then work in it, and `work=`, a
scratch tensor of w's shape in the compute precision used instead of a fresh one, because on
small networks a training step is short and every fresh tensor and extra elementwise pass over
the quantized weights shows in it. The binary and ternary grids have shorter formulas whose
results equal the general ones bit for bit (tests/test_fast_paths.py checks them).

These are projections that the training methods apply outside autograd; they carry no
gradient of their own.
"""

from __future__ import annotations

import torch

from qtrain.base.errors import UserError
from qtrain.quant.grids import Grid, compute_dtype


def units(w: torch.Tensor, grid: Grid, out: torch.Tensor | None = None) -> torch.Tensor:
    """u = clip(w/Δ, −M, M) in the compute precision: in `out` when it has that dtype (it may
    be w), else in a fresh tensor that is safe to modify."""
    dtype = compute_dtype(w.dtype)
    u = out if out is not None and out.dtype == dtype else None
    if grid.delta != 1.0:
        u = torch.div(w, grid.delta, out=u) if u is not None else w.to(dtype) / grid.delta
    elif u is None:
        u = w.to(dtype, copy=True)
    elif u is not w:
        u.copy_(w)
    if grid.bounded:
        u.clamp_(-grid.max_multiple, grid.max_multiple)
    return u


def check_out(w: torch.Tensor, out: torch.Tensor | None) -> None:
    """`out` must be able to hold the result exactly as a fresh tensor would."""
    if out is not None and (out.shape != w.shape or out.dtype != w.dtype or out.device != w.device):
        raise UserError(
            f"out must have the input's shape, dtype and device ({tuple(w.shape)}, {w.dtype}, "
            f"{w.device}), got ({tuple(out.shape)}, {out.dtype}, {out.device}); pass a matching "
            "tensor or none"
        )


def level_units(u: torch.Tensor, grid: Grid) -> torch.Tensor:
    """u (in units of Δ) turned in place into the position t between levels (level units)."""
    if grid.step != 1:
        # offset 1 on odd-multiple grids: lo = step·⌊(u − 1)/step⌋ + 1, t the position in
        # level units (on step-1 grids t = u, and u − 0 and u/1 change no bit)
        u.sub_(1.0).div_(float(grid.step))
    return u


def levels(
    m: torch.Tensor, grid: Grid, dtype: torch.dtype, out: torch.Tensor | None
) -> torch.Tensor:
    """m·Δ rounded once into `dtype` (as `Grid.from_multiples`), written over m, then `out`."""
    if grid.delta != 1.0:  # m·1 = m exactly, NaN included
        m.mul_(grid.delta)
    if out is None:
        return m.to(dtype)
    if out is not m:
        out.copy_(m)
    return out


def nearest_multiples_(
    u: torch.Tensor, grid: Grid, work: torch.Tensor | None = None
) -> torch.Tensor:
    """u (clipped, in units of Δ) replaced by its nearest multiple m, ties away from zero."""
    if grid.kind == "binary":
        # on [−1, 1]: ⌊u⌋ is −1 exactly for u < 0, so 2⌊u⌋ + 1 ∈ {−1, 1, 3} is the sign with
        # sign(±0) = +1 once 3 is clipped; floor, products and clamp all keep NaN
        return u.floor_().mul_(2.0).add_(1.0).clamp_(max=1.0)
    if grid.kind == "ternary":
        # trunc(u + ½·sign(u)) = sign(u)·⌊|u| + ½⌋ because round-to-nearest is symmetric;
        # sign(NaN) is 0 in torch, so NaN stays NaN through u itself, and + 0.0 turns the −0
        # of small negative u into +0
        return u.add_(torch.sign(u, out=work), alpha=0.5).trunc_().add_(0.0)
    negative = u < 0
    a = u.abs_()
    if grid.step == 1:
        m = a.add_(0.5).floor_()
    else:
        m = a.mul_(0.5).floor_().mul_(2.0).add_(1.0)
    if grid.bounded:
        m.clamp_(max=grid.max_multiple)
    # m ≥ 0 here, and adding +0.0 turns −0.0 (from negating a zero level) into +0.0
    return torch.where(negative, -m, m, out=m).add_(0.0)


def round_nearest(
    w: torch.Tensor,
    grid: Grid,
    out: torch.Tensor | None = None,
    work: torch.Tensor | None = None,
) -> torch.Tensor:
    """Deterministic rounding Q_d(w): the nearest level, ties away from zero.

    With u = clip(w)/Δ: m = sign(u)·(⌊|u| + ½⌋) on step-1 grids (ternary, lattice) and
    m = sign(u)·(2⌊|u|/2⌋ + 1) on the odd-multiple grids (binary, k-bit), where sign(0) = +1;
    m is clipped to [−M, M]. On the binary grid Q_d is sign(w)·Δ with sign(0) = +1, and Q_d is
    idempotent: Q_d(Q_d(w)) = Q_d(w). NaN stays NaN; ±∞ goes to ±MΔ (±∞ on the lattice).
    The result goes into `out` when given (w's shape and dtype; it may be w).
    """
    check_out(w, out)
    m = nearest_multiples_(units(w, grid, out), grid, work)
    return levels(m, grid, w.dtype, out)


def round_stochastic(
    w: torch.Tensor,
    grid: Grid,
    generator: torch.Generator | None = None,
    out: torch.Tensor | None = None,
    work: torch.Tensor | None = None,
    uniforms: torch.Tensor | None = None,
) -> torch.Tensor:
    """Stochastic rounding Q_s(w), unbiased inside the grid's range.

    With lo the level at or below clip(w) and hi = lo + spacing: Q_s(w) = hi with probability
    p = (w − lo)/spacing, else lo. Hence E[Q_s(w)] = w and the per-coordinate variance is
    p(1 − p)·spacing² ≤ spacing·|w − w'| for any level w' (Lemma 1's bound).

    `generator` (on w's device) makes the draw reproducible; it advances by one uniform draw
    per element. `uniforms` (r ∈ [0, 1) of w's shape in the compute precision, e.g. from
    `qtrain.quant.uniforms.counter_uniforms`) are used instead of a draw. NaN stays NaN; ±∞
    goes to ±MΔ (±∞ on the lattice). The result goes into `out` when given (w's shape and
    dtype; it may be w).
    """
    check_out(w, out)
    t = level_units(units(w, grid, out), grid)
    r = uniforms
    if r is None:
        r = torch.rand(t.shape, generator=generator, dtype=t.dtype, device=t.device)
    return levels(stochastic_multiples_(t, r, grid, work), grid, w.dtype, out)


def stochastic_multiples_(
    t: torch.Tensor, r: torch.Tensor, grid: Grid, work: torch.Tensor | None = None
) -> torch.Tensor:
    """t (u clipped, in level units) replaced by the multiple m that `round_stochastic` picks
    with the uniforms r ∈ [0, 1): m = lo + [r < t − lo] in level units, lo = ⌊t⌋.

    Split from the draw so that a fused step (`qtrain.methods.fused`) computes the same m from
    uniforms drawn by the same `torch.rand` call.
    """
    lo = torch.floor(t, out=work)
    p = t.sub_(lo)
    # r < p rounds up (a value clipped to the top level has p = 0 and stays); m lands in t
    m = torch.lt(r, p, out=p).add_(lo)
    if grid.step != 1:
        m.mul_(float(grid.step)).add_(1.0)
    return m


def quantize(
    w: torch.Tensor, grid: Grid, stochastic: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Q_s(w) when `stochastic`, else Q_d(w) (non-finite values as in the module docstring)."""
    return round_stochastic(w, grid, generator) if stochastic else round_nearest(w, grid)
