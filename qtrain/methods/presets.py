"""Named training methods: `create("bc-adam", model, lr=0.01)` and friends.

A preset name is `<mode>-<base>`: mode ∈ {fp, bc, sr, r} (docs/paper.md §2) with base ∈ {sgd,
adam, adamw}, or one of the latent-free flip methods bop-adam and bop2-adam (§6), whose base
Adam trains only the full-precision parameters.

| preset      | paper name  | quantized weights start from            |
|-------------|-------------|-----------------------------------------|
| fp-*        | "ADAM"      | the model's own initialisation          |
| bc-*        | "BC-ADAM"   | w_r = the model's initialisation        |
| sr-*        | "SR-ADAM"   | Rademacher signs ±Δ                     |
| r-*         | "R-ADAM"    | Rademacher signs ±Δ                     |
| bop-adam    | "Bop"       | Rademacher signs ±Δ                     |
| bop2-adam   | "Bop2"      | Rademacher signs ±Δ                     |

Defaults: Adam and AdamW β = (0.9, 0.999), ε = 1e-8; SGD momentum 0.9; no weight decay
[docs/paper.md]. With AdamW, `weight_decay` is the decoupled λ (w ← w − αλw before the Adam
step). Scaled grids multiply every level by the scale s (`qtrain.methods.scales`); Rademacher
signs are then ±s·Δ; with a measured scale (absmean, BC only) s is measured from the weights
the signs replace, so `init="rademacher"` keeps the magnitude of the model's initialisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from qtrain.base.errors import UserError
from qtrain.base.names import unknown_name
from qtrain.base.streams import stream_generator
from qtrain.methods.bop import BOP2_DEFAULTS, BOP_DEFAULTS
from qtrain.methods.flips import check_flip_every
from qtrain.methods.optimizer import FLIPPING, QuantizedOptimizer, check_grid
from qtrain.methods.policy import check_policy, split_parameters
from qtrain.methods.scales import (
    broadcastable,
    check_scale,
    fixed_scale,
    measured_scale,
    on_scaled_grid,
    scaled_round,
)
from qtrain.quant import Grid, parse_grid
from qtrain.quant.uniforms import check_source

BASE_OPTIMIZERS = ("sgd", "adam", "adamw")
BASE_NAMES = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW"}
MODE_NAMES = {
    "fp": "full precision",
    "bc": "BinaryConnect",
    "sr": "stochastic rounding",
    "r": "deterministic rounding",
    "bop": "Bop (latent-free flips)",
    "bop2": "second-order Bop",
}
METHODS = tuple(
    f"{mode}-{base}" for mode in ("fp", "bc", "sr", "r") for base in BASE_OPTIMIZERS
) + tuple(f"{mode}-adam" for mode in FLIPPING)
INITS = ("auto", "rademacher", "round", "keep")


@dataclass(frozen=True)
class MethodSpec:
    """A parsed preset name."""

    mode: str
    base: str

    @property
    def name(self) -> str:
        return f"{self.mode}-{self.base}"

    @property
    def paper_name(self) -> str:
        if self.mode in FLIPPING:
            return self.mode.capitalize()
        base = self.base.upper()
        return base if self.mode == "fp" else f"{self.mode.upper()}-{base}"

    @property
    def describe(self) -> str:
        return f"{MODE_NAMES[self.mode]} with {BASE_NAMES[self.base]}"


def parse_method(name: str) -> MethodSpec:
    """`MethodSpec` of a preset name such as 'sr-adam'; ValueError with a suggestion."""
    key = str(name).strip().lower().replace("_", "-")
    if key not in METHODS:
        raise unknown_name("method", name, METHODS)
    mode, base = key.split("-")
    return MethodSpec(mode, base)


def list_methods() -> list[str]:
    return list(METHODS)


@torch.no_grad()
def rademacher_(params: list[torch.Tensor], grid: Grid, generator: torch.Generator) -> None:
    """Overwrite each tensor with independent Rademacher signs: ±Δ with probability ½ each."""
    for p in params:
        signs = torch.randint(0, 2, p.shape, generator=generator, device="cpu")
        p.copy_((signs * 2 - 1).to(p.dtype) * grid.delta)


# The kernels the base optimizer runs (PyTorch's `foreach` and `fused` implementations).
OPTIMIZER_IMPLS = ("foreach", "fused")


def _base_optimizer(spec: MethodSpec, groups, lr, weight_decay, momentum, betas, eps, impl):
    # foreach: one call per group instead of a Python loop over the tensors (PyTorch's default
    # on a CPU). The results are the loop's bit for bit (tests/test_methods.py), and a small
    # model's step is shorter: the loop takes 1.05-1.06x the time of tiny_cnn's step at batch
    # 32 on one thread (benchmarks/bench_step_overhead.py; no difference on the GPT).
    # fused: one kernel that reads and writes each tensor once where foreach makes a pass per
    # operation; the same formula, whose results differ from the loop's in the last bit (the
    # order of its operations and fused multiply-adds), so it is a setting of the run.
    common = {"lr": lr, "weight_decay": weight_decay, impl: True}
    if spec.base == "adamw":
        return torch.optim.AdamW(groups, betas=betas, eps=eps, **common)
    if spec.base == "adam":
        return torch.optim.Adam(groups, betas=betas, eps=eps, **common)
    return torch.optim.SGD(groups, momentum=momentum, **common)


def _flip_settings(mode: str, gamma, tau, sigma) -> dict:
    """Bop's group keys (None → the method's default); refuses them for other methods."""
    given = {"bop_gamma": gamma, "bop_tau": tau, "bop_sigma": sigma}
    if mode not in FLIPPING:
        extra = [k for k, v in given.items() if v is not None]
        if extra:
            raise UserError(
                f"{', '.join(extra)} only {'applies' if len(extra) == 1 else 'apply'} to "
                f"bop-adam and bop2-adam; leave {'it' if len(extra) == 1 else 'them'} unset "
                "for this method"
            )
        return {}
    if mode == "bop" and sigma is not None:
        raise UserError("bop_sigma only applies to bop2-adam; leave it unset for bop-adam")
    defaults = BOP_DEFAULTS if mode == "bop" else BOP2_DEFAULTS
    settings = {}
    for key, default in defaults.items():
        value = given[f"bop_{key}"]
        value = default if value is None else value
        _check_positive(f"bop_{key}", value)
        settings[key] = float(value)
    return settings


def check_settings(
    name: str,
    lr: float,
    *,
    grid: str | Grid = "binary",
    delta: float | None = None,
    policy: str = "conv",
    scale: str = "none",
    weight_decay: float = 0.0,
    bop_gamma: float | None = None,
    bop_tau: float | None = None,
    bop_sigma: float | None = None,
    optimizer_impl: str = "foreach",
    sr_uniforms: str = "torch",
    flip_every: int = 1,
) -> tuple[MethodSpec, Grid, dict]:
    """Check every setting `create` takes, without a model: (method, grid, Bop settings).

    Raises ValueError naming the first bad setting and its fix, so callers (the trainer) can
    refuse a run before any data is read.
    """
    spec = parse_method(name)
    check_policy(policy)
    grid = parse_grid(grid, delta)
    check_scale(scale, spec.mode)
    check_grid(spec.mode, grid)
    _check_positive("learning rate", lr)
    _check_nonnegative("weight decay", weight_decay)
    if optimizer_impl not in OPTIMIZER_IMPLS:
        raise unknown_name("optimizer_impl", optimizer_impl, OPTIMIZER_IMPLS)
    check_source(sr_uniforms)
    check_flip_every(flip_every)
    return spec, grid, _flip_settings(spec.mode, bop_gamma, bop_tau, bop_sigma)


def create(
    name: str,
    model: nn.Module,
    lr: float,
    *,
    grid: str | Grid = "binary",
    delta: float | None = None,
    policy: str = "conv",
    scale: str = "none",
    seed: int = 0,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    bc_stochastic: bool = False,
    bop_gamma: float | None = None,
    bop_tau: float | None = None,
    bop_sigma: float | None = None,
    optimizer_impl: str = "foreach",
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    init: str = "auto",
    track_flips: bool = True,
    flip_every: int = 1,
    fused_quant: str = "off",
    sr_uniforms: str = "torch",
) -> QuantizedOptimizer:
    """Build the named method's optimizer over `model` and put the model's weights on the grid.

    `init` sets where quantized weights start: 'auto' (for SR, R, Bop and Bop2 Rademacher
    signs [paper], unless every quantized weight is already on its grid, as when a framework
    restores a checkpoint before building the optimizer; for BC the model's own
    initialisation), 'rademacher', 'round' (Q_d of the current weights, e.g. to fine-tune a
    float model) or 'keep' (they must already be on the grid).
    Parameter groups: `quantized` and `full_precision`, in that order; for Bop the quantized
    group also holds `gamma`, `tau` (and `sigma` for Bop2), from `bop_*` or the defaults in
    `qtrain.methods.bop`.

    `delta=None` takes the grid's default Δ (end levels at ±1: Δ = 1 for binary and ternary,
    1/(2^k − 1) for k bits; see `qtrain.quant.grids`). `scale` is one of
    `qtrain.methods.SCALES`. Randomness comes from the run seed's streams
    (`qtrain.base.streams`): "grid-init" for the Rademacher draw, "rounding" for Q_s.
    `fused_quant` ("off", "on", "auto") rounds after the base step in one compiled loop
    (`qtrain.methods.fused`), with the same numbers. `optimizer_impl` picks the base
    optimizer's kernels: "foreach" (PyTorch's loop, bit for bit) or "fused" (one kernel a
    step; the same formula, rounded differently in the last bit). `sr_uniforms` picks where
    stochastic rounding's uniforms come from (`qtrain.quant.uniforms`): "torch" or "counter".
    `flip_every` counts flips on every k-th step only (`qtrain.methods.flips`).
    """
    spec, grid, flip_settings = check_settings(
        name,
        lr,
        grid=grid,
        delta=delta,
        policy=policy,
        scale=scale,
        weight_decay=weight_decay,
        bop_gamma=bop_gamma,
        bop_tau=bop_tau,
        bop_sigma=bop_sigma,
        optimizer_impl=optimizer_impl,
        sr_uniforms=sr_uniforms,
        flip_every=flip_every,
    )
    if init not in INITS:
        raise unknown_name("init", init, INITS)
    quantized, full = split_parameters(model, policy)
    if spec.mode == "fp":
        quantized, full = [], quantized + full
    if spec.mode != "fp":
        _initialise(quantized, spec.mode, grid, scale, init, seed)
    groups = [
        {"params": quantized, "name": "quantized", **flip_settings},
        {"params": full, "name": "full_precision"},
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise UserError("the model has no trainable parameters to optimize")
    base = _base_optimizer(spec, groups, lr, weight_decay, momentum, betas, eps, optimizer_impl)
    return QuantizedOptimizer(
        base,
        quantized,
        spec.mode,
        grid,
        scale=scale,
        seed=seed,
        bc_stochastic=bc_stochastic,
        track_flips=track_flips,
        flip_every=flip_every,
        fused_quant=fused_quant,
        sr_uniforms=sr_uniforms,
    )


@torch.no_grad()
def _initialise(quantized, mode: str, grid: Grid, scale: str, init: str, seed: int) -> None:
    """Put the quantized weights where `init` says; latent-free methods onto the scaled grid."""
    latent_free = mode != "bc"
    if init == "auto" and latent_free and _all_on_grid(quantized, grid, scale):
        return  # restored weights (a framework resuming a checkpoint): keep them
    if init == "rademacher" or (init == "auto" and latent_free):
        # a measured scale is that of the weights the signs replace
        scales = [_start_scale(scale, p) for p in quantized]
        rademacher_(quantized, grid, stream_generator(seed, "grid-init"))
        if scale != "none":
            for p, s in zip(quantized, scales, strict=True):
                p.mul_(broadcastable(s, p).to(p.dtype))
    elif init == "round":
        for p in quantized:
            s = fixed_scale(scale, p)
            if s is None:  # measured scales: BC re-rounds w_r after building anyway
                continue
            p.copy_(scaled_round(p, broadcastable(s, p), grid, stochastic=False))


def _start_scale(scale: str, p: torch.Tensor) -> torch.Tensor:
    """The scale s of p's Rademacher start ±s·Δ: the fixed one, or a measured one (absmean)
    taken from p's weights before the draw."""
    s = fixed_scale(scale, p)
    return measured_scale(scale, p) if s is None else s


def _all_on_grid(quantized, grid: Grid, scale: str) -> bool:
    """True when every weight already lies on its (fixed-scale) grid, as a restored one does;
    a network's random initialisation never does."""
    return all(on_scaled_grid(p, broadcastable(fixed_scale(scale, p), p), grid) for p in quantized)


def _check_positive(what: str, value: float) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise UserError(f"{what} must be a finite number > 0, got {value!r}")


def _check_nonnegative(what: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise UserError(f"{what} must be a finite number >= 0, got {value!r}")
