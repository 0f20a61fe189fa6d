"""Name lookup for every registry: one "did you mean" rule and one unknown-name message."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from qtrain.base.errors import UserError


def closest(name: object, choices: Iterable[str]) -> str | None:
    """The registered name most similar to `name` (difflib ratio ≥ 0.6), or None."""
    matches = difflib.get_close_matches(str(name), list(choices), n=1)
    return matches[0] if matches else None


def did_you_mean(name: object, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest choice, or '' when none is close."""
    match = closest(name, choices)
    return f" (did you mean {match!r}?)" if match else ""


def unknown_name(kind: str, name: object, choices: Iterable[str]) -> ValueError:
    """ValueError: "unknown <kind> 'x' (did you mean 'y'?); choose one of a, b, c"."""
    choices = list(choices)
    return UserError(
        f"unknown {kind} {name!r}{did_you_mean(name, choices)}; choose one of {', '.join(choices)}"
    )
