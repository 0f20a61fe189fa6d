"""Grids and rounding: codebook membership, nearest, unbiasedness, variance, clipping."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qtrain.quant import (
    Grid,
    binary,
    default_delta,
    kbit,
    lattice,
    parse_grid,
    quantize,
    round_nearest,
    round_stochastic,
    ternary,
)

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
BOUNDED = [binary(), binary(0.5), ternary(), ternary(0.25), kbit(1), kbit(2, 0.1), kbit(3, 0.5)]
ALL_GRIDS = [*BOUNDED, lattice(), lattice(0.3)]

grids = st.one_of(
    st.builds(binary, st.sampled_from([0.125, 0.5, 1.0, 2.0, 0.3])),
    st.builds(ternary, st.sampled_from([0.125, 0.5, 1.0, 0.7])),
    st.builds(kbit, st.integers(1, 6), st.sampled_from([0.0625, 0.25, 1.0, 0.1])),
    st.builds(lattice, st.sampled_from([0.01, 0.25, 1.0, 0.3])),
)
shapes = st.lists(st.integers(1, 7), min_size=0, max_size=4).map(tuple)


def brute_force_nearest(w: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Nearest level by exhaustive search, ties away from zero (sign(0) → +)."""
    levels = grid.levels(torch.float64)
    x = w.double().clamp(grid.lo, grid.hi)
    dist = (x.unsqueeze(-1) - levels).abs()
    best = dist.min(dim=-1, keepdim=True).values
    tied = (dist - best).abs() <= 1e-12
    # among tied levels prefer the one farthest from zero in w's direction
    direction = torch.where(x >= 0, 1.0, -1.0).double().unsqueeze(-1)
    score = torch.where(tied, levels * direction, torch.tensor(-math.inf, dtype=torch.float64))
    return levels[score.argmax(dim=-1)]


@settings(max_examples=60, deadline=None)
@given(grid=grids, shape=shapes, dtype=st.sampled_from(DTYPES), scale=st.floats(0.1, 20.0))
def test_outputs_lie_on_codebook_and_keep_shape_dtype(grid, shape, dtype, scale):
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    for out in (round_nearest(w, grid), round_stochastic(w, grid, g)):
        assert out.shape == w.shape and out.dtype == w.dtype and out.device == w.device
        assert grid.contains(out)


@settings(max_examples=40, deadline=None)
@given(grid=grids, shape=shapes, dtype=st.sampled_from(DTYPES))
def test_nearest_is_idempotent(grid, shape, dtype):
    w = (torch.randn(shape, generator=torch.Generator().manual_seed(2)) * 5).to(dtype)
    once = round_nearest(w, grid)
    assert torch.equal(round_nearest(once, grid), once)


@pytest.mark.parametrize("grid", BOUNDED, ids=lambda g: g.describe())
def test_nearest_matches_exhaustive_search(grid):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(4000, generator=g, dtype=torch.float64) * 2 * grid.hi
    # exact midpoints between levels and zero exercise the tie rule
    levels = grid.levels(torch.float64)
    w = torch.cat([w, (levels[1:] + levels[:-1]) / 2, torch.zeros(1, dtype=torch.float64)])
    assert torch.equal(round_nearest(w, grid), brute_force_nearest(w, grid))


def test_binary_nearest_is_sign_with_sign_zero_positive():
    w = torch.tensor([-2.0, -1e-9, 0.0, -0.0, 1e-9, 3.0])
    assert round_nearest(w, binary(0.5)).tolist() == [-0.5, -0.5, 0.5, 0.5, 0.5, 0.5]


def test_ties_round_away_from_zero_and_no_negative_zero():
    w = torch.tensor([-1.5, -0.5, 0.5, 1.5, -0.2])
    out = round_nearest(w, lattice(1.0))
    assert out.tolist() == [-2.0, -1.0, 1.0, 2.0, 0.0]
    assert not torch.signbit(out[-1])


@pytest.mark.parametrize("grid", ALL_GRIDS, ids=lambda g: g.describe())
def test_stochastic_rounding_is_unbiased_with_variance_p_one_minus_p(grid):
    """Monte-Carlo mean within 5 standard errors of w; variance equals p(1−p)·spacing²."""
    g = torch.Generator().manual_seed(4)
    hi = grid.hi if grid.bounded else 3.0
    w = torch.linspace(-0.97 * hi, 0.97 * hi, 13, dtype=torch.float64)
    n = 20000
    draws = round_stochastic(w.expand(n, -1).contiguous(), grid, g)
    lo_level = round_nearest(w, grid)  # neighbours of w
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
    # every draw is one of the two neighbouring levels
    assert ((draws - w).abs() <= grid.spacing + 1e-12).all()
    assert lo_level.shape == w.shape


@pytest.mark.parametrize("grid", [binary(), ternary(0.5), lattice(0.25)], ids=str)
def test_lemma_1_bound_on_rounding_error(grid):
    """E‖Q_s(w+s) − (w+s)‖² ≤ spacing·‖s‖₁ for w on the grid and any step s."""
    g = torch.Generator().manual_seed(5)
    d = 500
    w = round_nearest(torch.randn(d, generator=g, dtype=torch.float64), grid)
    for scale in (1e-3, 1e-2, 1e-1):
        s = torch.randn(d, generator=g, dtype=torch.float64) * scale
        x = w + s
        inside = x.clamp(grid.lo, grid.hi) if grid.bounded else x
        trials = round_stochastic(inside.expand(400, -1).contiguous(), grid, g)
        err = ((trials - inside) ** 2).sum(1).mean()
        assert err <= grid.spacing * (inside - w).abs().sum() * 1.1
        assert err <= math.sqrt(d) * grid.spacing * torch.linalg.vector_norm(s) * 1.1


@pytest.mark.parametrize("grid", BOUNDED, ids=lambda g: g.describe())
def test_values_outside_the_range_are_clipped(grid):
    w = torch.tensor([-100.0, 100.0, grid.hi * 1.5, grid.lo * 1.5])
    expected = torch.tensor([grid.lo, grid.hi, grid.hi, grid.lo])
    assert torch.equal(round_nearest(w, grid), expected)
    assert torch.equal(round_stochastic(w, grid, torch.Generator().manual_seed(0)), expected)


def test_generator_makes_stochastic_rounding_reproducible():
    w = torch.randn(1000)
    a = round_stochastic(w, binary(), torch.Generator().manual_seed(7))
    b = round_stochastic(w, binary(), torch.Generator().manual_seed(7))
    c = round_stochastic(w, binary(), torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("grid", BOUNDED, ids=lambda g: g.describe())
def test_codes_round_trip(grid):
    levels = grid.levels()
    codes = grid.to_codes(levels)
    assert codes.tolist() == list(range(grid.num_levels))
    assert torch.equal(grid.from_codes(codes), levels)
    assert grid.num_levels <= 2**grid.code_bits


def test_grid_geometry():
    assert binary(0.5).levels().tolist() == [-0.5, 0.5]
    assert ternary(2.0).levels().tolist() == [-2.0, 0.0, 2.0]
    assert kbit(2, 1.0).levels().tolist() == [-3.0, -1.0, 1.0, 3.0]
    assert kbit(1).levels().tolist() == binary().levels().tolist()
    assert (binary().code_bits, ternary().code_bits, kbit(4).code_bits) == (1, 2, 4)
    assert parse_grid("3bit", 0.5) == kbit(3, 0.5)
    assert not lattice().bounded and lattice().contains(torch.tensor([-7.0, 0.0, 12.0]))
    assert not binary().contains(torch.tensor([0.0]))
    assert not kbit(2).contains(torch.tensor([2.0]))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: binary(0.0), "delta"),
        (lambda: ternary(-1.0), "delta"),
        (lambda: lattice(float("nan")), "delta"),
        (lambda: kbit(0), "bits"),
        (lambda: kbit(2.5), "bits"),
        (lambda: parse_grid("quaternary"), "unknown grid"),
        (lambda: Grid("binary", 1.0, bits=3), "bits"),
    ],
)
def test_bad_grids_are_rejected_with_a_clear_message(make, message):
    with pytest.raises(ValueError, match=message):
        make()


NAN, INF = float("nan"), float("inf")
ROUNDERS = {
    "nearest": lambda w, grid: round_nearest(w, grid),
    "stochastic": lambda w, grid: round_stochastic(w, grid, torch.Generator().manual_seed(0)),
    "quantize-d": lambda w, grid: quantize(w, grid, stochastic=False),
    "quantize-s": lambda w, grid: quantize(w, grid, True, torch.Generator().manual_seed(0)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rounder", ROUNDERS)
@pytest.mark.parametrize("grid", ALL_GRIDS, ids=lambda g: g.describe())
def test_nan_stays_nan_and_infinities_clip_to_the_end_levels(grid, rounder, dtype):
    """One rule for every grid and function: NaN → NaN, ±∞ → ±MΔ (±∞ on the lattice)."""
    w = torch.tensor([NAN, INF, -INF, 0.3, NAN], dtype=dtype)
    out = ROUNDERS[rounder](w, grid)
    assert torch.isnan(out[[0, 4]]).all()
    if grid.bounded:
        ends = grid.levels(dtype)[[-1, 0]]
        assert torch.equal(out[1:3], ends)
    else:
        assert out[1:3].tolist() == [INF, -INF]
    assert grid.contains(out[3:4])


def test_default_delta_puts_the_end_levels_at_one():
    for name, grid in (("binary", binary()), ("ternary", ternary())):
        assert parse_grid(name).hi == 1.0 and parse_grid(name) == grid
    for bits in (1, 2, 4, 8):
        grid = parse_grid(f"{bits}bit")
        assert grid.delta == default_delta("kbit", bits) == kbit(bits).delta
        assert grid.hi == pytest.approx(1.0) and grid.lo == pytest.approx(-1.0)
        assert grid.num_levels == 2**bits
    assert parse_grid("8bit", 0.5).hi == 255 * 0.5  # an explicit Δ is kept
    assert parse_grid("lattice").delta == 1.0
    assert parse_grid(ternary(0.5)) == ternary(0.5)
    with pytest.raises(ValueError, match="conflicts with the grid"):
        parse_grid(ternary(0.5), 0.25)
