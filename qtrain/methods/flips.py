"""Flip statistics: how many quantized weights change grid level per step.

Counts stay device tensors (the last counted step's count and a running sum since `reset`), so
counting never makes a CUDA step wait for the host; they are read only when a rate is asked for.

A count is a pass over the quantized weights (two, with SR's copy of the old ones), a few
percent of a small model's step. With `every` = k > 1 only every k-th step is counted (the
first, k+1-th, …, by the number of steps offered since the run began, so a resumed run counts
the very steps an uninterrupted one does), and the first step after each reset too, so that
every record with a step has a count, however short; the mean rate is the mean over counted
steps, an estimate of the mean over all of them from about one step in k.
"""

from __future__ import annotations

import torch

from qtrain.base.errors import UserError


def exact_float_count(dtype: torch.dtype) -> int:
    """2^(mantissa bits + 1): every integer up to it is a `dtype` value, so a sum of that many
    0s and 1s is exact."""
    return int(2 / torch.finfo(dtype).eps)


def count_changed(old: torch.Tensor, new: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """Σ [old ≠ new] as a 0-dim tensor (NaN counts as changed, −0 equals +0).

    `scratch` (old's shape, a floating dtype) receives the comparison: comparing into floats and
    summing them runs about twice as fast as comparing into bool and counting, and the sum of
    0s and 1s is exact up to `exact_float_count`; past it the count goes through integers.
    """
    if old.numel() > exact_float_count(scratch.dtype):
        return torch.count_nonzero(old != new)
    return torch.ne(old, new, out=scratch).sum()


def check_flip_every(every: int) -> int:
    """`every` when it is a whole number ≥ 1; one sentence naming the fix otherwise."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise UserError(
            f"flip_every must be a whole number of steps, 1 or more (1 counts every step), "
            f"got {every!r}"
        )
    return every


class FlipCounter:
    """The last counted step's flip count, and the sum and number of counted steps since the
    last reset; `due` says whether the current step is one to count (module doc)."""

    def __init__(self, device: torch.device | str = "cpu", every: int = 1) -> None:
        self.every = check_flip_every(every)
        self.offered = 0  # steps since the run began, counted or not
        self.reset(device)

    def due(self) -> bool:
        """Whether the step about to be taken is counted; call `advance` once it is taken."""
        return self.steps == 0 or self.offered % self.every == 0

    def advance(self) -> None:
        self.offered += 1

    def reset(self, device: torch.device | str) -> None:
        self.last = torch.zeros((), dtype=torch.float64, device=device)
        self.sum = torch.zeros((), dtype=torch.float64, device=device)
        self.steps = 0

    def record(self, count: torch.Tensor) -> None:
        self.last = count.to(torch.float64)
        self.sum += self.last
        self.steps += 1

    def to(self, device: torch.device) -> None:
        self.last, self.sum = self.last.to(device), self.sum.to(device)

    def rate(self, d: int) -> float:
        """Fraction of the d weights that changed grid level in the last step."""
        return float(self.last) / d if d else 0.0

    def mean_rate(self, d: int) -> float:
        """Mean per-step fraction since the last reset."""
        return float(self.sum) / (d * self.steps) if d and self.steps else 0.0

    def state(self) -> dict:
        return {"sum": self.sum.clone(), "last": self.last.clone(), "steps": self.steps,
                "offered": self.offered}  # fmt: skip

    def load(self, state: dict) -> None:
        self.sum.copy_(state["sum"])
        self.last.copy_(state["last"])
        self.steps = int(state["steps"])
        # a state saved before `every` existed (every step counted): the cadence starts here
        self.offered = int(state.get("offered", 0))
