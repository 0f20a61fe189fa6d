"""Flip statistics: how many quantized weights change grid level per step.

Counts stay device tensors (the last step's count and a running sum since `reset`), so counting
never makes a CUDA step wait for the host; they are read only when a rate is asked for.
"""

from __future__ import annotations

import torch


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


class FlipCounter:
    """The last step's flip count, and the sum and number of steps since the last reset."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.reset(device)

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
        return {"sum": self.sum.clone(), "last": self.last.clone(), "steps": self.steps}

    def load(self, state: dict) -> None:
        self.sum.copy_(state["sum"])
        self.last.copy_(state["last"])
        self.steps = int(state["steps"])
