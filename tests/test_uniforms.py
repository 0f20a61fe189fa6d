"""Counter uniforms (`qtrain.quant.uniforms`): the formula, its distribution, Q_s with them.

The eager form is checked against exact uint32 arithmetic in Python, the compiled form against
the eager one (odd sizes included, where inductor's vector loop leaves a scalar tail), and the
numbers against what uniforms must be: the 2²⁴ levels equally often, no correlation between
neighbours, between steps, or between keys one bit apart, and Q_s unbiased with them.
"""

from __future__ import annotations

import math

import pytest
import torch

from qtrain.base.errors import UserError
from qtrain.base.inductor import torch_compile
from qtrain.quant import parse_grid, round_stochastic
from qtrain.quant.uniforms import (
    MAX_NUMEL,
    check_size,
    check_source,
    counter_uniforms,
    draw_keys,
)

M32 = 0xFFFFFFFF


def reference(index: int, k0: int, k1: int) -> float:
    """r_i in exact unsigned 32-bit arithmetic (the module doc's formula)."""

    def mix(x: int) -> int:
        x ^= x >> 16
        x = (x * 0x21F0AAAD) & M32
        x ^= x >> 15
        x = (x * 0x735A2D97) & M32
        return x ^ (x >> 15)

    h = mix(mix(index ^ (k0 & M32)) ^ (k1 & M32))
    return (h >> 8) * 2.0**-24


def keys(k0: int, k1: int) -> torch.Tensor:
    return torch.tensor([k0, k1], dtype=torch.int32)


@pytest.mark.parametrize(("k0", "k1"), [(0, 0), (-1, 7), (-(2**31), 2**31 - 1), (123457, -98765)])
def test_counter_uniforms_are_the_formula_in_exact_uint32_arithmetic(k0, k1):
    r = counter_uniforms(keys(k0, k1), 1003, torch.float64)
    for i in [0, 1, 2, 511, 512, 1000, 1001, 1002]:
        assert r[i].item() == reference(i, k0, k1)
    assert r.dtype == torch.float64 and r.shape == (1003,)


def test_a_slice_from_start_is_that_slice_of_the_whole_buffers_uniforms():
    """The fused step hashes each parameter's slice of the flat buffer from its offset."""
    k = keys(-77, 2**30 + 5)
    whole = counter_uniforms(k, 5000, torch.float32)
    for start, n in [(0, 5000), (1, 1), (1234, 2000), (4999, 1)]:
        assert torch.equal(
            counter_uniforms(k, n, torch.float32, start=start), whole[start : start + n]
        )
    assert counter_uniforms(k, 3, torch.float64, start=7)[0].item() == reference(7, -77, 2**30 + 5)


def test_the_compiled_form_gives_the_eager_bits_at_odd_sizes():
    """Compiled as the fused step compiles (`torch_compile`: inductor's cache of this vector
    ISA, so a kernel built natively is not loaded under the AVX2 stand-in)."""
    try:
        compiled = torch_compile(counter_uniforms, fullgraph=True, dynamic=False)
        compiled(keys(1, 2), 5, torch.float32)
    except Exception as error:  # inductor reports a missing toolchain in several ways
        pytest.skip(f"torch.compile does not work here: {type(error).__name__}: {error}")
    for n, k in [(1, keys(3, 4)), (17, keys(-5, 9)), (4099, keys(2**31 - 1, -(2**31)))]:
        assert torch.equal(compiled(k, n, torch.float32), counter_uniforms(k, n, torch.float32))


def test_counter_uniforms_take_the_levels_of_float32s_in_zero_one():
    r = counter_uniforms(keys(11, 12), 1 << 16, torch.float32)
    assert r.min() >= 0 and r.max() < 1
    assert torch.equal(r * 2**24, (r * 2**24).round())  # multiples of 2⁻²⁴, exact in float32
    assert torch.equal(r, counter_uniforms(keys(11, 12), 1 << 16, torch.float64).float())


def chi_square(r: torch.Tensor, bins: int) -> float:
    counts = torch.bincount((r * bins).long(), minlength=bins).double()
    expected = r.numel() / bins
    return float(((counts - expected) ** 2 / expected).sum())


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_counter_uniforms_are_uniform_and_uncorrelated():
    """χ² over 256 bins below its 0.1% critical value (255 degrees of freedom: 330.5); lag-1
    and lag-16 autocorrelation, the correlation between two steps' streams and between keys
    one bit apart, each within 5 standard errors (1/√n) of 0."""
    n = 1 << 18
    generator = torch.Generator().manual_seed(0)
    first = counter_uniforms(draw_keys(generator), n, torch.float64)
    second = counter_uniforms(draw_keys(generator), n, torch.float64)
    assert chi_square(first, 256) < 330.5 and chi_square(second, 256) < 330.5
    bound = 5 / math.sqrt(n)
    assert abs(first.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / n)
    assert abs(correlation(first[1:], first[:-1])) < bound
    assert abs(correlation(first[16:], first[:-16])) < bound
    assert abs(correlation(first, second)) < bound
    flipped = counter_uniforms(keys(1, 0), n, torch.float64)
    assert abs(correlation(counter_uniforms(keys(0, 0), n, torch.float64), flipped)) < bound
    # neighbouring indices, the pairs a shift of one stream would repeat, land apart
    assert (first[1:] == first[:-1]).sum() < 5


def test_each_step_draws_its_keys_from_the_generator():
    a, b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    drawn = [draw_keys(a) for _ in range(3)]
    assert all(k.dtype == torch.int32 and k.shape == (2,) for k in drawn)
    assert not torch.equal(drawn[0], drawn[1]) and not torch.equal(drawn[1], drawn[2])
    assert all(torch.equal(k, draw_keys(b)) for k in drawn)  # the seed's stream, again


@pytest.mark.parametrize("grid", ["ternary", "2bit", "binary"])
def test_stochastic_rounding_with_counter_uniforms_is_unbiased(grid):
    """E[Q_s(w)] = w inside the range: the mean of 400 steps' roundings of 512 weights is
    within 5 standard errors of w (the per-weight variance p(1 − p)·spacing² is known)."""
    g = parse_grid(grid)
    w = torch.linspace(-0.999, 0.999, 512, dtype=torch.float64)
    generator = torch.Generator().manual_seed(1)
    draws = torch.stack([
        round_stochastic(w, g, uniforms=counter_uniforms(draw_keys(generator), 512, w.dtype))
        for _ in range(400)
    ])  # fmt: skip
    lo = round_stochastic(w, g, uniforms=torch.full_like(w, 1 - 2**-24))  # r ≥ p: down
    p = (w - lo) / g.spacing
    error = (p * (1 - p)).sqrt() * g.spacing / math.sqrt(400)
    assert ((draws.mean(0) - w).abs() <= 5 * error + 1e-12).all()
    assert (draws.mean(0) - w).abs().max() > 0  # the draws did vary


def test_an_unknown_source_and_a_too_large_buffer_are_refused():
    with pytest.raises(UserError, match="sr_uniforms must be one of torch, counter, got 'fast'"):
        check_source("fast")
    check_size(MAX_NUMEL)
    with pytest.raises(UserError, match="at most 2147483647 quantized weights.*'torch'"):
        check_size(MAX_NUMEL + 1)
