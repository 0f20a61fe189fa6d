"""What a training step costs at the image sides a resized run trains, measured for its time fit.

A run with progressive resizing (`qtrain.train.resizing`) trains its first epoch at the
smallest side s₀ and later ones at larger sides, up to the data set's S. The time-budget fit
(`qtrain.train.budget_fit`) knows t_step(s₀) from the first epoch; for a later side it takes

    t_step(s) = t_step(s₀) · (1 + φ·(ρ(s) − 1))

    ρ(s) = fb(s) / fb(s₀), the seconds of a forward and backward pass at side s over those at
           s₀: measured at s₀ and at S, back to back at the end of the first epoch, and in
           between linear in the counted FLOPs F (`qtrain.train.flops`):
           ρ(s) = 1 + (ρ(S) − 1)·(F(s) − F(s₀)) / (F(S) − F(s₀))
    φ    = min(1, fb(s₀) / t_step(s₀)), the share of a first-epoch step that grows with the
           side; the rest (loading, the optimizer's step, the weight average) does not.

Why measured rather than priced by FLOPs: at a small side the part of a step that does not
scale with it shows. For speednet on a 2-core AVX-512 BF16 CPU (benchmarks/bench_resize.py)
a step at side 32 took 3.98× one at 16 where the FLOPs say 5.05×, so FLOPs alone would
overprice the later, larger epochs and leave budget unused; from side 20 up, and at every
side in float32 under AVX2, time and FLOPs agree within 9%.

Why a ratio: a shared machine's speed drifts (docs/speedrun.md), and ρ comes from passes a
fraction of a second apart (interleaved, median of five after two warm-up passes per
side, `interleaved`), which a slow spell scales alike.

The passes run on a copy of the model, under a forked random state: the run's weights,
batch-norm statistics, gradients and random streams are as they would be without them, so
what was measured changes the run only through the length the fit chooses. Their seconds
count in the budget.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qtrain.train.devices import autocast_context
from qtrain.train.flops import StepCost
from qtrain.train.interleaved import median_seconds
from qtrain.train.resizing import downscale


@dataclass(frozen=True)
class SideCost:
    """The measured model of the module docstring: ρ(S) (`full_ratio`), φ (`share`), and the
    seconds the measurement took."""

    min_side: int
    full_side: int
    full_ratio: float
    share: float
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def full_step_ratio(self) -> float:
        """t_step(S) / t_step(s₀) = 1 + φ·(ρ(S) − 1)."""
        return 1.0 + self.share * (self.full_ratio - 1.0)

    def step_cost(self, flop_ratio: StepCost) -> Callable[[int], float]:
        """t_step(s) / t_step(s₀) for side s; `flop_ratio(s)` = F(s) / F(s₀)."""
        top = flop_ratio(self.full_side) - 1.0

        def cost(side: int) -> float:
            growth = (flop_ratio(side) - 1.0) / top if top > 0 else 0.0
            return 1.0 + (self.full_step_ratio - 1.0) * growth

        return cost


def forward_backward_seconds(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, sides: tuple[int, ...],
    amp: str, device: torch.device,
) -> dict[int, float]:  # fmt: skip
    """The median seconds of a forward and backward pass of a copy of `model` on the batch
    (`images` downscaled to each side, `labels`), interleaved over `sides`
    (`interleaved.median_seconds`)."""
    probe = copy.deepcopy(model).train()
    inputs = [downscale(images, side) for side in sides]

    def pass_at(x: torch.Tensor) -> Callable[[], None]:
        def run() -> None:
            probe.zero_grad(set_to_none=True)
            with autocast_context(device, amp):
                loss = F.cross_entropy(probe(x).float(), labels)
            loss.backward()

        return run

    forks = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forks):
        seconds = median_seconds([pass_at(x) for x in inputs], device)
    return dict(zip(sides, seconds, strict=True))


def measure_side_cost(
    model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], min_side: int, full_side: int,
    step_seconds: float, amp: str, device: torch.device,
) -> SideCost:  # fmt: skip
    """`SideCost` of `model` on `batch` (a training batch at full side), whose first-epoch
    step at `min_side` took `step_seconds`."""
    started = time.perf_counter()
    images, labels = batch
    passes = forward_backward_seconds(model, images, labels.flatten(), (min_side, full_side),
                                      amp, device)  # fmt: skip
    share = min(1.0, passes[min_side] / step_seconds) if step_seconds > 0 else 1.0
    return SideCost(min_side, full_side, passes[full_side] / passes[min_side], share,
                    time.perf_counter() - started)  # fmt: skip
