"""Learning-rate schedules, as multipliers of the base rate α₀.

The epoch schedules are stepped once per epoch; "warmup-cosine" (nanoGPT's) and
"warmup-linear" (the fast-training recipes': airbench, Page's DAWNBench ResNet) once per
optimizer step s of S (S = max_steps, else epochs × steps per epoch), with W warm-up steps
and r = min_lr / α₀:

| schedule       | α / α₀                                                                  |
|----------------|-------------------------------------------------------------------------|
| step           | 1 before ⌈E/2⌉, 0.1 before ⌈3E/4⌉, 0.01 after  [docs/paper.md §2, ours]   |
| cosine         | ½(1 + cos(π e / E)) for epoch e of E (0-based)                          |
| constant       | 1                                                                       |
| warmup-cosine  | (s+1)/(W+1) for s < W; r + (1−r)·½(1 + cos(π (s−W)/(S−W))) for W ≤ s < S; |
|                | r from S on                                                             |
| warmup-linear  | (s+1)/(W+1) for s < W; r + (1−r)·(1 − (s−W)/(S−W)) for W ≤ s < S; r from S on |

Momentum cycling (`momentum_min` β_lo; Smith 2018's one-cycle policy): with f = α/α₀ after
any schedule step and β_hi the optimizer's own momentum (SGD's `momentum`, Adam's β₁),

    β = β_hi − (β_hi − β_lo)·clip((f − r)/(1 − r), 0, 1)        (β = β_hi when r = 1)

so momentum is lowest where the learning rate peaks and back at β_hi where it ends. It is a
function of the current learning rate only, so it needs no state of its own to resume.
"""

from __future__ import annotations

import math

import torch

from qtrain.base.errors import UserError

PER_STEP = ("warmup-cosine", "warmup-linear")


def lr_factor(schedule: str, epoch: int, epochs: int) -> float:
    """The multiplier α(e)/α₀ of an epoch schedule."""
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    if schedule == "step":
        return 0.1 ** ((epoch >= math.ceil(epochs / 2)) + (epoch >= math.ceil(3 * epochs / 4)))
    raise UserError(
        f"unknown schedule {schedule!r}; choose step, cosine, constant, warmup-cosine or "
        "warmup-linear"
    )


def warmup_cosine_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """The multiplier α(s)/α₀ of "warmup-cosine" (see the table above)."""

    def cosine(progress: float) -> float:
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return _after_warmup(cosine, step, total, warmup, min_ratio)


def warmup_linear_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """The multiplier α(s)/α₀ of "warmup-linear" (see the table above)."""

    def linear(progress: float) -> float:
        return min_ratio + (1.0 - min_ratio) * (1.0 - progress)

    return _after_warmup(linear, step, total, warmup, min_ratio)


def _after_warmup(decay, step: int, total: int, warmup: int, min_ratio: float) -> float:
    """(s+1)/(W+1) for s < W; decay((s−W)/(S−W)) for W ≤ s < S; r from S on."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if step >= total:
        return min_ratio
    return decay((step - warmup) / max(total - warmup, 1))


def cycled_momentum(factor: float, min_ratio: float, high: float, low: float) -> float:
    """β for the learning-rate multiplier `factor` (module docstring)."""
    if min_ratio >= 1.0:
        return high
    position = min(max((factor - min_ratio) / (1.0 - min_ratio), 0.0), 1.0)
    return high - (high - low) * position


def set_momentum(optimizer: torch.optim.Optimizer, momentum: float) -> None:
    """Write β into every param group: SGD's `momentum`, or β₁ of Adam's `betas`."""
    for group in optimizer.param_groups:
        if "betas" in group:
            group["betas"] = (momentum, group["betas"][1])
        elif "momentum" in group:
            group["momentum"] = momentum


def starting_momentum(optimizer: torch.optim.Optimizer) -> float:
    """β_hi: the momentum (or Adam's β₁) the optimizer was built with."""
    group = optimizer.param_groups[0]
    return group["betas"][0] if "betas" in group else group.get("momentum", 0.0)


def lr_lambda(
    schedule: str, epochs: int, *, total_steps: int = 0, warmup_steps: int = 0,
    min_ratio: float = 0.0,
):  # fmt: skip
    """The multiplier α/α₀ as a function of the scheduler's count: the step for the schedules
    in `PER_STEP` (over `total_steps`), else the epoch (over `epochs`)."""
    if schedule in PER_STEP:
        factor = warmup_cosine_factor if schedule == "warmup-cosine" else warmup_linear_factor
        return lambda step: factor(step, total_steps, warmup_steps, min_ratio)
    lr_factor(schedule, 0, epochs)  # fail fast on an unknown name
    return lambda epoch: lr_factor(schedule, epoch, epochs)


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, epochs: int, **length):
    """A LambdaLR (its state_dict goes into checkpoints) of `lr_lambda(schedule, epochs,
    **length)`: stepped once per epoch for the epoch schedules, once per optimizer step for
    those in `PER_STEP`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(schedule, epochs, **length))


def redraw_schedule(scheduler, schedule: str, epochs: int, **length) -> None:
    """Draw `scheduler`'s schedule over a new length from its current count on, keeping its
    count and the optimizer's current rate (a fitted run's: `qtrain.train.budget_fit` chooses
    the length where the old and new schedules agree)."""
    scheduler.lr_lambdas = [lr_lambda(schedule, epochs, **length)] * len(scheduler.lr_lambdas)
