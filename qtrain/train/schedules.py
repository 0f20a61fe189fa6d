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

A per-step schedule can be redrawn while it decays (`qtrain.train.budget_fit` re-fits a run's
length at an epoch's end): a redraw at step a to a new length S' keeps the rate at a and spends
what was left of the decay over the steps that are left. With p(s) = (s−W)/(S−W) the progress of
the decay (the rate is r + (1−r)·(1 − p) for the linear one), a redraw (a, S') with a > W makes

    p(s) = p_a + (1 − p_a)·(s − a)/(S' − a)   for s ≥ a,   p_a = p(a) of the schedule before it

and later redraws chain the same way; a redraw inside the warm-up (a ≤ W) only sets S. So the
rate is continuous at every redraw and reaches r at the last S'.

Momentum cycling (`momentum_min` β_lo; Smith 2018's one-cycle policy): with f = α/α₀ after
any schedule step and β_hi the optimizer's own momentum (SGD's `momentum`, Adam's β₁),

    β = β_hi − (β_hi − β_lo)·clip((f − r)/(1 − r), 0, 1)        (β = β_hi when r = 1)

so momentum is lowest where the learning rate peaks and back at β_hi where it ends. It is a
function of the current learning rate only, so it needs no state of its own to resume.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from qtrain.base.errors import UserError

PER_STEP = ("warmup-cosine", "warmup-linear")


# (a, S'): from step a on, the decay that is left spread over the steps up to S' (module
# docstring), in the order they were made
Redraws = Sequence[tuple[int, int]]


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


def warmup_cosine_factor(step: int, total: int, warmup: int, min_ratio: float,
                         redraws: Redraws = ()) -> float:  # fmt: skip
    """The multiplier α(s)/α₀ of "warmup-cosine" (see the table above), after `redraws`."""

    def cosine(progress: float) -> float:
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return _after_warmup(cosine, step, total, warmup, min_ratio, redraws)


def warmup_linear_factor(step: int, total: int, warmup: int, min_ratio: float,
                         redraws: Redraws = ()) -> float:  # fmt: skip
    """The multiplier α(s)/α₀ of "warmup-linear" (see the table above), after `redraws`."""

    def linear(progress: float) -> float:
        return min_ratio + (1.0 - min_ratio) * (1.0 - progress)

    return _after_warmup(linear, step, total, warmup, min_ratio, redraws)


def _after_warmup(decay, step: int, total: int, warmup: int, min_ratio: float,
                  redraws: Redraws = ()) -> float:  # fmt: skip
    """(s+1)/(W+1) for s < W; decay(p(s)) while p(s) < 1; r after."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = decay_progress(step, total, warmup, redraws)
    return min_ratio if progress >= 1.0 else decay(progress)


def decay_progress(step: int, total: int, warmup: int, redraws: Redraws = ()) -> float:
    """p(s) for a step s ≥ W of a schedule of `total` steps, W of them warm-up, redrawn by the
    `redraws` made at steps up to s (module docstring); 1 once the decay has ended."""
    start, start_progress, end = warmup, 0.0, total
    for at, new_end in redraws:
        if at > step:
            break
        if at > start:
            start_progress = _progress(at, start, start_progress, end)
            start = at
        end = new_end
    return _progress(step, start, start_progress, end)


def _progress(step: int, start: int, start_progress: float, end: int) -> float:
    """p_a + (1 − p_a)·(s − a)/(S − a), at most 1."""
    if step >= end:
        return 1.0
    return start_progress + (1.0 - start_progress) * (step - start) / (end - start)


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
    min_ratio: float = 0.0, redraws: Redraws = (),
):  # fmt: skip
    """The multiplier α/α₀ as a function of the scheduler's count: the step for the schedules
    in `PER_STEP` (over `total_steps`, then `redraws`), else the epoch (over `epochs`)."""
    if schedule in PER_STEP:
        factor = warmup_cosine_factor if schedule == "warmup-cosine" else warmup_linear_factor
        redraws = tuple(redraws)
        return lambda step: factor(step, total_steps, warmup_steps, min_ratio, redraws)
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
