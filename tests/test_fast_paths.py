"""The fast rounding paths equal the reference formulas bit for bit.

`reference_*` below are the straightforward formulas of `qtrain.quant.rounding` and
`qtrain.methods.scales` (a fresh tensor per elementwise pass, `torch.where` for the signs);
the library's in-place, buffer-reusing versions must give the very same bits for every grid,
scale and dtype, on random values and on the awkward ones (NaN, ±∞, ±0, subnormals, ties and
their floating-point neighbours), and the optimizer's steps must equal a twin run that applies
the reference formulas after a plain `torch.optim.AdamW` step.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from qtrain.base.streams import stream_generator
from qtrain.methods.optimizer import QuantizedOptimizer
from qtrain.methods.scales import absmean, fixed_scale, measured_scale, scaled_round
from qtrain.quant import (
    Grid,
    binary,
    compute_dtype,
    kbit,
    lattice,
    round_nearest,
    round_stochastic,
    ternary,
)

GRIDS = [binary(), binary(0.3), ternary(), ternary(0.7), kbit(2), kbit(3, 0.1), lattice(),
         lattice(0.25)]  # fmt: skip
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
INT_VIEW = {torch.float32: torch.int32, torch.float64: torch.int64,
            torch.float16: torch.int16, torch.bfloat16: torch.int16}  # fmt: skip


# -- the reference formulas ------------------------------------------------------------------
def reference_units(w: torch.Tensor, grid: Grid) -> torch.Tensor:
    u = w.to(compute_dtype(w.dtype)) / grid.delta
    if grid.bounded:
        u.clamp_(-grid.max_multiple, grid.max_multiple)
    return u


def reference_round_nearest(w: torch.Tensor, grid: Grid) -> torch.Tensor:
    u = reference_units(w, grid)
    if grid.kind == "binary":
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
    m = torch.where(negative, -m, m).add_(0.0)
    return grid.from_multiples(m, w.dtype)


def reference_round_stochastic(w: torch.Tensor, grid: Grid, generator) -> torch.Tensor:
    u = reference_units(w, grid)
    step = float(grid.step)
    base = 0.0 if grid.step == 1 else 1.0
    t = u.sub_(base).div_(step)
    lo = torch.floor(t)
    r = torch.rand(t.shape, generator=generator, dtype=t.dtype, device=t.device)
    m = lo.add_((r < t.sub_(lo)).to(t.dtype)).mul_(step).add_(base)
    return grid.from_multiples(m, w.dtype)


def reference_scaled_round(x, s, grid, stochastic, generator=None) -> torch.Tensor:
    dtype = compute_dtype(x.dtype)
    s = s.to(dtype)
    u = x.to(dtype) / s.clamp_min(torch.finfo(dtype).tiny)
    if stochastic:
        q = reference_round_stochastic(u, grid, generator)
    else:
        q = reference_round_nearest(u, grid)
    return (q * s).to(x.dtype)


def reference_measured_scale(kind: str, w_r: torch.Tensor) -> torch.Tensor:
    a = w_r.to(compute_dtype(w_r.dtype)).abs()
    if kind == "absmean-tensor" or a.dim() < 2:
        return a.mean()
    return a.mean(dim=tuple(range(1, a.dim())))


# -- inputs and comparison -------------------------------------------------------------------
def awkward_values(grid: Grid, dtype: torch.dtype, seed: int, n: int = 4000) -> torch.Tensor:
    """Random weights over and beyond the grid's range, then every awkward value in `dtype`."""
    g = torch.Generator().manual_seed(seed)
    top = (grid.max_multiple or 4) * grid.delta
    random = torch.randn(n, generator=g, dtype=torch.float64) * top
    halves = torch.arange(-2 * (grid.max_multiple or 4) - 3, 2 * (grid.max_multiple or 4) + 4)
    ties = (halves.double() * 0.5 * grid.delta).to(dtype)  # levels, midpoints and beyond
    info = torch.finfo(dtype)
    specials = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"),
                             info.tiny, -info.tiny, info.max, -info.max], dtype=dtype)  # fmt: skip
    subnormal = torch.tensor([info.tiny / 4, -info.tiny / 4, info.tiny / 1024], dtype=dtype)
    values = torch.cat([random.to(dtype), ties, specials, subnormal])
    # the floating-point neighbours of every tie and level, where rounding decides by one ulp
    up = torch.nextafter(ties, torch.full_like(ties, float("inf")))
    down = torch.nextafter(ties, torch.full_like(ties, -float("inf")))
    values = torch.cat([values, up, down])
    return values[torch.randperm(values.numel(), generator=g)]


def assert_identical(got: torch.Tensor, want: torch.Tensor) -> None:
    """Same dtype, shape and bits (NaN must be NaN where the reference has NaN)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    ints = INT_VIEW[want.dtype]
    assert torch.equal(got[~nan].contiguous().view(ints), want[~nan].contiguous().view(ints))


# -- the rounding functions ------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grid", GRIDS, ids=Grid.describe)
def test_round_nearest_equals_the_reference_formula(grid, dtype):
    w = awkward_values(grid, dtype, seed=1)
    want = reference_round_nearest(w, grid)
    assert_identical(round_nearest(w, grid), want)
    out = torch.empty_like(w)
    assert round_nearest(w, grid, out=out) is out
    assert_identical(out, want)
    inplace = w.clone()
    round_nearest(inplace, grid, out=inplace)
    assert_identical(inplace, want)
    work = torch.full(w.shape, float("nan"), dtype=compute_dtype(dtype))  # scratch, not input
    assert_identical(round_nearest(w.clone(), grid, out=torch.empty_like(w), work=work), want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grid", GRIDS, ids=Grid.describe)
def test_round_stochastic_equals_the_reference_formula_and_stream(grid, dtype):
    w = awkward_values(grid, dtype, seed=2)
    reference_generator = torch.Generator().manual_seed(5)
    want = reference_round_stochastic(w, grid, reference_generator)
    scratch = torch.full(w.shape, float("nan"), dtype=compute_dtype(dtype))
    for out in (None, torch.empty_like(w), "in place"):
        for work in (None, scratch):
            x = w.clone() if out == "in place" else w
            target = x if out == "in place" else out
            generator = torch.Generator().manual_seed(5)
            assert_identical(round_stochastic(x, grid, generator, out=target, work=work), want)
            # the same uniforms, and as many of them
            assert torch.equal(generator.get_state(), reference_generator.get_state())


def scale_cases(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Scales of every kind for 2-D weights w, with a zero channel and a NaN channel."""
    cases = {kind: fixed_scale(kind, w) for kind in ("none", "he")}
    finite = torch.nan_to_num(w.float(), nan=0.0, posinf=1.0, neginf=-1.0).to(w.dtype)
    for kind in ("absmean", "absmean-tensor"):
        s = reference_measured_scale(kind, finite)
        cases[kind] = s.reshape(s.shape + (1,) * (w.dim() - s.dim())) if s.dim() else s
    per_channel = cases["absmean"].clone()
    per_channel[0] = 0.0  # an all-zero channel
    per_channel[1] = float("nan")  # a diverged channel
    cases["absmean, zero and NaN channels"] = per_channel
    cases["elementwise"] = finite.to(compute_dtype(finite.dtype)).abs()
    return cases


@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grid", GRIDS, ids=Grid.describe)
def test_scaled_round_equals_the_reference_formula(grid, dtype, stochastic):
    w = awkward_values(grid, dtype, seed=3)[:4000].reshape(40, 100)
    for name, s in scale_cases(w).items():
        reference_generator = torch.Generator().manual_seed(7)
        want = reference_scaled_round(w, s, grid, stochastic, reference_generator)
        for out in (None, torch.empty_like(w), "in place"):
            x = w.clone() if out == "in place" else w
            target = x if out == "in place" else out
            generator = torch.Generator().manual_seed(7)
            got = scaled_round(x, s, grid, stochastic, generator, out=target)
            assert_identical(got, want), name
            if target is not None:
                assert got is target
            assert torch.equal(generator.get_state(), reference_generator.get_state())


@pytest.mark.parametrize("kind", ["absmean", "absmean-tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_absmean_of_views_into_a_flat_buffer_equals_measured_scale(kind, dtype):
    """The optimizer takes |w_r| once over its flat buffer and averages views into it, at
    offsets that are not aligned as a fresh tensor is; the means are the same bits."""
    g = torch.Generator().manual_seed(4)
    shapes = [(3,), (7, 5), (4, 3, 3, 3), (129, 65), (1, 1000)]
    flat = torch.randn(sum(torch.Size(s).numel() for s in shapes), generator=g, dtype=dtype)
    a, offset = flat.abs(), 0
    for shape in shapes:
        n = torch.Size(shape).numel()
        w = flat[offset : offset + n].view(shape)
        got = absmean(kind, a[offset : offset + n].view(shape))
        assert_identical(got, reference_measured_scale(kind, w.clone()))
        assert_identical(measured_scale(kind, w), reference_measured_scale(kind, w.clone()))
        offset += n


# -- the optimizer against a twin run of the reference formulas -------------------------------
def tiny_net(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 7, bias=False), nn.Tanh(),
                        nn.Linear(7, 3))  # fmt: skip
    with torch.no_grad():  # latent weights spread over several levels
        for layer in (net[0], net[2]):
            layer.weight.mul_(4)
    return net.to(dtype)


def quantized_weights(net: nn.Module) -> list[nn.Parameter]:
    return [net[0].weight, net[2].weight]


def flat_scales(kind: str, weights: list[torch.Tensor]) -> torch.Tensor:
    """Each weight's scale expanded over it, flattened and concatenated (weights' dtype)."""
    parts = []
    for w in weights:
        s = (
            reference_measured_scale(kind, w)
            if kind.startswith("absmean")
            else fixed_scale(kind, w)
        )
        s = s.reshape(s.shape + (1,) * (w.dim() - s.dim())) if s.dim() else s
        parts.append(s.expand_as(w).to(w.dtype).reshape(-1))
    return torch.cat(parts)


def reference_rounding(kind, x, s, grid, stochastic, generator):
    if kind == "none":
        if stochastic:
            return reference_round_stochastic(x, grid, generator)
        return reference_round_nearest(x, grid)
    return reference_scaled_round(x, s, grid, stochastic, generator)


CELLS = [(mode, grid, scale, stochastic)
         for mode, scales in (("bc", ("none", "he", "absmean", "absmean-tensor")),
                              ("sr", ("none", "he")), ("r", ("none", "he")))
         for grid in (binary(), ternary(), kbit(2), kbit(3, 0.2))
         for scale in scales
         for stochastic in ((False, True) if mode == "bc" else (mode == "sr",))]  # fmt: skip


def levels(weights, scales, grid) -> torch.Tensor:
    """The grid multiple m of every weight w = s·m·Δ (float64, exact for on-grid weights)."""
    parts = []
    for w, s in zip(weights, scales, strict=True):
        s = s.double().reshape(s.shape + (1,) * (w.dim() - s.dim())) if s.dim() else s.double()
        parts.append(torch.round(w.detach().double() / (s * grid.delta)).reshape(-1))
    return torch.cat(parts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize(
    "mode, grid, scale, bc_stochastic",
    CELLS,
    ids=[f"{m}-{g.describe()}-{s}-{'Qs' if q else 'Qd'}" for m, g, s, q in CELLS],
)
def test_optimizer_steps_equal_a_twin_run_of_the_reference_formulas(
    mode, grid, scale, bc_stochastic, dtype
):
    net = tiny_net(dtype)
    weights = quantized_weights(net)
    if mode != "bc":  # SR and R start on the grid
        with torch.no_grad():
            for w in weights:
                s = fixed_scale(scale, w)
                w.copy_(reference_rounding(scale, w, s, grid, False, None))
    twin = copy.deepcopy(net)  # holds w_r (BC) or w_b (SR, R) in plain float parameters
    lr, decay = (0.02, 0.1) if mode == "bc" else (0.3, 0.1)
    base = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=decay)
    opt = QuantizedOptimizer(base, weights, mode, grid, scale=scale, seed=3,
                             bc_stochastic=bc_stochastic)  # fmt: skip
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=lr, weight_decay=decay)
    generator = stream_generator(3, "rounding")
    twin_weights = quantized_weights(twin)
    stochastic = bc_stochastic if mode == "bc" else mode == "sr"

    def reference_wb() -> torch.Tensor:
        flat = torch.cat([w.detach().reshape(-1) for w in twin_weights])
        s = flat_scales(scale, twin_weights) if scale != "none" else None
        if mode == "bc":
            if scale == "he":
                hi = s * grid.hi
                flat = flat.clamp(min=-hi, max=hi)
            else:
                flat = flat.clamp(grid.lo, grid.hi)
            with torch.no_grad():  # the twin's w_r is clipped too
                offset = 0
                for w in twin_weights:
                    w.copy_(flat[offset : offset + w.numel()].view_as(w))
                    offset += w.numel()
            s = flat_scales(scale, twin_weights) if scale != "none" else None
        return reference_rounding(scale, flat, s, grid, stochastic, generator)

    if mode == "bc":  # the optimizer rounds w_r once when it is built
        assert_identical(torch.cat([w.detach().reshape(-1) for w in weights]), reference_wb())
    for step in range(4):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 6, generator=g, dtype=dtype), torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        for p, q in zip(net.parameters(), twin.parameters(), strict=True):
            q.grad = p.grad.clone()
        old = torch.cat([w.detach().reshape(-1) for w in weights])
        old_levels = levels(weights, opt.scales(), grid)
        opt.step()
        twin_opt.step()
        want = reference_wb()
        got = torch.cat([w.detach().reshape(-1) for w in weights])
        assert_identical(got, want)
        if scale in ("absmean", "absmean-tensor"):  # the scale drifts: a flip changes the level
            flips = (old_levels != levels(weights, opt.scales(), grid)).sum()
        else:
            flips = (old != want).sum()
        assert opt.flips.last.item() == float(flips)
        if mode != "bc":
            with torch.no_grad():
                offset = 0
                for w in twin_weights:
                    w.copy_(want[offset : offset + w.numel()].view_as(w))
                    offset += w.numel()
    assert torch.equal(opt.generator.get_state(), generator.get_state())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_flip_counts_above_the_exact_float_range_are_counted_in_integers(monkeypatch, dtype):
    """Past 2^24 (float32) elements the float sum of 0s and 1s would round; the count then
    goes through integers. A low limit sends these small buffers down that path."""
    counts = {}
    for limit in (None, 10):
        if limit is not None:
            monkeypatch.setattr(
                "qtrain.methods.flips.exact_float_count", lambda dtype, limit=limit: limit
            )
        net = tiny_net(dtype)
        base = torch.optim.AdamW(net.parameters(), lr=0.5)  # large steps: many flips
        opt = QuantizedOptimizer(base, quantized_weights(net), "bc", ternary(), scale="he")
        counts[limit] = []
        for step in range(3):
            g = torch.Generator().manual_seed(step)
            x, y = (
                torch.randn(8, 6, generator=g, dtype=dtype),
                torch.randint(0, 3, (8,), generator=g),
            )
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            old = torch.cat([w.detach().reshape(-1) for w in quantized_weights(net)])
            opt.step()
            new = torch.cat([w.detach().reshape(-1) for w in quantized_weights(net)])
            assert opt.flips.last.item() == float((old != new).sum())
            counts[limit].append(opt.flips.last.item())
    assert counts[None] == counts[10] and max(counts[10]) > 10


def test_an_out_of_another_dtype_or_shape_is_refused_with_one_sentence():
    w = torch.randn(5, dtype=torch.float16)
    for out in (torch.empty(5), torch.empty(4, dtype=torch.float16)):
        with pytest.raises(ValueError, match="out must have the input's shape, dtype and device"):
            round_nearest(w, ternary(), out=out)
        with pytest.raises(ValueError, match="out must have the input's shape, dtype and device"):
            round_stochastic(w, ternary(), out=out)
