"""Learning-rate schedules, as multipliers of the base rate α₀.

The epoch schedules are stepped once per epoch; "warmup-cosine" (nanoGPT's) once per
optimizer step s of S (S = max_steps, else epochs × steps per epoch), with W warm-up steps
and r = min_lr / α₀:

| schedule       | α / α₀                                                                  |
|----------------|-------------------------------------------------------------------------|
| step           | 1 before ⌈E/2⌉, 0.1 before ⌈3E/4⌉, 0.01 after  [docs/paper.md §2, ours]   |
| cosine         | ½(1 + cos(π e / E)) for epoch e of E (0-based)                          |
| constant       | 1                                                                       |
| warmup-cosine  | (s+1)/(W+1) for s < W; r + (1−r)·½(1 + cos(π (s−W)/(S−W))) for W ≤ s < S; |
|                | r from S on                                                             |
"""

from __future__ import annotations

import math

import torch

PER_STEP = ("warmup-cosine",)


def lr_factor(schedule: str, epoch: int, epochs: int) -> float:
    """The multiplier α(e)/α₀ of an epoch schedule."""
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    if schedule == "step":
        return 0.1 ** ((epoch >= math.ceil(epochs / 2)) + (epoch >= math.ceil(3 * epochs / 4)))
    raise ValueError(
        f"unknown schedule {schedule!r}; choose step, cosine, constant or warmup-cosine"
    )


def warmup_cosine_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """The multiplier α(s)/α₀ of "warmup-cosine" (see the table above)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if step >= total:
        return min_ratio
    progress = (step - warmup) / max(total - warmup, 1)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    schedule: str,
    epochs: int,
    *,
    total_steps: int = 0,
    warmup_steps: int = 0,
    min_ratio: float = 0.0,
):
    """A LambdaLR (its state_dict goes into checkpoints): stepped once per epoch for the epoch
    schedules, once per optimizer step for those in `PER_STEP` (over `total_steps`)."""
    if schedule in PER_STEP:
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: warmup_cosine_factor(step, total_steps, warmup_steps, min_ratio),
        )
    lr_factor(schedule, 0, epochs)  # fail fast on an unknown name
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda epoch: lr_factor(schedule, epoch, epochs)
    )
