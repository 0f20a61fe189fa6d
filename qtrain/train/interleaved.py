"""Timing candidate steps against each other on a machine whose speed drifts.

The time-budget fit compares the cost of steps that differ in one setting (the image side of a
resized run, `side_cost`; the width, `width_fit`). A shared machine's speed drifts by up to
20% from hour to hour (docs/speedrun.md), so the candidates are run in turn, round after
round, and each one's median is kept: a slow spell scales them alike. The first round chooses
oneDNN's kernels and fills the allocator's caches, and is not counted.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch

from qtrain.train.devices import synchronize

REPEATS = 3


def median_seconds(steps: Sequence[Callable[[], None]], device: torch.device,
                   repeats: int = REPEATS) -> list[float]:  # fmt: skip
    """The median seconds of each of `steps` over `repeats` counted rounds, after one warm-up
    round, the steps interleaved within each round."""
    seconds: list[list[float]] = [[] for _ in steps]
    for repeat in range(repeats + 1):
        for k, step in enumerate(steps):
            synchronize(device)
            started = time.perf_counter()
            step()
            synchronize(device)
            if repeat:
                seconds[k].append(time.perf_counter() - started)
    return [statistics.median(s) for s in seconds]
