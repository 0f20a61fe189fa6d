"""The quantized optimizer: FP, BC, SR, R, Bop and Bop2 over a `torch.optim` optimizer.

A training method decides two things only: where the real-valued state lives and how values
are put back on the grid after each step (docs/paper.md §2, §6). With u(·) the base optimizer's
step direction (SGD: the gradient, Adam/AdamW: m̂/(√v̂ + ε)), f̃ the minibatch loss, g = ∇f̃(w_b)
and Q rounding onto the (scaled) grid:

| mode | state kept                  | update                                                 |
|------|-----------------------------|--------------------------------------------------------|
| fp   | w                           | w ← w − α u(∇f̃(w))                                     |
| r    | w_b on the grid, no copy    | w_b ← Q_d(w_b − α u(g))                                |
| sr   | w_b on the grid, no copy    | w_b ← Q_s(w_b − α u(g))                (rule (6))      |
| bc   | latent w_r; w_b = Q(w_r)    | w_r ← clip(w_r − α u(g)); w_b ← Q_d(w_r)               |
| bop  | m (EMA of g), no copy       | m ← m + γ(g − m); w_b ← −w_b where sign(w_b)·m > τ     |
| bop2 | m, v (EMA of g²), no copy   | as bop with m/(√v + ε) in place of m    (see `bop`)    |

The model always holds w_b, so the gradient is always taken at the quantized weights and
after every step each quantized parameter is exactly on its (scaled) grid. BC keeps w_r inside
this optimizer and, for the duration of the base step, points each quantized parameter at its
latent copy, so the base optimizer (and its weight decay, coupled or AdamW's decoupled) updates
w_r. For SR and R the base step, decay included, acts on w_b before rounding: AdamW's
w ← w − αλw pulls w_b towards 0 and so adds a chance (SR) or, once αλ|w| reaches half a
spacing, a certainty (R) of stepping one level inwards. Bop and Bop2 hide the quantized
gradients from the base optimizer, which then trains only the full-precision parameters;
γ, τ (and σ) live in the quantized parameter group as `gamma`, `tau`, `sigma`, so a schedule
or the user changes them between steps like a learning rate (the group's `lr` is unused, and
`learning_rate` reports the full-precision group's).

All quantized parameters are re-homed into one flat buffer (views with the original shapes
and strides, so channels_last survives), and w_r, m and v are flat buffers of the same layout,
so rounding, clipping, flipping and flip counting are a few vectorised calls per step, into
scratch buffers kept from step to step (`flat.FlatWork`). Scales (`scales`) multiply the grid
per tensor or per output channel; they broadcast over each parameter's view.

A float phase (`float_phase = True`, which the trainer sets for the first steps of a run with
`float_fraction`): BC, SR and R step the quantized parameters as FP does, the base optimizer on
w_r (BC, which still clips it) or on w_b (SR, R), and nothing is rounded, so the model holds
float weights (BC's w_b = clip(w_r)) and no flips are counted. When it ends
(`end_float_phase`) the base optimizer's state of the quantized parameters starts afresh, and
the next step rounds as the method does. Training from float weights first is how quantized
networks are usually built from trained float ones (docs/speedrun.md, "Training in float
first"). A ramp onto the grid (`grid_weight` = λ < 1, which the trainer sets from
`quant_ramp`, BC only): the step writes w_b = w_r + λ(Q(w_r) − w_r) instead of Q(w_r). Flips
are counted only by steps that start from weights on the grid and write weights on it
(`starts_on_grid`: kept by each step and by `end_float_phase`, and set by the trainer before
its steps so that a resumed run counts as an uninterrupted one; and λ = 1).

Moving or casting the model after the optimizer was built (`model.to(device)`, `.double()`,
`.to(memory_format=torch.channels_last)`) replaces the parameters' memory. Every step,
`zero_grad`, `state_dict` and diagnostic first checks pointers (no values) and follows such a
move exactly: new flat buffers on the new device, dtype and layout; w_b re-rounded to the same
levels in the new dtype; w_r, m, v, the scales, the base optimizer's state and the flip
counters carried over; the rounding generator carried over (re-seeded from one draw of it
across device types). A narrowing cast (float32 → float16 or bfloat16, ...) would round w_r and
the optimizer's moments, so it is refused with a sentence: cast the model before building the
optimizer.
"""

from __future__ import annotations

import torch
from torch import nn

from qtrain.base.errors import UserError
from qtrain.base.inductor import compiler_found
from qtrain.base.names import unknown_name
from qtrain.base.streams import stream_generator
from qtrain.methods.bop import bop2_flips_, bop_flips_, flip_group_index
from qtrain.methods.flat import (
    FlatWork,
    check_dense,
    check_widening,
    flat_views,
    generator_on,
    moved,
)
from qtrain.methods.flips import FlipCounter, count_changed
from qtrain.methods.fused import (
    FusedSteps,
    applies,
    bc_measured_prepare,
    bc_measured_step,
    bc_step,
    check_fused_quant,
    pays,
    rounding_step,
    segment_views,
    segments,
)
from qtrain.methods.saved import check_saved_settings, quantization_state, split_saved
from qtrain.methods.scales import (
    FIXED,
    absmean,
    broadcastable,
    check_scale,
    fixed_scale,
    measured_scale,
    on_scaled_grid,
    safe_divisor,
    scaled_round,
)
from qtrain.quant import Grid, compute_dtype, round_nearest, round_stochastic
from qtrain.quant.uniforms import check_size, check_source, counter_uniforms, draw_keys

MODES = ("fp", "bc", "sr", "r", "bop", "bop2")
FLIPPING = ("bop", "bop2")
FLOAT_PHASE = ("bc", "sr", "r")  # the modes that can train in float first (`float_phase`)
BUFFERS = {"bc": ("latent",), "bop": ("m",), "bop2": ("m", "v")}  # flat state kept per mode


def check_grid(mode: str, grid: Grid) -> None:
    """Bop and Bop2 flip signs, which only the binary grid can express."""
    if mode in FLIPPING and grid.kind != "binary":
        raise UserError(
            f"{mode} flips signs, so it needs the binary grid, not {grid.describe()}; "
            "use grid='binary'"
        )


class QuantizedOptimizer(torch.optim.Optimizer):
    """Wraps a base optimizer and keeps the chosen parameters on `grid` (see module doc).

    Args:
        base: any `torch.optim.Optimizer` over all trainable parameters.
        quantized: the parameters to quantize (a subset of the base optimizer's); for Bop and
            Bop2 all in one group that holds `gamma` and `tau` (and `sigma` for Bop2).
        mode: one of MODES.
        grid: the grid quantized weights live on (binary only for Bop and Bop2).
        scale: one of `scales.SCALES`: the factor in front of the grid.
        seed: the run seed; stochastic rounding (SR, stochastic BC) draws from its stream
            "rounding" (`qtrain.base.streams`).
        bc_stochastic: BC writes Q_s(w_r) instead of Q_d(w_r) into the model
            (the stochastic BinaryConnect variant).
        track_flips: count how many quantized weights change per step (one comparison).
        flip_every: count them on every `flip_every`-th step only (`flips.FlipCounter`).
        fused_quant: "off" (eager), "on" or "auto": the rounding step after the base step as
            one compiled loop (`qtrain.methods.fused`; the same numbers); "auto" from the step
            on which `fused.pays` says the compile time is earned back, if a compiler is found
            (from the first step with counter uniforms, whose eager form is the slower one).
        sr_uniforms: where Q_s's uniforms come from (`qtrain.quant.uniforms`): "torch"
            (`torch.rand` on the "rounding" stream) or "counter" (a hash of each weight's
            index under two keys a step drawn from that stream, computed inside the fused
            step); the two give different, equally distributed, numbers.

    The param groups and state are the base optimizer's own objects, so LR schedulers, param
    group edits and `zero_grad` act on both. `step(closure)` works as in `torch.optim.Adam`
    (and so under PyTorch Lightning's automatic optimization): the closure runs once, with
    gradients enabled, while the model holds w_b, and its loss is returned.
    """

    def __init__(
        self,
        base: torch.optim.Optimizer,
        quantized: list[nn.Parameter],
        mode: str,
        grid: Grid,
        *,
        scale: str = "none",
        seed: int = 0,
        bc_stochastic: bool = False,
        track_flips: bool = True,
        flip_every: int = 1,
        fused_quant: str = "off",
        sr_uniforms: str = "torch",
    ) -> None:
        if mode not in MODES:
            raise unknown_name("training mode", mode, MODES)
        if not isinstance(base, torch.optim.Optimizer):
            raise TypeError(f"base must be a torch.optim.Optimizer, got {type(base).__name__}")
        check_scale(scale, mode)
        check_grid(mode, grid)
        # Sharing the group dicts (Optimizer.__init__ appends the very same dict objects)
        # makes LR schedulers that edit our groups edit the base optimizer's groups.
        super().__init__(base.param_groups, base.defaults)
        self.base = base
        self.state = base.state
        self.mode = mode
        self.grid = grid
        self.scale = scale
        self.seed = int(seed)
        self.bc_stochastic = bool(bc_stochastic)
        self.track_flips = bool(track_flips)
        self.fused_quant = check_fused_quant(fused_quant)
        self.sr_uniforms = check_source(sr_uniforms)
        self.quantized = [] if mode == "fp" else list(quantized)
        self._scales = [fixed_scale(scale, p) for p in self.quantized]
        self._check_quantized_params()
        self._group_index = (
            flip_group_index(self.param_groups, self.quantized, mode)
            if mode in FLIPPING and self.quantized
            else None
        )

        self._wb_views: list[torch.Tensor] = []
        self._flat_wb = None
        self._buffers: dict[str, torch.Tensor] = {}
        self._buffer_views: dict[str, list[torch.Tensor]] = {}
        self._work = FlatWork(self.quantized)
        self.generator = None
        self.flips = FlipCounter(every=flip_every)
        self._counting = False  # whether the step being taken counts its flips
        self._fused: FusedSteps | None = None
        self._fused_key: tuple | None = None
        self._segments = None
        self._segmented: dict[str, tuple[torch.Tensor, list[torch.Tensor]]] = {}
        self._steps = 0
        self.float_phase = False  # module doc; set by the trainer from `float_fraction`
        self.grid_weight = 1.0  # λ of a ramp onto the grid (module doc; `quant_ramp`)
        self.starts_on_grid = True  # whether the weights this step starts from are on the grid
        if self.quantized:
            self._rehome_parameters()
        self.reset_flip_stats()

    # -- set-up ----------------------------------------------------------------------------
    def _check_quantized_params(self) -> None:
        owned = {id(p) for g in self.param_groups for p in g["params"]}
        for p, s in zip(self.quantized, self._scales, strict=True):
            if id(p) not in owned:
                raise UserError(
                    "a quantized parameter is not optimized by the base optimizer; "
                    "build the base optimizer over all of the model's trainable parameters"
                )
            check_dense(p)
            if not p.is_floating_point():
                raise UserError("quantized parameters must be floating point tensors")
            if self.mode not in ("bc", "fp") and not on_scaled_grid(
                p.detach(), broadcastable(s, p), self.grid
            ):
                raise UserError(
                    f"{self.mode} keeps no float copy, so its parameters must start on the grid "
                    f"{self.grid.describe()} (scale {self.scale!r}); initialise them with "
                    "qtrain.methods.rademacher_() or round them with round_nearest() first"
                )
        devices = {p.device for p in self.quantized}
        dtypes = {p.dtype for p in self.quantized}
        if len(devices) > 1 or len(dtypes) > 1:
            raise UserError(
                "all quantized parameters must share one device and dtype; move the model "
                "with model.to(device, dtype) before building the optimizer"
            )

    def _rehome_parameters(self) -> None:
        """Move w_b (and w_r, m, v) into flat buffers that the parameters view."""
        first = self.quantized[0]
        total = sum(p.numel() for p in self.quantized)
        if self.sr_uniforms == "counter":
            check_size(total)
        self._flat_wb = torch.empty(total, dtype=first.dtype, device=first.device)
        self._wb_views = flat_views(self.quantized, self._flat_wb)
        self.generator = stream_generator(self.seed, "rounding", first.device)
        with torch.no_grad():
            for p, view in zip(self.quantized, self._wb_views, strict=True):
                view.copy_(p)
                p.data = view
            for name in BUFFERS.get(self.mode, ()):
                # w_r starts at the model's weights; Bop's m and v start at 0
                start = self._flat_wb if name == "latent" else torch.zeros_like(self._flat_wb)
                self._set_buffer(name, start.clone())
            if self.mode == "bc":
                self._update_latent_scales_and_weights(count_flips=False)

    def _set_buffer(self, name: str, flat: torch.Tensor) -> None:
        self._buffers[name] = flat
        self._buffer_views[name] = flat_views(self.quantized, flat)

    def _views(self, name: str) -> list[torch.Tensor]:
        return self._buffer_views[name]

    def _parts(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """The quantized parameters' views into `flat`, made once for the buffers kept here."""
        if flat is self._flat_wb:
            return self._wb_views
        for name, buffer in self._buffers.items():
            if flat is buffer:
                return self._buffer_views[name]
        return self._work.views(flat)

    def _follow_model(self) -> None:
        """Re-home the buffers when the model was moved or cast since the last call (module doc)."""
        if not self.quantized or not moved(self.quantized, self._wb_views):
            return
        devices = {p.device for p in self.quantized}
        dtypes = {p.dtype for p in self.quantized}
        if len(devices) > 1 or len(dtypes) > 1:
            raise UserError(
                "the quantized parameters were moved to different devices or dtypes after the "
                "optimizer was built; move the whole model with model.to(device, dtype)"
            )
        device, dtype = devices.pop(), dtypes.pop()
        check_widening(self._flat_wb.dtype, dtype)
        old_views = {name: self._views(name) for name in self._buffers}
        self._scales = [s.to(device, compute_dtype(dtype)) for s in self._scales]
        total = self._flat_wb.numel()
        self._flat_wb = torch.empty(total, dtype=dtype, device=device)
        self._wb_views = flat_views(self.quantized, self._flat_wb)
        with torch.no_grad():
            for p, s, view in zip(self.quantized, self._scales, self._wb_views, strict=True):
                # levels of the old dtype are the same levels, re-expressed exactly in the new one
                view.copy_(scaled_round(p, broadcastable(s, p), self.grid, stochastic=False))
                p.data = view
            for name, views in old_views.items():
                self._set_buffer(name, torch.empty(total, dtype=dtype, device=device))
                for new, old in zip(self._views(name), views, strict=True):
                    new.copy_(old)
        self.generator = generator_on(self.generator, device)
        self.flips.to(device)
        self._fused_key = None  # segments and compiled steps again for the new layout
        # torch's own load rule casts each floating state tensor to its parameter's device and
        # dtype (keeping Adam's step counter as it is), for every parameter the model moved
        self.base.load_state_dict(self.base.state_dict())
        self.param_groups = self.base.param_groups
        self.state = self.base.state

    # -- scales and rounding ---------------------------------------------------------------
    def _round(
        self, w: torch.Tensor, stochastic: bool, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Q(w) on the (scaled) grid, written into `out` (w's layout; it may be w; a new
        tensor when None).

        With a scale this is `scaled_round`'s s·Q(x/s), with the division and the product taken
        one parameter at a time so that a 0-dim or per-channel s broadcasts instead of being
        copied out per element, and the rounding in one flat call (one draw for Q_s).
        """
        out = torch.empty_like(w) if out is None else out
        dtype = compute_dtype(w.dtype)
        work = self._work.get("rounding", w, dtype)
        if self.scale == "none":
            if stochastic:
                r = self._counter_uniforms(w)
                return round_stochastic(w, self.grid, self.generator, out, work, r)
            return round_nearest(w, self.grid, out, work)
        u = out if out.dtype == dtype else self._work.get("units", w, dtype)
        # each s as the per-element expansion in w's dtype would hold it
        scales = (
            self._scales if w.dtype == dtype else [s.to(w.dtype).to(dtype) for s in self._scales]
        )
        parts = zip(self._parts(w), scales, self._parts(u))
        for x, s, part in parts:
            torch.div(x.to(dtype), broadcastable(safe_divisor(s), x), out=part)
        if stochastic:
            round_stochastic(u, self.grid, self.generator, u, work, self._counter_uniforms(u))
        else:
            round_nearest(u, self.grid, u, work)
        parts = zip(self._parts(u), scales, self._parts(out))
        for q, s, part in parts:
            if u is out:
                q.mul_(broadcastable(s, q))
            else:
                part.copy_(q * broadcastable(s, q))
        return out

    def _counter_uniforms(self, flat: torch.Tensor) -> torch.Tensor | None:
        """Q_s's uniforms for the flat buffer `flat` with counter uniforms (this step's keys
        drawn from the rounding stream); None with "torch", where `round_stochastic` draws."""
        if self.sr_uniforms != "counter":
            return None
        return counter_uniforms(draw_keys(self.generator), flat.numel(), compute_dtype(flat.dtype))

    def _update_latent_scales_and_weights(self, count_flips: bool = True) -> None:
        """BC after the base step: clip w_r, measure absmean scales, then w_b = Q(w_r)."""
        count_flips = count_flips and self._counting
        latent = self._clip_latent()
        new_wb = self._work.get("result", latent)
        measured = self.scale not in FIXED
        # A measured scale moves every step, and with it every weight's value: a flip is then a
        # change of grid level m (w_b = s·m·Δ), which the old scales tell for the old weights.
        old_levels = self._levels(self._flat_wb) if measured and count_flips else None
        if measured and new_wb.dtype == compute_dtype(latent.dtype):
            # one |w_r| pass over the flat buffer, then a mean per parameter
            a = torch.abs(latent, out=new_wb)
            self._scales = [absmean(self.scale, v) for v in self._parts(a)]
        elif measured:
            self._scales = [measured_scale(self.scale, v) for v in self._views("latent")]
        self._round(latent, self.bc_stochastic, out=new_wb)
        if old_levels is not None:
            self.flips.record((old_levels != self._levels(new_wb)).sum())
        elif count_flips:
            self._count_flips(self._flat_wb, new_wb)
        self._flat_wb.copy_(new_wb)

    def _clip_latent(self) -> torch.Tensor:
        """BC's clip of w_r in place: to the scaled grid's range with a fixed scale, to the
        unscaled one with a measured scale (`scales` module doc); returns the flat w_r."""
        latent = self._buffers["latent"]
        if self.scale in FIXED and self.scale != "none":
            for w_r, s in zip(self._views("latent"), self._scales, strict=True):
                hi = broadcastable(s.to(w_r.dtype) * self.grid.hi, w_r)
                w_r.clamp_(min=-hi, max=hi)
        else:
            latent.clamp_(self.grid.lo, self.grid.hi)
        return latent

    def _levels(self, w: torch.Tensor) -> torch.Tensor:
        """The grid multiple m of every weight w = s·m·Δ under the current scales (flat)."""
        levels = self._work.get("levels-new" if w is not self._flat_wb else "levels-old", w)
        for source, target, s in zip(
            self._parts(w), self._parts(levels), self._scales, strict=True
        ):
            divisor = broadcastable(safe_divisor(s) * self.grid.delta, source).to(w.dtype)
            torch.div(source, divisor, out=target)
        return levels.round_()

    def _count_flips(self, old: torch.Tensor, new: torch.Tensor) -> None:
        if self._counting:  # the rounding scratch is free again by now
            scratch = self._work.get("rounding", old, compute_dtype(old.dtype))
            self.flips.record(count_changed(old, new, scratch))

    # -- the step --------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """One training step: the base step on w (FP), w_r (BC) or w_b (SR, R), then rounding;
        for Bop and Bop2 the flips, then the base step on the full-precision parameters.

        `closure` (optional) re-evaluates the loss and calls backward(); it runs first, at the
        model's quantized weights w_b (BC swaps in w_r only inside the base step), so the
        gradient is g = ∇f̃(w_b) exactly as without a closure. Returns the closure's loss.
        """
        if self.mode == "fp" or not self.quantized:
            return self.base.step(closure)
        self._steps += 1  # this process's steps, which `fused_quant = "auto"` weighs
        # flips are moves between grid levels: a step from or to weights off the grid has none
        on_grid = self.starts_on_grid and not self.float_phase and self.grid_weight == 1
        self._counting = self.track_flips and self.flips.due() and on_grid
        self.flips.advance()
        self._follow_model()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
            # a closure may move the model (rare, but then the buffers must follow it)
            self._follow_model()
        if self.float_phase and self.mode in FLOAT_PHASE:
            self._float_step()
        elif self.mode == "bc":
            self._bc_step()
            if self.grid_weight < 1:
                self._blend_with_latent()
        elif self.mode in FLIPPING:
            self._flip_step()
        else:
            self._rounding_step(stochastic=self.mode == "sr")
        # what the next step starts from (the trainer sets it anew before each of its steps)
        self.starts_on_grid = not self.float_phase and self.grid_weight == 1
        return loss

    def _bc_step(self) -> None:
        self._base_step_on_latent()
        if not self._fused_bc():
            self._update_latent_scales_and_weights()

    def _base_step_on_latent(self) -> None:
        """The base step with each quantized parameter pointing at its w_r (BC)."""
        for p, wr in zip(self.quantized, self._views("latent"), strict=True):
            p.data = wr
        try:
            self.base.step()
        finally:
            for p, wb in zip(self.quantized, self._wb_views, strict=True):
                p.data = wb

    def _float_step(self) -> None:
        """A step of the float phase (module doc): FP's step, BC's w_r still clipped."""
        if self.mode != "bc":
            self.base.step()
            return
        self._base_step_on_latent()
        self._flat_wb.copy_(self._clip_latent())

    def _blend_with_latent(self) -> None:
        """A step of a ramp onto the grid: w_b ← w_r + λ(w_b − w_r), w_b = Q(w_r) on entry."""
        latent = self._buffers["latent"]
        torch.lerp(latent, self._flat_wb, self.grid_weight, out=self._flat_wb)

    def hold_float_weights(self) -> None:
        """Let the model hold BC's float weights clip(w_r), as a float phase's step leaves
        them: the trainer calls it before the first step of a run that starts in float or on a
        ramp, whose first forward pass would otherwise see Q(w_r). SR and R hold their only
        copy already."""
        if self.mode == "bc":
            self._follow_model()
            self._flat_wb.copy_(self._clip_latent())

    def end_float_phase(self) -> None:
        """Leave the float phase (module doc): the base optimizer's state of the quantized
        parameters (Adam's moments and step count, SGD's momentum) starts afresh, since the
        gradients at grid weights differ in scale from those at the float weights it was
        kept for; the next `step` rounds. The trainer calls it before step F, the first
        quantized one, whether or not this process took the float steps (a run resumed
        there), so that the restart is a function of the step alone."""
        self.float_phase = False
        self.starts_on_grid = False  # the next step starts from the float weights
        for p in self.quantized:
            self.base.state.pop(p, None)

    def round_float_weights(self) -> None:
        """Put the weights on the grid now, for a run that ends inside its float phase or its
        ramp onto the grid (a time budget's cut): BC's w_b = Q(w_r) as its step rounds (w_r
        kept), SR's and R's w_b to the nearest level (their only copy, so the float values
        are gone). The float phase and the ramp are over."""
        self.float_phase = False
        self.grid_weight = 1.0
        if self.mode == "bc":
            self._update_latent_scales_and_weights(count_flips=False)
        elif self.mode in FLOAT_PHASE:
            self._round(self._flat_wb, stochastic=False, out=self._flat_wb)

    def _rounding_step(self, stochastic: bool) -> None:
        old = None
        if self._counting:
            old = self._work.get("result", self._flat_wb)
            old.copy_(self._flat_wb)
        self.base.step()
        if self._fused_rounding(stochastic, old):
            return
        self._round(self._flat_wb, stochastic, out=self._flat_wb)
        if self._counting:
            self._count_flips(old, self._flat_wb)

    # -- the fused step (qtrain.methods.fused) ---------------------------------------------
    def _fused_steps(self) -> FusedSteps | None:
        """The compiled steps for the buffers' device and dtype (rebuilt after a model move),
        or None where the eager step is taken."""
        if self.fused_quant == "off":
            return None
        auto = self.fused_quant == "auto"
        counter = self.sr_uniforms == "counter"
        if auto and not pays(self.mode, self.grid.kind, self.num_quantized, self._steps, counter):
            return None
        key = (self._flat_wb.device, self._flat_wb.dtype)
        if self._fused_key != key:
            self._fused_key = key
            self._fused = self._build_fused(*key)
        return None if self._fused is None or self._fused.failed else self._fused

    def _build_fused(self, device: torch.device, dtype: torch.dtype) -> FusedSteps | None:
        if not applies(self.mode, self.scale, dtype, self.bc_stochastic):
            return None
        self._segments = segments(self.quantized, per_row=self.scale == "absmean")
        self._segmented = {}
        if self._segments is None:
            return None
        steps = FusedSteps(announce=self.fused_quant == "on")
        if not compiler_found(device):
            steps.failed = True
            steps.warn(f"inductor finds no compiler for {device.type}")
        return steps

    def _parts_of(self, name: str, flat: torch.Tensor) -> list[torch.Tensor]:
        """Each parameter's slice of the flat buffer `flat` as (rows, numel/rows) (`fused.
        segment_views`), made once per buffer. The compiled steps write these views, each
        an input of its own, in place; a slice of one flat input that the kernel writes
        would be scattered back into a copy of the whole buffer, parameter by parameter."""
        made = self._segmented.get(name)
        if made is None or made[0] is not flat:
            made = (flat, segment_views(flat, self._segments))
            self._segmented[name] = made
        return made[1]

    def _fused_bc(self) -> bool:
        """BC's clip, scales, rounding and flip count as compiled passes; False: not taken."""
        fused = self._fused_steps()
        if fused is None:
            return False
        latent, wb, count = self._buffers["latent"], self._flat_wb, self._counting
        latents, wbs = self._parts_of("latent", latent), self._parts_of("wb", wb)
        grid = self.grid
        if self.scale in FIXED:
            build = lambda: bc_step(grid, self.scale, count)  # noqa: E731
            done, flips = fused.run(f"bc-{count}", build, latents, wbs, self._scales)
        else:
            a = self._work.get("result", latent)
            done, _ = fused.run("bc-prepare", lambda: bc_measured_prepare(grid), latent, a)
            if not done:
                return False
            old_scales = self._scales
            self._scales = [absmean(self.scale, v) for v in self._parts(a)]
            build = lambda: bc_measured_step(grid, count)  # noqa: E731
            done, flips = fused.run(f"bc-measured-{count}", build, latents, wbs, self._scales,
                                    old_scales)  # fmt: skip
            if not done:  # the eager step clips again (no change) and measures again
                self._scales = old_scales
        if done and count:
            self.flips.record(flips)
        return done

    def _fused_rounding(self, stochastic: bool, old: torch.Tensor | None) -> bool:
        """SR's or R's rounding and flip count as one compiled pass; False: not taken.

        SR's uniforms are drawn here by the eager path's `torch.rand` call (one draw of the
        flat buffer's shape from the same generator), or with counter uniforms their two keys
        are, and the kernel hashes them with each weight's index; if the first compilation
        fails, the generator is put back so that the eager step draws the very same numbers.
        """
        fused = self._fused_steps()
        if fused is None:
            return False
        wb, count = self._flat_wb, old is not None
        name = f"round-{stochastic}-{count}"
        counter = stochastic and self.sr_uniforms == "counter"
        r, saved = None, None
        if stochastic:
            saved = None if fused.ready(name) else self.generator.get_state()
        if counter:
            r = draw_keys(self.generator)
        elif stochastic:
            r = self._work.get("uniforms", wb)
            torch.rand(wb.shape, generator=self.generator, out=r)
        build = lambda: rounding_step(self.grid, self.scale, self._segments, stochastic, count,  # noqa: E731
                                      counter)  # fmt: skip
        done, flips = fused.run(name, build, self._parts_of("wb", wb), old, r, self._scales)
        if not done:
            if saved is not None:
                self.generator.set_state(saved)
            return False
        if count:
            self.flips.record(flips)
        return True

    def _flip_step(self) -> None:
        group = self.param_groups[self._group_index]
        g = self._work.get("gradient", self._flat_wb).zero_()  # kept between steps
        for view, p in zip(self._work.views(g), self.quantized, strict=True):
            if p.grad is not None:
                view.copy_(p.grad)
        w, m = self._flat_wb, self._buffers["m"]
        if self.mode == "bop":
            flips = bop_flips_(w, g, m, group["gamma"], group["tau"])
        else:
            v = self._buffers["v"]
            flips = bop2_flips_(w, g, m, v, group["gamma"], group["sigma"], group["tau"])
        torch.where(flips, w.neg(), w, out=w)
        if self._counting:
            self.flips.record(flips.sum())
        # without a gradient the base optimizer skips a parameter and keeps no state for it
        grads = [p.grad for p in self.quantized]
        for p in self.quantized:
            p.grad = None
        try:
            self.base.step()
        finally:
            for p, grad in zip(self.quantized, grads, strict=True):
                p.grad = grad

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._follow_model()
        self.base.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        if not hasattr(self, "base"):  # called by Optimizer.__init__ while sharing groups
            return super().add_param_group(param_group)
        self.base.add_param_group(param_group)
        self.param_groups = self.base.param_groups

    # -- diagnostics -----------------------------------------------------------------------
    @property
    def num_quantized(self) -> int:
        """d: the number of quantized weights."""
        return 0 if self._flat_wb is None else self._flat_wb.numel()

    @property
    def learning_rate(self) -> float | None:
        """The learning rate α the run reports: the `lr` of the first parameter group that is
        trained with α. Bop's and Bop2's quantized group flips signs with γ and τ and never
        reads its `lr`, so for them it is the full-precision group's; None when no group uses
        an `lr` (every parameter binary under Bop)."""
        for i, group in enumerate(self.param_groups):
            if i != self._group_index:
                return group["lr"]
        return None

    def reset_flip_stats(self) -> None:
        """Start a new accumulation window (the trainer calls this at each epoch start)."""
        device = self._flat_wb.device if self._flat_wb is not None else "cpu"
        self.flips.reset(device)

    def flip_rate(self) -> float:
        """Fraction of quantized weights that changed grid level in the last step (with a fixed
        scale: changed value)."""
        return self.flips.rate(self.num_quantized)

    def mean_flip_rate(self) -> float:
        """Mean per-step flip fraction since `reset_flip_stats()` (e.g. over an epoch)."""
        return self.flips.mean_rate(self.num_quantized)

    def latent_gap(self) -> float | None:
        """BC's mean gap (1/d)‖w_b − w_r‖₁ (Figure 7); None for methods without w_r."""
        if "latent" not in self._buffers:
            return None
        self._follow_model()
        latent = self._buffers["latent"]
        return float((self._flat_wb.double() - latent.double()).abs().mean())

    def latent_weights(self) -> list[torch.Tensor]:
        """BC's real-valued weights w_r, one view per quantized parameter (empty otherwise)."""
        if "latent" not in self._buffers:
            return []
        self._follow_model()
        return list(self._views("latent"))

    def scales(self) -> list[torch.Tensor]:
        """The scale s of each quantized parameter: 0-dim, or (C,) per output channel.

        Each quantized weight is s·l with l a level of `grid` (1 everywhere for scale 'none').
        """
        self._follow_model()
        return list(self._scales)

    # -- checkpointing ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The base optimizer's state plus w_r (BC), m and v (Bop), the scales, the rounding
        generator and the flip counters."""
        self._follow_model()
        return {"base": self.base.state_dict(), "quantization": quantization_state(self)}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a `state_dict()`; the next step is then bit-identical to the original's."""
        base_state, q = split_saved(state_dict)
        self._follow_model()  # the generator's device is compared after a move, not before
        check_saved_settings(self, q)
        self.base.load_state_dict(base_state)
        # Optimizer.load_state_dict replaces the base's group list: share it again.
        self.param_groups = self.base.param_groups
        self.state = self.base.state
        for name, flat in self._buffers.items():
            flat.copy_(q[name])
        if q.get("scales") is not None:
            saved = zip(q["scales"], self._scales, strict=True)
            self._scales = [s.to(own.device, own.dtype) for s, own in saved]
        if self.generator is not None and q["generator"] is not None:
            self.generator.set_state(q["generator"])
        if q.get("flips") is not None:
            self.flips.load(q["flips"])

    def __repr__(self) -> str:
        return (
            f"QuantizedOptimizer(mode={self.mode}, grid={self.grid.describe()}, "
            f"scale={self.scale}, quantized={self.num_quantized}, base={type(self.base).__name__})"
        )
