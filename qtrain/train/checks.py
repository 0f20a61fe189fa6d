"""Checks of setting values that several modules share (each module names its own setting)."""

from __future__ import annotations

import math

from qtrain.base.errors import UserError


def check_fraction(name: str, value, hint: str) -> float:
    """`value` as a float when it is a finite number in [0, 1), else ValueError naming setting
    `name`; `hint` (what 0 means, the usual values) completes the sentence for a number out
    of range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{name} must be a number in [0, 1), got {value!r}")
    if not 0 <= value < 1:
        raise UserError(f"{name} must be in [0, 1) ({hint}), got {value}")
    return float(value)
