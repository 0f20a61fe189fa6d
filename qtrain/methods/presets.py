"""Named training methods: `create("bc-adam", model, lr=0.01)` and friends.

A preset name is `<mode>-<base>`: mode ∈ {fp, bc, sr, r} (docs/paper.md §2), base ∈ {sgd, adam}.

| preset   | paper name | quantized weights start from            |
|----------|------------|-----------------------------------------|
| fp-*     | "ADAM"     | the model's own initialisation          |
| bc-*     | "BC-ADAM"  | w_r = the model's initialisation        |
| sr-*     | "SR-ADAM"  | Rademacher signs ±Δ                     |
| r-*      | "R-ADAM"   | Rademacher signs ±Δ                     |

Defaults: Adam β = (0.9, 0.999), ε = 1e-8; SGD momentum 0.9; no weight decay [docs/paper.md].
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass

import torch
from torch import nn

from qtrain.base.streams import stream_generator
from qtrain.methods.optimizer import QuantizedOptimizer
from qtrain.methods.policy import check_policy, split_parameters
from qtrain.quant import Grid, parse_grid, round_nearest

BASE_OPTIMIZERS = ("sgd", "adam")
MODE_NAMES = {
    "fp": "full precision",
    "bc": "BinaryConnect",
    "sr": "stochastic rounding",
    "r": "deterministic rounding",
}
METHODS = tuple(f"{mode}-{base}" for mode in MODE_NAMES for base in BASE_OPTIMIZERS)
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
        base = self.base.upper()
        return base if self.mode == "fp" else f"{self.mode.upper()}-{base}"

    @property
    def describe(self) -> str:
        return f"{MODE_NAMES[self.mode]} with {'Adam' if self.base == 'adam' else 'SGD'}"


def parse_method(name: str) -> MethodSpec:
    """`MethodSpec` of a preset name such as 'sr-adam'; ValueError with a suggestion."""
    key = str(name).strip().lower().replace("_", "-")
    if key not in METHODS:
        hint = difflib.get_close_matches(key, METHODS, n=1)
        did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ValueError(
            f"unknown method {name!r}{did_you_mean}; choose one of {', '.join(METHODS)}"
        )
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


def _base_optimizer(spec: MethodSpec, groups, lr, weight_decay, momentum, betas, eps):
    if spec.base == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)


def create(
    name: str,
    model: nn.Module,
    lr: float,
    *,
    grid: str | Grid = "binary",
    delta: float | None = None,
    policy: str = "conv",
    seed: int = 0,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    init: str = "auto",
    bc_stochastic: bool = False,
    track_flips: bool = True,
) -> QuantizedOptimizer:
    """Build the named method's optimizer over `model` and put the model's weights on the grid.

    `init` sets where quantized weights start: 'auto' (Rademacher for SR/R [paper], the
    model's own initialisation for BC), 'rademacher', 'round' (Q_d of the current weights,
    e.g. to fine-tune a float model) or 'keep' (they must already be on the grid).
    Parameter groups: `quantized` and `full_precision`, in that order.

    `delta=None` takes the grid's default Δ (end levels at ±1: Δ = 1 for binary and ternary,
    1/(2^k − 1) for k bits; see `qtrain.quant.grids`). Randomness comes from the run seed's
    streams (`qtrain.base.streams`): "init" for the Rademacher draw, "rounding" for Q_s.
    """
    spec = parse_method(name)
    check_policy(policy)
    grid = parse_grid(grid, delta)
    _check_positive("learning rate", lr)
    _check_nonnegative("weight decay", weight_decay)
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    quantized, full = split_parameters(model, policy)
    if spec.mode == "fp":
        quantized, full = [], quantized + full
    generator = stream_generator(seed, "init")
    if spec.mode != "fp":
        if init == "rademacher" or (init == "auto" and spec.mode in ("sr", "r")):
            rademacher_(quantized, grid, generator)
        elif init == "round":
            with torch.no_grad():
                for p in quantized:
                    p.copy_(round_nearest(p, grid))
    groups = [
        {"params": quantized, "name": "quantized"},
        {"params": full, "name": "full_precision"},
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("the model has no trainable parameters to optimize")
    base = _base_optimizer(spec, groups, lr, weight_decay, momentum, betas, eps)
    return QuantizedOptimizer(
        base,
        quantized,
        spec.mode,
        grid,
        seed=seed,
        bc_stochastic=bc_stochastic,
        track_flips=track_flips,
    )


def _check_positive(what: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be a finite number > 0, got {value!r}")


def _check_nonnegative(what: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite number >= 0, got {value!r}")
