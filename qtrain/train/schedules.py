"""Learning-rate schedules, as epoch-indexed multipliers of the base rate α₀.

| schedule  | α(e) / α₀ for epoch e of E (0-based)                                  |
|-----------|-----------------------------------------------------------------------|
| step      | 1 before ⌈E/2⌉, 0.1 before ⌈3E/4⌉, 0.01 after  [docs/paper.md §2, ours]     |
| cosine    | ½(1 + cos(π e / E))                                                   |
| constant  | 1                                                                     |
"""

from __future__ import annotations

import math

import torch


def lr_factor(schedule: str, epoch: int, epochs: int) -> float:
    """The multiplier α(e)/α₀."""
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    if schedule == "step":
        return 0.1 ** ((epoch >= math.ceil(epochs / 2)) + (epoch >= math.ceil(3 * epochs / 4)))
    raise ValueError(f"unknown schedule {schedule!r}; choose step, cosine or constant")


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, epochs: int):
    """A LambdaLR stepped once per epoch; its state_dict goes into checkpoints."""
    lr_factor(schedule, 0, epochs)  # fail fast on an unknown name
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda epoch: lr_factor(schedule, epoch, epochs)
    )
