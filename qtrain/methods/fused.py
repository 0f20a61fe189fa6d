"""A fused rounding step: BC's, SR's and R's passes over the flat buffer as one compiled kernel.

After the base step, the eager `QuantizedOptimizer` makes about a dozen elementwise passes over
the flat buffer of quantized weights (docs/speed.md §7): for BC w_r ← clip(w_r),
w_b ← s·Q_d(w_r/s) and the flip count Σ[w_b ≠ w_b_old]; for SR and R w_b ← s·Q(w_b/s) and the
count. Each pass reads and writes the whole buffer. Here the same formulas, the very functions
of `qtrain.quant.rounding`, are traced by `torch.compile`, whose inductor backend fuses them
into one kernel (C++ on the CPU, Triton on CUDA): a loop per quantized parameter (its scale
a constant there) that reads w_r (or w_b), counts the parameter's flips from the old and new
values and writes the new w_b in place. Each parameter's slice of a buffer the kernel writes
is an input of its own (`segment_views`, made once by the optimizer): written as slices of
one flat input, each would be scattered back into a copy of the whole buffer, and joined by
`torch.cat` into a new buffer, w_b would be written twice (docs/speed.md §7). The flips are
counted parameter by parameter for the same reason: counted over a joined buffer, the old
and new grid levels would each be written out whole and read back.

What stays outside the compiled region, so that a run computes the same floats either way:

- SR's uniforms r: drawn by the same `torch.rand` call with the same generator as the eager
  path (one draw of the flat buffer's shape), then passed in, so every run keeps its stream;
- the absmean scales s = mean|w_r| (a reduction whose summation order the compiler may change):
  w_r is clipped and |w_r| taken in one compiled pass, the means stay eager.

The flip count is Σ[old ≠ new] in integers (exact at any size, as `flips.count_changed`); with
a measured scale it compares grid levels m = round(w/(s·Δ)) under the old and the new scales,
as `QuantizedOptimizer._levels` does. Scales broadcast per tensor (0-dim s) or per output row
((C,) s over a parameter whose rows are contiguous runs of the flat buffer: dim 0 outermost, as
in contiguous and channels-last tensors); `segments` returns None for any other layout and the
optimizer stays eager. Stochastic BC and dtypes narrower than their compute precision (float16,
bfloat16) also stay eager. tests/test_fused_quant.py checks every routed combination bit for
bit against the eager step.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from itertools import accumulate

import torch

from qtrain.base.errors import UserError
from qtrain.base.inductor import torch_compile
from qtrain.base.signals import stop_requested
from qtrain.methods.scales import FIXED, safe_divisor
from qtrain.quant import Grid, compute_dtype, round_nearest
from qtrain.quant.rounding import level_units, levels, stochastic_multiples_, units
from qtrain.quant.uniforms import counter_uniforms

FUSED_QUANT = ("auto", "on", "off")
Segments = tuple[tuple[int, int], ...]  # (numel, rows) per quantized parameter


def check_fused_quant(value: str) -> str:
    """`value` when it is one of FUSED_QUANT; one sentence naming them otherwise."""
    if value not in FUSED_QUANT:
        raise UserError(f"fused_quant must be one of {', '.join(FUSED_QUANT)}, got {value!r}")
    return value


def segments(params: list[torch.Tensor], per_row: bool) -> Segments | None:
    """(numel, rows) of each parameter in the flat buffer: rows = C, its dim 0, for a per-row
    scale (`absmean` on a tensor with ≥ 2 dims), else 1; None when such a tensor's rows are not
    contiguous runs of the buffer (dim 0 not outermost)."""
    out = []
    for p in params:
        rows = p.shape[0] if per_row and p.dim() >= 2 else 1
        if rows > 1 and p.stride(0) != p.numel() // rows:
            return None
        out.append((p.numel(), rows))
    return tuple(out)


def offsets(segs: Segments) -> list[int]:
    """Where each parameter's slice starts in the flat buffer."""
    return list(accumulate((n for n, _ in segs), initial=0))[:-1]


def segment_views(x: torch.Tensor, segs: Segments) -> list[torch.Tensor]:
    """Each parameter's slice of the flat x as (rows, numel/rows)."""
    return [x[start : start + n].view(rows, n // rows)
            for (n, rows), start in zip(segs, offsets(segs), strict=True)]  # fmt: skip


def _changed(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Σ[old ≠ new] over one segment, in integers (exact, so the order is free)."""
    return (old != new).sum()


def _total(counts: list[torch.Tensor]) -> torch.Tensor:
    """The segments' counts summed (integers: the same number in any order)."""
    return sum(counts[1:], counts[0])


def _nearest_scaled(grid: Grid) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """s·Q_d(x/s) on one segment, as `QuantizedOptimizer._round` computes it."""

    def fn(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        u = x / safe_divisor(s)
        return round_nearest(u, grid, out=u) * s

    return fn


def _stochastic(t: torch.Tensor, r: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Q_s(t) (t in units of Δ before clipping) with the uniforms r, as `round_stochastic`."""
    u = level_units(units(t, grid, out=t), grid)
    return levels(stochastic_multiples_(u, r, grid), grid, t.dtype, None)


def _levels(w: torch.Tensor, s: torch.Tensor, grid: Grid) -> torch.Tensor:
    """The grid multiple m of w = s·m·Δ (`QuantizedOptimizer._levels`), one segment."""
    return (w / (safe_divisor(s) * grid.delta)).round()


def bc_step(grid: Grid, scale: str, count: bool) -> Callable:
    """BC after the base step with a fixed scale: f(w_r parts, w_b parts, scales) clips each
    part of w_r to the scaled grid's range, writes w_b = s·Q_d(w_r/s) and returns Σ[w_b
    changed] (None unless `count`)."""
    nearest = _nearest_scaled(grid)

    def step(latents: list[torch.Tensor], wbs: list[torch.Tensor], scales: list[torch.Tensor]):
        counts = []
        for x, w, s in zip(latents, wbs, scales, strict=True):
            if scale == "none":
                clipped = x.clamp(grid.lo, grid.hi)
                new = round_nearest(clipped, grid)
            else:
                s = s.reshape(x.shape[0], 1)
                clipped = x.clamp(-(s * grid.hi), s * grid.hi)
                new = nearest(clipped, s)
            if count:
                counts.append(_changed(w, new))
            x.copy_(clipped)
            w.copy_(new)
        return _total(counts) if count else None

    return step


def bc_measured_prepare(grid: Grid) -> Callable:
    """BC with a measured scale, first pass: f(w_r, a) clips w_r to the unscaled range
    [−MΔ, MΔ] in place and writes a = |w_r| (the absmean scales are its eager means)."""

    def prepare(latent: torch.Tensor, a: torch.Tensor) -> None:
        clipped = latent.clamp(grid.lo, grid.hi)
        latent.copy_(clipped)
        a.copy_(clipped.abs())

    return prepare


def bc_measured_step(grid: Grid, count: bool) -> Callable:
    """BC with a measured scale, second pass: f(w_r parts, w_b parts, scales, old_scales)
    writes w_b = s·Q_d(w_r/s) and returns Σ[level changed] under the old and new scales."""
    nearest = _nearest_scaled(grid)

    def step(latents, wbs, scales, old_scales):
        counts = []
        for x, w, s, old_s in zip(latents, wbs, scales, old_scales, strict=True):
            s = s.reshape(x.shape[0], 1)
            new = nearest(x, s)
            if count:
                old_s = old_s.reshape(x.shape[0], 1)
                counts.append(_changed(_levels(w, old_s, grid), _levels(new, s, grid)))
            w.copy_(new)
        return _total(counts) if count else None

    return step


def rounding_step(
    grid: Grid, scale: str, segs: Segments, stochastic: bool, count: bool, counter: bool = False
):
    """SR and R after the base step: f(w_b parts, old, r, scales) writes w_b = s·Q(w_b/s) (Q_s
    with the uniforms r, else Q_d) and returns Σ[w_b ≠ old] (None unless `count`); old and r
    are flat. With `counter`, r holds the step's two keys and the uniforms are hashed from
    them and each weight's index in the flat buffer inside the kernel
    (`qtrain.quant.uniforms.counter_uniforms`, the eager step's very numbers)."""

    def uniforms(r: torch.Tensor | None, dtype: torch.dtype) -> list:
        if counter:
            return [counter_uniforms(r, n, dtype, start=start).view(rows, n // rows)
                    for (n, rows), start in zip(segs, offsets(segs), strict=True)]  # fmt: skip
        return segment_views(r, segs) if stochastic else [None] * len(segs)

    def one(x: torch.Tensor, r: torch.Tensor | None) -> torch.Tensor:
        if stochastic:
            return _stochastic(x.clone(), r, grid)
        return round_nearest(x, grid)

    def step(wbs, old, r, scales):
        olds = segment_views(old, segs) if count else [None] * len(segs)
        counts = []
        parts = zip(wbs, olds, uniforms(r, wbs[0].dtype), scales, strict=True)
        for w, w_old, rs, s in parts:
            if scale == "none":
                new = one(w, rs)
            else:
                s = s.reshape(w.shape[0], 1)
                new = one(w / safe_divisor(s), rs) * s
            if count:
                counts.append(_changed(w_old, new))
            w.copy_(new)
        return _total(counts) if count else None

    return step


def applies(mode: str, scale: str, dtype: torch.dtype, bc_stochastic: bool) -> bool:
    """Whether a fused step exists for this optimizer (module doc): BC (deterministic), SR, R
    on any grid and scale, in a dtype that is its own compute precision."""
    if mode not in ("bc", "sr", "r") or (mode == "bc" and bc_stochastic):
        return False
    if mode != "bc" and scale not in FIXED:
        return False
    return dtype == compute_dtype(dtype)


# What `fused_quant = "auto"` weighs (docs/speed.md §7; one thread of a 2-core AVX-512 EPYC,
# torch 2.13.0+cpu, the 786,432 quantized weights of the 4x128 GPT). Compiling: 15 s in a fresh
# process with an empty inductor cache (3 s when the cache holds the kernels). Saved: the
# nanoseconds per quantized weight and step the fused step saves against the eager one with a
# `he` scale (absmean scales save more). SR saves least: its uniforms are drawn by the eager
# `torch.rand` call either way. R on the binary grid saves nothing measurable, and grids not
# measured (k-bit, lattice) are not compiled by "auto".
COMPILE_SECONDS = 15.0
SAVED_NS_PER_WEIGHT = {("bc", "ternary"): 4.7, ("bc", "binary"): 0.9, ("sr", "ternary"): 0.36,
                       ("sr", "binary"): 0.66, ("r", "ternary"): 1.3}  # fmt: skip


def pays(mode: str, grid: str, numel: int, steps: int, counter: bool = False) -> bool:
    """Whether `fused_quant = "auto"` compiles now, after `steps` eager steps over `numel`
    quantized weights on a `grid` grid: once the time the eager steps have lost against the
    fused ones reaches what compiling costs. A run never knows how long it will last, and so
    (as when renting until the rent paid equals the price of buying) it spends at most about
    twice the better of compiling at the start and never compiling; a short run (a demo) never
    compiles. SR with counter uniforms (`counter`) compiles at once: their eager form is slower
    than `torch.rand`, and a run that asks for them asks for the kernel that makes them. With
    `flip_every` > 1 the steps that count flips and those that do not are two kernels: the
    second compile is not weighed here (both together took 0.5-4 s in bench_lm's warm-up
    rounds, the inductor cache warm)."""
    if counter and mode == "sr":
        return True
    saved = SAVED_NS_PER_WEIGHT.get((mode, grid), 0.0) * 1e-9
    return saved > 0 and steps * numel * saved >= COMPILE_SECONDS


class FusedSteps:
    """The compiled steps of one optimizer on one device and dtype, built on first use.

    A step that cannot be compiled is not tried again: the optimizer takes its eager step from
    then on (the same numbers), silently under `fused_quant = "auto"` and with one warning
    under "on". A compile that fails while the run is asked to stop (Ctrl-C reaches the
    compiler's process too) takes the eager step without either: the next try may compile.
    """

    def __init__(self, announce: bool) -> None:
        self.announce = announce
        self.failed = False
        self._compiled: dict[str, Callable] = {}

    def ready(self, name: str) -> bool:
        """Whether `name` has been compiled already (a call then cannot fail to compile)."""
        return name in self._compiled

    def run(self, name: str, build: Callable[[], Callable], *args) -> tuple[bool, object]:
        """(True, the compiled `name`'s result on args), or (False, None) with nothing written
        when it cannot be compiled."""
        from torch._dynamo.exc import TorchDynamoException

        if self.failed:
            return False, None
        fn = self._compiled.get(name)
        if fn is None:
            fn = torch_compile(build(), fullgraph=True, dynamic=False)
        try:
            result = fn(*args)
        except TorchDynamoException as error:  # the compiler's failure: stay eager
            if stop_requested():  # the user's Ctrl-C killed the compiler too: not its fault
                return False, None
            self.failed = True
            self.warn(str(error).strip().splitlines()[0] if str(error).strip() else "")
            return False, None
        self._compiled[name] = fn
        return True, result

    def warn(self, reason: str) -> None:
        if self.announce:
            warnings.warn(
                f"fused_quant = 'on' cannot compile the rounding step ({reason[:160]}); "
                "training continues with the eager step, which computes the same numbers",
                stacklevel=4,
            )
