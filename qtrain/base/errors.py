"""Error types shared by every layer (each message is one sentence naming problem and fix)."""

from __future__ import annotations


class MissingDependencyError(ImportError):
    """An optional dependency (an extra of the qtrain package) is not installed."""
