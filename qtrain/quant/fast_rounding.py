"""Stochastic rounding Q_s in one fused pass, driven by a counter-based generator.

`round_stochastic` draws one `torch.rand` uniform per element and then rounds in several
eager passes, each reading and writing the whole tensor. Here the uniform of element i is a
pure function of (i, key) instead, so generation and rounding are one elementwise expression
that `torch.compile` turns into a single loop (C++/OpenMP on CPU, Triton on CUDA): one read of
w and one write of Q_s(w) per element.

The generator. With H the 32-bit "lowbias32" integer finaliser (C. Wellons, a bijection on
32-bit words; ≫ is a logical shift):

    H(x) = x ⊕ (x ≫ 16);  x ← x·0x7FEB352D mod 2³²;  x ← x ⊕ (x ≫ 15);
           x ← x·0x846CA68B mod 2³²;  x ⊕ (x ≫ 16)

the 32-bit hash of element i (row-major index into w, i < 2³¹) under the key (k₀, k₁) is

    h_i = H(H(i ⊕ k₀) ⊕ k₁)

and its uniform is r_i = ⌊h_i / 2^(32−b)⌋ · 2^(−b) ∈ [0, 1), with b = 24 bits when the rounding
runs in float32 (every such r is exact in float32, as for `torch.rand`) and b = 31 in float64.
The key is two 32-bit words drawn from `generator` per call, so a checkpointed generator
state reproduces every later call bit for bit. The words live in int32 lanes, whose
two's-complement products wrap modulo 2³² on every backend, so eager, compiled CPU and CUDA
code agree exactly.

The rounding is `round_stochastic`'s: with u = clip(w)/Δ, t = (u − base)/step and lo = ⌊t⌋,
Q_s(w) = (lo + [r < t − lo])·step + base, times Δ. Since P(r < p) = ⌈p·2^b⌉/2^b, E[Q_s(w)]
differs from w by less than spacing·2^(−b) and the variance is p(1 − p)·spacing² up to the
same resolution — as for `torch.rand`, whose float32 uniforms also have 24 bits.

Non-finite input as in `rounding`: NaN stays NaN (r < NaN is false and NaN propagates), ±∞ is
clipped to ±MΔ on bounded grids and stays ±∞ on the lattice.
"""

from __future__ import annotations

import functools

import torch

from qtrain.quant.grids import Grid, compute_dtype

LOWBIAS32_MULTIPLIERS = (0x7FEB352D, 0x846CA68B)
MAX_NUMEL = 2**31  # element indices 0 … numel − 1 are int32 counters


def _as_int32(c: int) -> int:
    """The int32 with the bit pattern of the 32-bit unsigned integer c."""
    return c - 2**32 if c >= 2**31 else c


def _shift_right(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical x ≫ s on the 32-bit pattern of int32 x (torch's ≫ is arithmetic)."""
    return (x >> s) & ((1 << (32 - s)) - 1)


def lowbias32(x: torch.Tensor) -> torch.Tensor:
    """H(x) of the module docstring on int32 bit patterns; a bijection on 32-bit words.

    Products wrap modulo 2³² (two's complement int32), which is exactly x·c mod 2³² on the
    unsigned pattern; int32 lanes are half as wide as int64, so the fused loop does half the
    vector work.
    """
    first, second = (_as_int32(c) for c in LOWBIAS32_MULTIPLIERS)
    x = x ^ _shift_right(x, 16)
    x = x * first
    x = x ^ _shift_right(x, 15)
    x = x * second
    return x ^ _shift_right(x, 16)


def hash_counters(index: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """h_i = H(H(i ⊕ k₀) ⊕ k₁) as int32 bit patterns, for int32 indices and key = [k₀, k₁]."""
    return lowbias32(lowbias32(index ^ key[0]) ^ key[1])


def uniforms(index: torch.Tensor, key: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """r_i = ⌊h_i / 2^(32−b)⌋·2^(−b) in `dtype` (b = 31 for float64, else 24)."""
    bits = 31 if dtype == torch.float64 else 24
    return _shift_right(hash_counters(index, key), 32 - bits).to(dtype) * 2.0**-bits


def draw_key(generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """The per-call key [k₀, k₁]: two uniform 32-bit words (int32 on `device`).

    Drawn on the device as a tensor, so a CUDA step never waits for the host.
    """
    return torch.randint(
        -(2**31), 2**31, (2,), generator=generator, device=device, dtype=torch.int32
    )


def _round_flat(w: torch.Tensor, key: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Q_s of a 1-D tensor w with the uniforms of `key` (the expression that gets fused)."""
    dtype = compute_dtype(w.dtype)
    u = w.to(dtype) / grid.delta
    if grid.bounded:
        u = u.clamp(-grid.max_multiple, grid.max_multiple)
    step = float(grid.step)
    # offset 1 on odd-multiple grids: lo = step·⌊(u − 1)/step⌋ + 1
    base = 0.0 if grid.step == 1 else 1.0
    t = (u - base) / step
    lo = torch.floor(t)
    index = torch.arange(w.numel(), dtype=torch.int32, device=w.device)
    r = uniforms(index, key, dtype)
    # a value clipped to the top level has t − lo = 0 and stays there
    m = (lo + (r < t - lo).to(dtype)) * step + base
    return grid.from_multiples(m, w.dtype)


@functools.cache
def _compiled_round_flat():
    # dynamic shapes: one kernel serves every tensor size, so only a new grid or dtype compiles
    return torch.compile(_round_flat, dynamic=True, fullgraph=True)


def _round_flat_into(w: torch.Tensor, key: torch.Tensor, grid: Grid, out: torch.Tensor):
    """`_round_flat` written into `out`: the compiled loop stores straight into it."""
    return out.copy_(_round_flat(w, key, grid))


@functools.cache
def _compiled_round_flat_into():
    return torch.compile(_round_flat_into, dynamic=True, fullgraph=True)


def round_stochastic_hashed(
    w: torch.Tensor,
    grid: Grid,
    generator: torch.Generator | None = None,
    *,
    out: torch.Tensor | None = None,
    fused: bool = True,
) -> torch.Tensor:
    """Stochastic rounding Q_s(w) with counter-based uniforms (see the module docstring).

    Same law as `round_stochastic`: Q_s(w) is the level above clip(w) with probability
    p = (w − lo)/spacing, else the level below; E[Q_s(w)] = w, Var = p(1 − p)·spacing². Shape,
    dtype and device are preserved. `generator` (on w's device) advances by two 32-bit draws
    per call, whatever the size of w.

    `out` (contiguous, w's shape and dtype; may be w itself) receives the result without a
    new allocation, which for large tensors saves the page faults of fresh memory.
    `fused=False` evaluates the same integer and float formulas eagerly (several passes, the
    reference); the result is bit-identical. The first fused call for a grid and dtype
    compiles the kernel (seconds to a minute); later calls of any size reuse it.
    """
    if w.numel() > MAX_NUMEL:
        raise ValueError(
            f"round_stochastic_hashed counts elements in int32, so it takes at most 2^31 "
            f"elements, got {w.numel()}; round the tensor in chunks"
        )
    key = draw_key(generator, w.device)
    flat = w.reshape(-1)
    if out is None:
        kernel = _compiled_round_flat() if fused else _round_flat
        return kernel(flat, key, grid).view(w.shape)
    if out.shape != w.shape or out.dtype != w.dtype or not out.is_contiguous():
        raise ValueError(
            "out must be a contiguous tensor with the shape and dtype of w; "
            "allocate it with torch.empty_like(w)"
        )
    kernel = _compiled_round_flat_into() if fused else _round_flat_into
    kernel(flat, key, grid, out.view(-1))
    return out
