"""The quantized optimizer: FP, BC, SR and R over any `torch.optim` optimizer (docs/paper.md §2).

A training method decides two things only: where the real-valued state lives and how values
are put back on the grid after each step. With u(·) the base optimizer's step direction
(SGD: the gradient, Adam: m̂/(√v̂ + ε)) and f̃ the minibatch loss:

| mode | state kept                  | update                                                 |
|------|-----------------------------|--------------------------------------------------------|
| fp   | w                           | w ← w − α u(∇f̃(w))                                     |
| r    | w_b on the grid, no copy    | w_b ← Q_d(w_b − α u(∇f̃(w_b)))                          |
| sr   | w_b on the grid, no copy    | w_b ← Q_s(w_b − α u(∇f̃(w_b)))          (rule (6))      |
| bc   | latent w_r; w_b = Q(w_r)    | w_r ← clip(w_r − α u(∇f̃(w_b))); w_b ← Q_d(w_r)         |

The model always holds w_b, so the gradient is always taken at the quantized weights and
after every step each quantized parameter is exactly on its grid. BC keeps w_r inside this
optimizer and, for the duration of the base step, points each quantized parameter at its
latent copy, so the base optimizer (and its weight decay) updates w_r; the base optimizer's
moments stay in full precision.

All quantized parameters are re-homed into one flat buffer (views with the original shapes
and strides, so channels_last survives), so rounding, clipping and flip counting are one
vectorised call per step rather than one per tensor.

Moving or casting the model after the optimizer was built (`model.to(device)`, `.double()`,
`.to(memory_format=torch.channels_last)`) replaces the parameters' memory. Every step,
`zero_grad`, `state_dict` and diagnostic first checks pointers (no values) and follows such a
move exactly: new flat buffers on the new device, dtype and layout; w_b re-rounded to the same
levels in the new dtype; w_r, the base optimizer's state and the flip counters carried over;
the rounding generator carried over (re-seeded from one draw of it across device types). A
narrowing cast (float32 → float16 or bfloat16, ...) would round w_r and the Adam moments, so it
is refused with a sentence: cast the model before building the optimizer.
"""

from __future__ import annotations

import torch
from torch import nn

from qtrain.base.streams import stream_generator
from qtrain.methods.flat import (
    check_dense,
    check_widening,
    flat_views,
    generator_on,
    moved,
)
from qtrain.quant import Grid, round_nearest, round_stochastic

MODES = ("fp", "bc", "sr", "r")


class QuantizedOptimizer(torch.optim.Optimizer):
    """Wraps a base optimizer and keeps the chosen parameters on `grid` (see module doc).

    Args:
        base: any `torch.optim.Optimizer` over all trainable parameters.
        quantized: the parameters to quantize (a subset of the base optimizer's).
        mode: 'fp', 'bc', 'sr' or 'r'.
        grid: the grid quantized weights live on.
        seed: the run seed; stochastic rounding (SR, stochastic BC) draws from its stream
            "rounding" (`qtrain.base.streams`).
        bc_stochastic: BC writes Q_s(w_r) instead of Q_d(w_r) into the model
            (the stochastic BinaryConnect variant).
        track_flips: count how many quantized weights change per step (one comparison).

    The param groups and state are the base optimizer's own objects, so LR schedulers, param
    group edits and `zero_grad` act on both. Closures are not supported: the loss must be
    evaluated at w_b before `step()`.
    """

    def __init__(
        self,
        base: torch.optim.Optimizer,
        quantized: list[nn.Parameter],
        mode: str,
        grid: Grid,
        *,
        seed: int = 0,
        bc_stochastic: bool = False,
        track_flips: bool = True,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown training mode {mode!r}; choose one of {', '.join(MODES)}")
        if not isinstance(base, torch.optim.Optimizer):
            raise TypeError(f"base must be a torch.optim.Optimizer, got {type(base).__name__}")
        # Sharing the group dicts (Optimizer.__init__ appends the very same dict objects)
        # makes LR schedulers that edit our groups edit the base optimizer's groups.
        super().__init__(base.param_groups, base.defaults)
        self.base = base
        self.state = base.state
        self.mode = mode
        self.grid = grid
        self.seed = int(seed)
        self.bc_stochastic = bool(bc_stochastic)
        self.track_flips = bool(track_flips)
        self.quantized = [] if mode == "fp" else list(quantized)
        self._check_quantized_params()

        self._wb_views: list[torch.Tensor] = []
        self._wr_views: list[torch.Tensor] = []
        self._flat_wb = self._flat_wr = None
        self.generator = None
        self._flips_last = None
        self._flips_sum = None
        self._steps_since_reset = 0
        if self.quantized:
            self._rehome_parameters()
        self.reset_flip_stats()

    # -- set-up ----------------------------------------------------------------------------
    def _check_quantized_params(self) -> None:
        owned = {id(p) for g in self.param_groups for p in g["params"]}
        for p in self.quantized:
            if id(p) not in owned:
                raise ValueError(
                    "a quantized parameter is not optimized by the base optimizer; "
                    "build the base optimizer over all of the model's trainable parameters"
                )
            check_dense(p)
            if not p.is_floating_point():
                raise ValueError("quantized parameters must be floating point tensors")
            if self.mode in ("sr", "r") and not self.grid.contains(p.detach()):
                raise ValueError(
                    f"{self.mode.upper()} keeps no float copy, so its parameters must start on "
                    f"the grid {self.grid.describe()}; initialise them with "
                    "qtrain.methods.rademacher_() or round them with round_nearest() first"
                )
        devices = {p.device for p in self.quantized}
        dtypes = {p.dtype for p in self.quantized}
        if len(devices) > 1 or len(dtypes) > 1:
            raise ValueError(
                "all quantized parameters must share one device and dtype; move the model "
                "with model.to(device, dtype) before building the optimizer"
            )

    def _rehome_parameters(self) -> None:
        """Move w_b (and BC's w_r) into flat buffers that the parameters view."""
        first = self.quantized[0]
        total = sum(p.numel() for p in self.quantized)
        self._flat_wb = torch.empty(total, dtype=first.dtype, device=first.device)
        self._wb_views = flat_views(self.quantized, self._flat_wb)
        with torch.no_grad():
            for p, view in zip(self.quantized, self._wb_views, strict=True):
                view.copy_(p)
                p.data = view
            if self.mode == "bc":
                self._flat_wr = self._flat_wb.clamp(self.grid.lo, self.grid.hi)
                self._wr_views = flat_views(self.quantized, self._flat_wr)
                self._flat_wb.copy_(self._round(self._flat_wr, stochastic=self.bc_stochastic))
        self.generator = stream_generator(self.seed, "rounding", first.device)

    def _follow_model(self) -> None:
        """Re-home the buffers when the model was moved or cast since the last call (module doc)."""
        if not self.quantized or not moved(self.quantized, self._wb_views):
            return
        devices = {p.device for p in self.quantized}
        dtypes = {p.dtype for p in self.quantized}
        if len(devices) > 1 or len(dtypes) > 1:
            raise ValueError(
                "the quantized parameters were moved to different devices or dtypes after the "
                "optimizer was built; move the whole model with model.to(device, dtype)"
            )
        device, dtype = devices.pop(), dtypes.pop()
        check_widening(self._flat_wb.dtype, dtype)
        old_wr_views = self._wr_views
        total = self._flat_wb.numel()
        self._flat_wb = torch.empty(total, dtype=dtype, device=device)
        self._wb_views = flat_views(self.quantized, self._flat_wb)
        with torch.no_grad():
            for p, view in zip(self.quantized, self._wb_views, strict=True):
                # levels of the old dtype are the same levels, re-expressed exactly in the new one
                view.copy_(round_nearest(p, self.grid))
                p.data = view
            if self._flat_wr is not None:
                self._flat_wr = torch.empty(total, dtype=dtype, device=device)
                self._wr_views = flat_views(self.quantized, self._flat_wr)
                for new, old in zip(self._wr_views, old_wr_views, strict=True):
                    new.copy_(old)
        self.generator = generator_on(self.generator, device)
        self._flips_sum = self._flips_sum.to(device)
        self._flips_last = self._flips_last.to(device)
        # torch's own load rule casts each floating state tensor to its parameter's device and
        # dtype (keeping Adam's step counter as it is), for every parameter the model moved
        self.base.load_state_dict(self.base.state_dict())
        self.param_groups = self.base.param_groups
        self.state = self.base.state

    # -- the step --------------------------------------------------------------------------
    def _round(self, w: torch.Tensor, stochastic: bool) -> torch.Tensor:
        if stochastic:
            return round_stochastic(w, self.grid, self.generator)
        return round_nearest(w, self.grid)

    def _count_flips(self, old: torch.Tensor, new: torch.Tensor) -> None:
        if self.track_flips:
            self._flips_last = (old != new).sum()
            self._flips_sum += self._flips_last
            self._steps_since_reset += 1

    @torch.no_grad()
    def step(self, closure=None):
        """One training step: the base step on w (FP), w_r (BC) or w_b (SR, R), then rounding."""
        if closure is not None and self.mode != "fp":
            raise ValueError(
                "quantized methods do not support step(closure): compute the loss and call "
                "backward() at the model's quantized weights, then call step()"
            )
        if self.mode == "fp" or not self.quantized:
            return self.base.step(closure)
        self._follow_model()
        if self.mode == "bc":
            self._bc_step()
        else:
            self._rounding_step(stochastic=self.mode == "sr")
        return None

    def _bc_step(self) -> None:
        for p, wr in zip(self.quantized, self._wr_views, strict=True):
            p.data = wr
        try:
            self.base.step()
        finally:
            for p, wb in zip(self.quantized, self._wb_views, strict=True):
                p.data = wb
        self._flat_wr.clamp_(self.grid.lo, self.grid.hi)
        new_wb = self._round(self._flat_wr, stochastic=self.bc_stochastic)
        self._count_flips(self._flat_wb, new_wb)
        self._flat_wb.copy_(new_wb)

    def _rounding_step(self, stochastic: bool) -> None:
        old = self._flat_wb.clone() if self.track_flips else None
        self.base.step()
        new_wb = self._round(self._flat_wb, stochastic=stochastic)
        if old is not None:
            self._count_flips(old, new_wb)
        self._flat_wb.copy_(new_wb)

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

    def reset_flip_stats(self) -> None:
        """Start a new accumulation window (the trainer calls this at each epoch start)."""
        device = self._flat_wb.device if self._flat_wb is not None else "cpu"
        self._flips_sum = torch.zeros((), dtype=torch.float64, device=device)
        self._flips_last = torch.zeros((), dtype=torch.float64, device=device)
        self._steps_since_reset = 0

    def flip_rate(self) -> float:
        """Fraction of quantized weights that changed value in the last step."""
        self._follow_model()
        return float(self._flips_last) / self.num_quantized if self.num_quantized else 0.0

    def mean_flip_rate(self) -> float:
        """Mean per-step flip fraction since `reset_flip_stats()` (e.g. over an epoch)."""
        if not self.num_quantized or not self._steps_since_reset:
            return 0.0
        self._follow_model()
        return float(self._flips_sum) / (self.num_quantized * self._steps_since_reset)

    def latent_gap(self) -> float | None:
        """BC's mean gap (1/d)‖w_b − w_r‖₁ (Figure 7); None for methods without w_r."""
        if self.mode != "bc" or self._flat_wr is None:
            return None
        self._follow_model()
        return float((self._flat_wb.double() - self._flat_wr.double()).abs().mean())

    def latent_weights(self) -> list[torch.Tensor]:
        """BC's real-valued weights w_r, one view per quantized parameter (empty otherwise)."""
        self._follow_model()
        return list(self._wr_views)

    # -- checkpointing ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The base optimizer's state plus w_r (BC), the rounding generator, flip counters."""
        self._follow_model()
        return {
            "base": self.base.state_dict(),
            "quantization": {
                "mode": self.mode,
                "grid": self.grid.to_dict(),
                "bc_stochastic": self.bc_stochastic,
                "num_quantized": self.num_quantized,
                "latent": None if self._flat_wr is None else self._flat_wr.clone(),
                "generator": None if self.generator is None else self.generator.get_state(),
                "generator_device": None if self.generator is None else self.generator.device.type,
                "flips": {
                    "sum": self._flips_sum.clone(),
                    "last": self._flips_last.clone(),
                    "steps": self._steps_since_reset,
                },
            },
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a `state_dict()`; the next step is then bit-identical to the original's."""
        try:
            base_state, q = state_dict["base"], state_dict["quantization"]
        except (KeyError, TypeError):
            raise ValueError(
                "this optimizer state was not saved by a qtrain QuantizedOptimizer; "
                "load a checkpoint written by qtrain"
            ) from None
        if q["mode"] != self.mode or Grid.from_dict(q["grid"]) != self.grid:
            raise ValueError(
                f"the saved optimizer state is for {q['mode']} on "
                f"{Grid.from_dict(q['grid']).describe()}, not {self.mode} on "
                f"{self.grid.describe()}; resume with the method and grid it was trained with"
            )
        if bool(q.get("bc_stochastic", False)) != self.bc_stochastic:
            raise ValueError(
                f"the saved optimizer state was trained with bc_stochastic="
                f"{bool(q.get('bc_stochastic'))}, not {self.bc_stochastic}; resume with the "
                "setting it was trained with"
            )
        self._follow_model()
        saved_device = q.get("generator_device")
        if (
            self.generator is not None
            and saved_device is not None
            and saved_device != self.generator.device.type
        ):
            raise ValueError(
                f"the saved rounding generator ran on a {saved_device} device but this optimizer "
                f"rounds on {self.generator.device.type}, and their random states do not "
                f"convert; resume with the model on a {saved_device} device"
            )
        if q["num_quantized"] != self.num_quantized:
            raise ValueError(
                f"the saved optimizer state quantizes {q['num_quantized']} weights but this "
                f"model has {self.num_quantized}; resume with the same model and policy"
            )
        self.base.load_state_dict(base_state)
        # Optimizer.load_state_dict replaces the base's group list: share it again.
        self.param_groups = self.base.param_groups
        self.state = self.base.state
        if self._flat_wr is not None:
            self._flat_wr.copy_(q["latent"])
        if self.generator is not None and q["generator"] is not None:
            self.generator.set_state(q["generator"])
        flips = q.get("flips")
        if flips is not None:
            self._flips_sum.copy_(flips["sum"])
            self._flips_last.copy_(flips["last"])
            self._steps_since_reset = int(flips["steps"])

    def __repr__(self) -> str:
        return (
            f"QuantizedOptimizer(mode={self.mode}, grid={self.grid.describe()}, "
            f"quantized={self.num_quantized}, base={type(self.base).__name__})"
        )
