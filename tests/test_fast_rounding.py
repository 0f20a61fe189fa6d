"""Fused stochastic rounding: the hash, its uniforms, the law of Q_s, seeding, fused == eager."""

from __future__ import annotations

import math

import pytest
import torch

from qtrain.quant import Grid, binary, kbit, lattice, round_nearest, ternary
from qtrain.quant.fast_rounding import (
    draw_key,
    hash_counters,
    lowbias32,
    round_stochastic_hashed,
    uniforms,
)

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
BOUNDED = [binary(), binary(0.5), ternary(), ternary(0.25), kbit(1), kbit(2, 0.1), kbit(3, 0.5)]
ALL_GRIDS = [*BOUNDED, lattice(), lattice(0.3)]


def reference_lowbias32(x: int) -> int:
    """H(x) on Python integers, with explicit unsigned 32-bit arithmetic."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def as_unsigned(t: torch.Tensor) -> list[int]:
    return [v & 0xFFFFFFFF for v in t.tolist()]


def as_int32(words: list[int]) -> torch.Tensor:
    return torch.tensor([w - 2**32 if w >= 2**31 else w for w in words], dtype=torch.int32)


def eager(w: torch.Tensor, grid: Grid, seed: int) -> torch.Tensor:
    return round_stochastic_hashed(w, grid, torch.Generator().manual_seed(seed), fused=False)


def test_lowbias32_matches_unsigned_reference():
    g = torch.Generator().manual_seed(0)
    words = [0, 1, 2**31 - 1, 2**31, 2**32 - 1]
    words += torch.randint(0, 2**32, (2000,), generator=g).tolist()
    assert as_unsigned(lowbias32(as_int32(words))) == [reference_lowbias32(w) for w in words]


def test_hash_of_a_counter_is_the_documented_double_hash():
    key = as_int32([0xDEADBEEF, 0x12345678])
    index = torch.arange(1000, dtype=torch.int32)
    expected = [
        reference_lowbias32(reference_lowbias32(i ^ 0xDEADBEEF) ^ 0x12345678) for i in range(1000)
    ]
    assert as_unsigned(hash_counters(index, key)) == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_uniforms_are_uniform_in_bins_and_bits(dtype):
    """χ² over 256 equal bins within 5 sd of its mean; each of the top 24 bits is fair."""
    n = 2**20
    key = draw_key(torch.Generator().manual_seed(1), torch.device("cpu"))
    r = uniforms(torch.arange(n, dtype=torch.int32), key, dtype)
    assert r.dtype == dtype and r.min() >= 0 and r.max() < 1
    bins = 256
    counts = torch.bincount((r * bins).long(), minlength=bins).double()
    chi2 = float(((counts - n / bins) ** 2 / (n / bins)).sum())
    assert abs(chi2 - (bins - 1)) < 5 * math.sqrt(2 * (bins - 1))
    codes = (r.double() * 2**24).long()
    bit_means = torch.stack([((codes >> b) & 1).double().mean() for b in range(24)])
    assert ((bit_means - 0.5).abs() < 5 * 0.5 / math.sqrt(n)).all()
    assert abs(float(r.double().mean()) - 0.5) < 5 * math.sqrt(1 / 12 / n)


def test_uniforms_of_neighbours_and_of_successive_keys_are_uncorrelated():
    """Lag-1 correlation along the counter and across two calls within 5/√n of zero."""
    n = 2**20
    g = torch.Generator().manual_seed(2)
    index = torch.arange(n, dtype=torch.int32)
    first = uniforms(index, draw_key(g, torch.device("cpu")), torch.float64)
    second = uniforms(index, draw_key(g, torch.device("cpu")), torch.float64)
    bound = 5 / math.sqrt(n)
    assert abs(float(torch.corrcoef(torch.stack([first[:-1], first[1:]]))[0, 1])) < bound
    assert abs(float(torch.corrcoef(torch.stack([first, second]))[0, 1])) < bound


@pytest.mark.parametrize("grid", ALL_GRIDS, ids=lambda g: g.describe())
def test_hashed_rounding_is_unbiased_with_variance_p_one_minus_p(grid):
    """Monte-Carlo mean within 5 standard errors of w; variance equals p(1−p)·spacing²."""
    hi = grid.hi if grid.bounded else 3.0
    w = torch.linspace(-0.97 * hi, 0.97 * hi, 13, dtype=torch.float64)
    n = 20000
    draws = eager(w.expand(n, -1).contiguous(), grid, 4)
    t = (w / grid.delta - (0 if grid.step == 1 else 1)) / grid.step
    p = t - torch.floor(t)
    expected_var = p * (1 - p) * grid.spacing**2
    mean, var = draws.mean(0), draws.var(0)
    standard_error = (expected_var / n).sqrt().clamp_min(1e-12)
    assert ((mean - w).abs() <= 5 * standard_error + 1e-12).all()
    pq = p * (1 - p)  # the sample variance of a Bernoulli has standard error √(pq(1−4pq)/n)
    var_standard_error = grid.spacing**2 * (pq * (1 - 4 * pq) / n).sqrt()
    # near p = ½ that error vanishes and the O(1/n) bias of p̂(1 − p̂) dominates
    assert ((var - expected_var).abs() <= 5 * var_standard_error + 7 * grid.spacing**2 / n).all()
    assert ((draws - w).abs() <= grid.spacing + 1e-12).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("grid", ALL_GRIDS, ids=lambda g: g.describe())
def test_outputs_lie_on_the_codebook_and_keep_shape_and_dtype(grid, dtype):
    w = (torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(5)) * 4).to(dtype)
    out = eager(w, grid, 6)
    assert out.shape == w.shape and out.dtype == dtype and grid.contains(out)


@pytest.mark.parametrize("grid", BOUNDED, ids=lambda g: g.describe())
def test_values_outside_the_range_are_clipped_and_levels_stay(grid):
    w = torch.tensor([-100.0, 100.0, grid.hi * 1.5, grid.lo * 1.5])
    assert torch.equal(eager(w, grid, 0), torch.tensor([grid.lo, grid.hi, grid.hi, grid.lo]))
    levels = grid.levels()
    assert torch.equal(eager(levels, grid, 0), levels)


def test_a_restored_generator_reproduces_the_draw_and_advances_by_two_words():
    w = torch.randn(5000)
    g = torch.Generator().manual_seed(7)
    saved = g.get_state()
    first = round_stochastic_hashed(w, binary(), g, fused=False)
    after = g.get_state()
    g.set_state(saved)
    assert torch.equal(round_stochastic_hashed(w, binary(), g, fused=False), first)
    g.set_state(saved)
    torch.randint(-(2**31), 2**31, (2,), generator=g, dtype=torch.int32)
    assert torch.equal(g.get_state(), after)
    assert not torch.equal(round_stochastic_hashed(w, binary(), g, fused=False), first)


def test_out_may_be_the_input_and_bad_out_is_refused():
    w = torch.randn(4, 6) * 2
    expected = eager(w, ternary(0.5), 8)
    in_place = w.clone()
    g = torch.Generator().manual_seed(8)
    assert round_stochastic_hashed(in_place, ternary(0.5), g, out=in_place, fused=False) is in_place
    assert torch.equal(in_place, expected)
    with pytest.raises(ValueError, match="out must be a contiguous tensor"):
        round_stochastic_hashed(w, binary(), out=torch.empty(4, 6, dtype=torch.float64))


def test_tensors_beyond_int32_counters_are_refused():
    huge = torch.empty(2**31 + 1, device="meta")
    with pytest.raises(ValueError, match="at most 2\\^31 elements"):
        round_stochastic_hashed(huge, binary())


@pytest.mark.slow
@pytest.mark.parametrize(
    "grid, dtype", [(binary(), torch.float32), (kbit(2, 0.1), torch.float64)], ids=str
)
def test_fused_kernel_is_bit_identical_to_the_eager_formulas(grid, dtype):
    """The compiled loop gives the eager bits, for two sizes with one compiled kernel."""
    for numel in (1000, 4099):
        w = (torch.randn(numel, generator=torch.Generator().manual_seed(numel)) * 3).to(dtype)
        fused = round_stochastic_hashed(w, grid, torch.Generator().manual_seed(9))
        assert torch.equal(fused, eager(w, grid, 9))
    out = torch.empty_like(w)
    round_stochastic_hashed(w, grid, torch.Generator().manual_seed(9), out=out)
    assert torch.equal(out, eager(w, grid, 9))


def test_nearest_level_neighbours_bound_every_draw():
    """Each draw is one of the two levels around clip(w): Q_s and Q_d are ≤ one step apart."""
    w = torch.randn(10000, generator=torch.Generator().manual_seed(10)) * 5
    for grid in ALL_GRIDS:
        gap = grid.to_multiples(eager(w, grid, 11)) - grid.to_multiples(round_nearest(w, grid))
        assert (gap.abs() <= grid.step).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("grid", ALL_GRIDS, ids=lambda g: g.describe())
def test_nan_stays_nan_and_infinities_clip_to_the_end_levels(grid, dtype):
    """The non-finite rule of `qtrain.quant.rounding`: NaN → NaN, ±∞ → ±MΔ (±∞ on the lattice)."""
    nan, inf = float("nan"), float("inf")
    out = eager(torch.tensor([nan, inf, -inf, 0.3, nan], dtype=dtype), grid, 12)
    assert torch.isnan(out[[0, 4]]).all()
    if grid.bounded:
        ends = grid.levels(dtype)[[-1, 0]]
        assert torch.equal(out[1:3], ends)
    else:
        assert out[1:3].tolist() == [inf, -inf]
    assert grid.contains(out[3:4])
