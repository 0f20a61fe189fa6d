"""Fitting a run's schedule to its time budget, from the time of the run's own first epoch.

A run whose schedule outlasts its budget (`time_budget_s`) is cut with its learning rate still
high. With `fit_to_budget`, the run's length is chosen at the end of the first epoch, from
that epoch's measured seconds, so that the whole schedule ends inside the budget:

    t₁       = the first epoch's seconds: its n steps, and the set-up the trainer counts in
               it (t_setup: the width's probe with `fit_width`, the whitening initialisation
               with `whiten_init`)
    t_mid    = the seconds, set-up included, when step m = ⌊n/2⌋ of the first epoch ended
    t_step   = (t₁ − t_mid) / (n − m), a step of the epoch's second half
    steps    = n + g·⌊(B·(1 − MARGIN) − t₁) / (g·t_step)⌋, within [n, E·n]

with E the config's `epochs` (the most the run may train), B its `time_budget_s`, and g the
grain of the schedule: one step for a per-step schedule (the last epoch may then be partial,
as with max_steps), n steps for an epoch schedule (whole epochs). The schedule is then drawn
over the fitted steps, so the run ends with its learning rate decayed to `min_lr`. Whole
epochs would waste up to one epoch of the budget, a quarter of it where only four fit.

With progressive resizing (`qtrain.train.resizing`) the first epoch trains on the smallest
images, so later steps cost more than the first epoch's: a step of epoch e costs t_step·c(e),
c(e) = t_step(s(e)) / t_step(s(0)) at the sides of the run being fitted, measured at the end
of the first epoch (`qtrain.train.side_cost`, its seconds counted as set-up), and steps is the
most whose predicted seconds t₁ + t_step·Σ c fit in B·(1 − MARGIN) (`resized_epoch_cost`).

A machine's speed drifts after the first epoch (another process, a VM's neighbours; the later
epochs of one run on a 2-core VM were 8-17% slower than its first, docs/speedrun.md). With
`refit_to_budget` (on by default) a per-step schedule is fitted again at the end of each later
epoch, by the same rule from where the run stands:

    s        = the steps trained, t_spent the training seconds spent (set-up included)
    t_step   = a step of the epoch's second half, as in the first epoch (divided by its
               c(e) for a resized run)
    steps    = s + ⌊(B·(1 − MARGIN) − t_spent) / t_step⌋, within [s, E·n]

when the length S the schedule has is predicted to end outside the band
[B·(1 − 2·MARGIN), B·(1 − MARGIN/2)] (t_spent + t_step·(S − s) eats more than half of the
margin, or leaves twice the margin unused); the rest of the schedule is then redrawn over the
new length from the current rate (`qtrain.train.schedules`: the rate is continuous and reaches
`min_lr` at the new last step). Why the band: from epoch to epoch a step's time varies by a
few percent (0.525-0.538 s in the epochs of one run), which would redraw the schedule at every
epoch by 1-2% of its length for nothing; a drift that threatens the budget or wastes it moves
the prediction out of the band. Why the second half: it is the epoch's most recent speed; in
a run whose machine slowed about 2x during its third epoch, that epoch's mean step (0.962 s)
was 18% under the 1.17 s of the fourth, and the refit from it still overran the budget by 9
steps (docs/speedrun.md). A refit is kept in the fit (`Refit`, in order), so a resumed
run redraws the same schedule. An epoch schedule keeps its first fit: redrawing it over other
epochs would step its rate.

Why the first epoch rather than a probe before training: it times the run's own step with
everything the loop does (loader, augmentation, schedule, weight average, checks) on this
machine, over hundreds of steps; and it costs nothing, its steps being training steps. A probe
of a dozen steps before training cost its own time and, on a shared machine, measured a slow
spell 1.2-1.4x slower than the run then trained (docs/speedrun.md). Why its second half: the
first steps pay once for oneDNN's kernel choice and the allocator's caches (a compiler's
first step, on a GPU), so the epoch's mean step is slower than the steps that follow: in two
speedruns on a 2-core AMD EPYC limited to AVX2 it was 8.6% and 3.0% slower than the later
epochs' mean, the second half's steps 2.2% and 0.8% (docs/speedrun.md). A run whose clock
was not read at the middle step (a fit recorded before the rule, an epoch of one step) takes
the mean, (t₁ − t_setup) / n.

The first epoch must train the same whatever the choice: an epoch schedule's factor at epoch 0
is 1 for every E; a per-step schedule's first epoch must lie inside its warm-up (W ≥ n),
where the factor (s+1)/(W+1) does not depend on the run's length (`check_fittable`). The
choice is kept in the checkpoint (`Fit`, with the machine it was measured on), so a resumed
run keeps it bit for bit; summary.json and the log name it. A run resumed on another machine
keeps it too, and its trail of machines (`qtrain.train.hardware`) says where each part was
timed. The epoch it moves in is timed by the same rule over the steps the new machine trains
in it: resumed at batch b > 0 of the epoch's n steps, t_mid is read when step
m' = b + ⌊(n − b)/2⌋ ends (m' ≥ ⌊n/2⌋, in the epoch's second half still), and t_step is
(t_e − t_mid) / (n − m'), t_e the epoch's seconds: the new machine's alone (the checkpoint
keeps b, the fit m' as `Fit.timed_from`). The old machine's steps would mix its speed into a
refit that must predict the new one's, so that it missed the budget by their difference (at
the last refit, the run would be cut with its rate high); the new process's first steps pay
for its kernel choice and caches, as a run's first steps do. With fewer than 2 steps left
(n − b < 2) there is no second half to time: that epoch's refit waits for the next epoch's,
which times the new machine alone, and a first epoch, which must be fitted, takes its mean
step. A resume on the same machine, a second one inside that epoch included, keeps the
epoch's window: its start is in the checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch

from qtrain.base.errors import UserError
from qtrain.train import hardware
from qtrain.train.config import ConfigError, RunConfig
from qtrain.train.flops import StepCost
from qtrain.train.resizing import side_at
from qtrain.train.schedules import PER_STEP
from qtrain.train.settings import image_size
from qtrain.train.side_cost import SideCost

# Of the budget: for later epochs that run slower than the first (another process on a shared
# machine; the speed of one 2-core VM drifted by up to 20% from hour to hour).
MARGIN = 0.05


@dataclass(frozen=True)
class Fit:
    """A fitted schedule: the choice (`steps`, over `epochs` = ⌈steps / steps_per_epoch⌉),
    what it was computed from, and the machine. A fit recorded before steps were fitted has
    no `steps`: it trains whole epochs."""

    epochs: int
    recipe_epochs: int
    budget_s: float
    first_epoch_seconds: float
    setup_seconds: float
    margin: float
    machine: dict  # `hardware.record` of where the first epoch was timed
    steps: int | None = None
    steps_per_epoch: int | None = None
    side_cost: dict | None = None  # a resized run's measured `SideCost`
    width_fit: dict | None = None  # with fit_width, the `WidthFit` that chose the width
    mid_epoch_seconds: float | None = None  # t_mid; None in a fit from the epoch's mean step
    timed_from: int | None = None  # after a move, the step t_mid was read at (None: ⌊n/2⌋)
    refits: tuple[dict, ...] = ()  # `Refit.to_dict()` of each later epoch that changed it

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> Fit:
        return cls(**{**values, "refits": tuple(values.get("refits", ()))})

    def total_steps(self, steps_per_epoch: int) -> int:
        """The optimizer steps the run trains: as last refitted, else as first fitted."""
        if self.refits:
            return self.refits[-1]["steps"]
        return self.first_steps(steps_per_epoch)

    def first_steps(self, steps_per_epoch: int) -> int:
        """The length the first epoch chose: the schedule's before its `redraws`."""
        return self.steps if self.steps is not None else self.epochs * steps_per_epoch

    def redraws(self) -> list[tuple[int, int]]:
        """(a, S') of each refit, for `qtrain.train.schedules`."""
        return [(r["step"], r["steps"]) for r in self.refits]

    def epochs_trained(self) -> float:
        """The run's length in epochs, the last one possibly partial."""
        if self.steps is None or not self.steps_per_epoch:
            return float(self.epochs)
        return self.total_steps(self.steps_per_epoch) / self.steps_per_epoch

    def describe(self) -> str:
        """One line: the choice and what it came from."""
        length = f"{self.epochs} of {self.recipe_epochs} epochs"
        if self.steps is not None and self.steps != self.epochs * self.steps_per_epoch:
            length = (f"{self.steps} steps, {self.epochs_trained():.2f} of {self.recipe_epochs} "
                      "epochs")  # fmt: skip
        line = (
            f"fitted to the time budget: {length} (the "
            f"first took {self.first_epoch_seconds:.1f} s of {self.budget_s:g} s, set-up "
            f"{self.setup_seconds:.1f} s included{self._step_note()}; "
            f"{hardware.text(self.machine)})"
        )
        if self.side_cost is not None:
            c = SideCost(**self.side_cost)
            line += (f"; a step at side {c.full_side} costs {c.full_step_ratio:.2f}x one at "
                     f"{c.min_side}, measured in {c.seconds:.1f} s")  # fmt: skip
        if self.epochs == 1 and self.recipe_epochs > 1:
            line += "; no second epoch fits"
        return line

    def _step_note(self) -> str:
        if self.mid_epoch_seconds is None or not self.steps_per_epoch:
            return ""
        t_step = step_seconds(self.steps_per_epoch, self.first_epoch_seconds,
                              self.setup_seconds, self.mid_epoch_seconds,
                              self.timed_from)  # fmt: skip
        return f", {t_step:.3g} s a step in its second half"


@dataclass(frozen=True)
class Refit:
    """The length chosen again at the end of a later epoch (module docstring)."""

    epoch: int  # the epoch (1-based) at whose end it was made
    step: int  # s: the steps trained by then, where the schedule was redrawn
    steps: int  # the run's new length
    was: int  # its length before
    spent_seconds: float  # t_spent
    step_seconds: float  # t_step (at the first epoch's side, for a resized run)

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self, budget_s: float) -> str:
        """One line: the new length and what it came from."""
        return (f"re-fitted to the time budget after epoch {self.epoch}: {self.steps} steps "
                f"(was {self.was}); {self.step_seconds:.3g} s a step in that epoch's second half, "
                f"{self.spent_seconds:.1f} s of {budget_s:g} s spent")  # fmt: skip


def mid_step(steps_per_epoch: int, start: int = 0) -> int | None:
    """m = b + ⌊(n − b)/2⌋, the step of an epoch of n steps at whose end the trainer reads
    t_mid: the middle of the steps a machine trains in it from its batch b = `start` on (0: all
    of them, m = ⌊n/2⌋); None when those have no second half to time (n − b < 2)."""
    left = steps_per_epoch - start
    return start + left // 2 if left >= 2 else None


def step_seconds(steps_per_epoch: int, first_epoch_seconds: float, setup_seconds: float,
                 mid_epoch_seconds: float | None = None,
                 timed_from: int | None = None) -> float:  # fmt: skip
    """t_step: (t₁ − t_mid) / (n − m) with t_mid read at the end of step m = `timed_from`
    (None: the middle step, ⌊n/2⌋), else the epoch's mean step (t₁ − t_setup) / n (module
    docstring)."""
    n = steps_per_epoch
    m = mid_step(n) if timed_from is None else timed_from
    if mid_epoch_seconds is None or m is None:
        return (first_epoch_seconds - setup_seconds) / n
    return (first_epoch_seconds - mid_epoch_seconds) / (n - m)


def fitted_steps(
    budget_s: float,
    recipe_epochs: int,
    steps_per_epoch: int,
    first_epoch_seconds: float,
    setup_seconds: float,
    grain: int = 1,
    margin: float = MARGIN,
    epoch_cost: Callable[[int, int], float] | None = None,
    mid_epoch_seconds: float | None = None,
    timed_from: int | None = None,
) -> int:
    """n + g·⌊(B·(1 − margin) − t₁) / (g·t_step)⌋ within [n, E·n] (module docstring), with
    n = `steps_per_epoch`, g = `grain` and t_step from `mid_epoch_seconds`, read at the end of
    step `timed_from` (`step_seconds`).

    With `epoch_cost` (c(e, N): a step of epoch e in a run of N steps costs c·t_step), the
    most N (a multiple of g past n, at most E·n) with t₁ + t_step·Σ_{k=n}^{N−1} c(⌊k/n⌋, N)
    ≤ B·(1 − margin); at least n."""
    n = steps_per_epoch
    room = budget_s * (1.0 - margin) - first_epoch_seconds
    t_step = step_seconds(n, first_epoch_seconds, setup_seconds, mid_epoch_seconds, timed_from)
    return most_steps(room, n, recipe_epochs * n, t_step, n, grain, epoch_cost)


def most_steps(
    room: float,
    done: int,
    top: int,
    t_step: float,
    steps_per_epoch: int,
    grain: int = 1,
    epoch_cost: Callable[[int, int], float] | None = None,
) -> int:
    """The longest run N ∈ {done + k·g} ∩ [done, top] whose steps after the first `done` are
    predicted to take at most `room` seconds: t_step·(N − done), or with `epoch_cost`
    t_step·Σ_{k=done}^{N−1} c(⌊k/n⌋, N); `done` when none fits, `top` for a step of no time."""
    if t_step <= 0:
        return top
    if epoch_cost is None:
        return max(done, min(top, done + grain * math.floor(room / (grain * t_step))))
    # The predicted seconds grow with N, so a binary search over the candidates finds the
    # longest that fits in O(E·log(E·n)) costs (an ImageNet run has ~450,000 candidates); it
    # returns only a length it has checked.
    candidates = range(done + grain, top + 1, grain)
    fit, unfit = 0, len(candidates) + 1  # how many candidates fit: at least `fit`, under `unfit`
    while unfit - fit > 1:
        middle = (fit + unfit) // 2
        later = _later_cost(candidates[middle - 1], done, steps_per_epoch, epoch_cost)
        if t_step * later <= room:
            fit = middle
        else:
            unfit = middle
    return candidates[fit - 1] if fit else done


def _later_cost(steps: int, done: int, n: int, epoch_cost: Callable[[int, int], float]) -> float:
    """Σ_{k=done}^{steps−1} c(⌊k/n⌋, steps): the steps after the first `done`, each weighted
    by its epoch's cost."""
    return sum((min((e + 1) * n, steps) - max(e * n, done)) * epoch_cost(e, steps)
               for e in range(done // n, -(-steps // n)))  # fmt: skip


def fit(config: RunConfig, steps_per_epoch: int, first_epoch_seconds: float,
        setup_seconds: float, device: torch.device, side_cost: SideCost | None = None,
        width_fit: dict | None = None, mid_epoch_seconds: float | None = None,
        timed_from: int | None = None) -> Fit:  # fmt: skip
    """The fit of the run `config`, of `steps_per_epoch`, whose first epoch took
    `first_epoch_seconds` (`mid_epoch_seconds` at the end of its step `timed_from`, None: its
    middle step): to the step for a per-step schedule, else to whole epochs. A resized run
    passes its measured `side_cost`, whose seconds are set-up; a run that chose its width, the
    `width_fit` that chose it (recorded with the fit)."""
    budget = config.time_budget_s
    grain = 1 if config.schedule in PER_STEP else steps_per_epoch
    cost = None
    if side_cost is not None:
        cost = resized_epoch_cost(config, steps_per_epoch, side_cost)
        setup_seconds += side_cost.seconds
        if mid_epoch_seconds is not None:  # t₁ holds the side cost's seconds: so must t_mid
            mid_epoch_seconds += side_cost.seconds
    steps = fitted_steps(budget, config.epochs, steps_per_epoch, first_epoch_seconds,
                         setup_seconds, grain, epoch_cost=cost,
                         mid_epoch_seconds=mid_epoch_seconds,
                         timed_from=timed_from)  # fmt: skip
    return Fit(math.ceil(steps / steps_per_epoch), config.epochs, budget, first_epoch_seconds,
               setup_seconds, MARGIN, hardware.record(device), steps, steps_per_epoch,
               side_cost.to_dict() if side_cost is not None else None, width_fit,
               mid_epoch_seconds, timed_from)  # fmt: skip


def refit(fit_so_far: Fit, config: RunConfig, steps_done: int, spent_seconds: float,
          epoch: int, epoch_steps: int, epoch_seconds: float,
          mid_epoch_seconds: float | None = None,
          timed_from: int | None = None) -> Fit | None:  # fmt: skip
    """`fit_so_far` with the length chosen again at the end of the 0-based `epoch` (its
    `epoch_steps` steps took `epoch_seconds`, `mid_epoch_seconds` at the end of its step
    `timed_from`, None: its middle step; t_step as `step_seconds` gives it), after
    `steps_done` steps and `spent_seconds` of training (module docstring); None when the
    current length is predicted to end inside the band, when the choice stays, or when the run
    cannot be refitted (an epoch schedule, a fit in whole epochs)."""
    n = fit_so_far.steps_per_epoch
    if config.schedule not in PER_STEP or not n or epoch_steps <= 0:
        return None
    current = fit_so_far.total_steps(n)
    cost = None
    if fit_so_far.side_cost is not None:
        cost = resized_epoch_cost(config, n, SideCost(**fit_so_far.side_cost))
    t_step = step_seconds(epoch_steps, epoch_seconds, 0.0, mid_epoch_seconds, timed_from)
    t_step /= cost(epoch, current) if cost else 1.0
    budget, margin = fit_so_far.budget_s, fit_so_far.margin
    left = _later_cost(current, steps_done, n, cost) if cost else current - steps_done
    predicted = spent_seconds + t_step * left
    if budget * (1.0 - 2.0 * margin) <= predicted <= budget * (1.0 - margin / 2):
        return None  # inside the band: the drift is noise
    room = budget * (1.0 - margin) - spent_seconds
    steps = most_steps(room, steps_done, fit_so_far.recipe_epochs * n, t_step, n,
                       epoch_cost=cost)  # fmt: skip
    if steps == current:
        return None
    made = Refit(epoch + 1, steps_done, steps, current, spent_seconds, t_step)
    return replace(fit_so_far, refits=(*fit_so_far.refits, made.to_dict()))


def resized_epoch_cost(config: RunConfig, steps_per_epoch: int, side_cost: SideCost
                       ) -> Callable[[int, int], float]:  # fmt: skip
    """c(e, N) = t_step(s(e)) / t_step(s(0)) for progressive resizing: the sides of a run of N
    steps (`qtrain.train.resizing`), each priced by the measured `side_cost`
    (`qtrain.train.side_cost`)."""
    full = image_size(config)

    def side(epoch: int, steps: int) -> int:
        epochs = steps / steps_per_epoch
        return side_at(epoch, epochs, full, config.resize_min_side, config.resize_until)

    cost = side_cost.step_cost(StepCost(config, reference=side_cost.min_side))
    return lambda epoch, steps: cost(side(epoch, steps))


def check_same_budget(fit: dict | None, config: RunConfig, run_dir) -> None:
    """A ConfigError when a run whose schedule was fitted to its time budget resumes with
    another: its steps and learning rates were drawn for that budget, so a longer one would go
    unused and a shorter one would cut the run with its rate still high. A run not fitted yet
    (resumed inside its first epoch) fits to the budget it has at that epoch's end."""
    if fit is None or fit["budget_s"] == config.time_budget_s:
        return
    before = fit["budget_s"]
    raise ConfigError(
        f"cannot resume: the run in {run_dir} fitted its schedule to time_budget_s={before:g} "
        f"at the end of its first epoch, not {config.time_budget_s:g}; resume with "
        "{time_budget_s} or start a new {out} folder",
        time_budget_s=f"time_budget_s={before:g}",
        out="run",
    )


def check_fittable(config: RunConfig, steps_per_epoch: int) -> None:
    """A UserError, before training, when the first epoch of `config` would depend on the
    fit: a per-step schedule whose warm-up ends inside it. (A run without a time budget is
    refused by the config's scopes, one with max_steps by its validation.)"""
    if config.schedule in PER_STEP and config.warmup_steps < steps_per_epoch:
        raise UserError(
            f"fit_to_budget chooses the epochs at the end of the first, whose learning rate "
            f"must not depend on them, but the warm-up ends at step {config.warmup_steps} of "
            f"its {steps_per_epoch}; set warmup_steps to at least {steps_per_epoch}, or turn "
            "fit_to_budget off"
        )
