"""Progress a user can see when the output is a file or a pipe, as training tools log it.

A terminal gets tqdm's bar (the trainer's `_progress_bar`). Anywhere else, a line at least
every `interval_s` seconds (30 by default) of training:

    progress: step 1200/5000 (24%)  731 images/s  about 5 min 12 s left

The rate is that of the steps since the previous line (images, or tokens for a text run); the
time left is (steps left) × (mean seconds a step since this process started training), and
no more than what the run's time budget leaves.
"""

from __future__ import annotations

import time
from collections.abc import Callable

PROGRESS_EVERY_S = 30.0


def format_duration(seconds: float) -> str:
    """'42 s', '5 min 12 s', '2 h 05 min'."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class ProgressLines:
    """Logs a progress line when `interval_s` seconds of `clock` passed since the last one."""

    def __init__(
        self,
        log,
        total_steps: int,
        unit: str,
        *,
        budget_s: float | None = None,
        interval_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.log, self.total_steps, self.unit = log, total_steps, unit
        self.budget_s, self.clock = budget_s, clock
        self.interval_s = PROGRESS_EVERY_S if interval_s is None else interval_s
        self.started = self.last = clock()
        self.first_step: int | None = None
        self.samples_since = 0
        self.trained_last: float | None = None  # training seconds at the last line

    def step(self, step: int, samples: int, trained_s: float) -> None:
        """After optimizer step `step` (1-based, of the run) that saw `samples` samples;
        `trained_s` is the run's training time so far (for the time budget)."""
        now = self.clock()
        if self.first_step is None:
            self.first_step = step - 1  # a resumed run starts mid-way
            self.trained_last = trained_s - (now - self.last)
        self.samples_since += samples
        if now - self.last < self.interval_s:
            return
        # the rate of training: an evaluation between two lines is not training time
        rate = self.samples_since / max(trained_s - self.trained_last, 1e-9)
        per_step = (now - self.started) / max(step - self.first_step, 1)
        left = (self.total_steps - step) * per_step
        if self.budget_s is not None:
            left = min(left, max(self.budget_s - trained_s, 0.0))
        share = 100 * step / self.total_steps
        self.log(
            f"progress: step {step}/{self.total_steps} ({share:.0f}%)  {rate:,.0f} "
            f"{self.unit}/s  about {format_duration(left)} left"
        )
        self.last, self.samples_since, self.trained_last = now, 0, trained_s
