"""Timing candidate steps against each other on a machine whose speed drifts.

The time-budget fit compares the cost of steps that differ in one setting (the image side of a
resized run, `side_cost`; the width, `width_fit`). A shared machine's speed drifts by up to
20% from hour to hour (docs/speedrun.md), so the candidates are run in turn, round after
round, and each one's median is kept: a slow spell scales them alike.

The first rounds are not counted. The first chooses oneDNN's kernels and fills the
allocator's caches; in bf16 on a 2-core AVX-512 BF16 CPU the widest speednet stayed slow for
two or three rounds of a fresh process (1.04, 0.58 and 0.50 s a step, then 0.33-0.39 s,
docs/speedrun.md "The probe's cold start"), and with one warm-up round the median of three
read it 45% slow. After two warm-up rounds such a start leaves one slow round among the five
counted, which their median passes over.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch

from qtrain.train.devices import synchronize

WARMUP_ROUNDS = 2
REPEATS = 5


def median_seconds(steps: Sequence[Callable[[], None]], device: torch.device,
                   repeats: int = REPEATS, warmup: int = WARMUP_ROUNDS) -> list[float]:  # fmt: skip
    """The median seconds of each of `steps` over `repeats` counted rounds, after `warmup`
    rounds, the steps interleaved within each round."""
    seconds: list[list[float]] = [[] for _ in steps]
    for repeat in range(warmup + repeats):
        for k, step in enumerate(steps):
            synchronize(device)
            started = time.perf_counter()
            step()
            synchronize(device)
            if repeat >= warmup:
                seconds[k].append(time.perf_counter() - started)
    return [statistics.median(s) for s in seconds]
