"""Choosing a budgeted run's width from the measured speed of each candidate, before training.

`fit_to_budget` fits a run's length at the end of its first epoch (`budget_fit`), but the width
fixes the model before the first step. On a slow CPU a wide network fits only a small part of
its recipe into the budget and ends with the accuracy of a short schedule, below what a
narrower one reaches with all of it. With `fit_width`, before training, the trainer times a
training step (forward, backward and the method's step, on the run's first batch, at its
precision) of the model at each candidate width w_k = w·f_k, f ∈ `FRACTIONS`, and predicts the
epochs each would train in the budget B:

    E(w_k) = (B·(1 − MARGIN) − t_probe) / (n · t_step(w_k))

with n steps an epoch and t_probe the seconds the probe took (counted in the budget, as set-up
of the first epoch). It trains the widest candidate with E(w_k) ≥ `MIN_SHARE`·E_recipe, else
the narrowest; the first epoch then fits the length at that width as usual.

The rule comes from validation runs of the speedrun preset (docs/speedrun.md, "Width on a slow
CPU" and "Width 1 against 0.75"): where 31% or 40% of the recipe fitted at width 1, width 0.5
(all of it) ended 2.3 and 0.7 points higher; where 55% fitted at width 0.75 it tied with width
0.5; where 50% fitted at width 1, width 0.75 (in the same time) ended 0.46-0.66 points higher,
where 57% fitted 0.24 higher, where 64% fitted the two tied, and where about 90% fitted
width 1 beat 0.75. About two thirds of the recipe is where the wider network stops losing.

The probe builds each candidate afresh (from the run's initialisation stream, under a
forked random state), so the run's weights and random streams are as they would be without
it. Steps are interleaved over the widths, two warm-up rounds and then the median of five
(`interleaved`), so that a slow spell of a shared machine scales them alike and a cold
start is not read as a slow width. It omits the loader and the weight average; on a
2-core CPU its prediction at width 0.75 came within 3% of what the fit at the end of the
first epoch, timing the real step by the epoch's mean, chose: 7.5 against 7.33 epochs
(native bf16 without AMX, 12 minutes, a weight average) and 7.7 against 7.81 (limited to
AVX2, 20 minutes); on an Intel Xeon with AMX (model 207), whose speed moved by ±20% within a
run, it read width 0.75's step 7-12% slower than the first epoch's second half ran. The
choice is recorded: the run's config
holds the width it trained, and its fit (summary.json, the checkpoint) the candidates, their
step seconds and predicted epochs. A resumed run keeps the recorded width and measures
nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from qtrain.train.budget_fit import MARGIN
from qtrain.train.config import RunConfig
from qtrain.train.devices import autocast_context
from qtrain.train.interleaved import median_seconds

FRACTIONS = (1.0, 0.75, 0.5)
MIN_SHARE = 0.65


@dataclass(frozen=True)
class WidthFit:
    """The candidates (`widths`, widest first), each one's measured `step_seconds` and
    `predicted_epochs`, the `chosen` width, the rule's `min_share` and the probe's `seconds`."""

    widths: list[float]
    step_seconds: list[float]
    predicted_epochs: list[float]
    recipe_epochs: int
    chosen: float
    min_share: float
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """One line: the choice and the prediction for each candidate."""
        each = ", ".join(
            f"{w:g}: {e:.1f}" for w, e in zip(self.widths, self.predicted_epochs, strict=True)
        )
        share = f"{self.min_share:.0%} of the recipe's {self.recipe_epochs} epochs"
        chosen = self.predicted_epochs[self.widths.index(self.chosen)]
        why = (
            f"the widest predicted to train at least {share}"
            if chosen >= self.min_share * self.recipe_epochs
            else f"the narrowest, as none is predicted to train {share}"
        )
        return (
            f"width {self.chosen:g} chosen for the time budget: {why} (width: epochs, {each}; "
            f"measured in {self.seconds:.1f} s)"
        )


def candidate_widths(width: float) -> list[float]:
    """w·f for f in `FRACTIONS`, widest first."""
    return [width * f for f in FRACTIONS]


def choose(widths: list[float], step_seconds: list[float], recipe_epochs: int,
           steps_per_epoch: int, budget_s: float, probe_seconds: float,
           min_share: float = MIN_SHARE) -> tuple[float, list[float]]:  # fmt: skip
    """(the chosen width, the predicted epochs of each) by the module docstring's rule."""
    room = max(0.0, budget_s * (1.0 - MARGIN) - probe_seconds)
    predicted = [room / (steps_per_epoch * t) if t > 0 else float("inf") for t in step_seconds]
    for width, epochs in zip(widths, predicted, strict=True):
        if epochs >= min_share * recipe_epochs:
            return width, predicted
    return widths[-1], predicted


def candidate_steps(config: RunConfig, splits, batch: tuple[torch.Tensor, torch.Tensor],
                    widths: list[float], device: torch.device) -> list[Callable]:  # fmt: skip
    """A training step (forward, loss, backward and the method's step) of `config`'s model
    and method at each width on `batch`, each on a model built afresh from the run's
    initialisation stream. Call under a forked random state: building them draws from it."""
    from qtrain.train.parts import make_model, make_optimizer

    images, labels = batch
    labels = labels.flatten()

    def step_at(width: float) -> Callable[[], None]:
        candidate = config.replace(width=width)
        model = make_model(candidate, splits, device, fresh=True).train()
        optimizer = make_optimizer(candidate, model)

        def run() -> None:
            with autocast_context(device, config.amp):
                loss = F.cross_entropy(model(images).float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return run

    return [step_at(w) for w in widths]


def step_seconds(config: RunConfig, splits, batch: tuple[torch.Tensor, torch.Tensor],
                 widths: list[float], device: torch.device) -> list[float]:  # fmt: skip
    """The median seconds of each `candidate_steps`, interleaved
    (`interleaved.median_seconds`), the run's random state left as it was."""
    forks = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forks):
        return median_seconds(candidate_steps(config, splits, batch, widths, device), device)


def fit_width(config: RunConfig, splits, batch, steps_per_epoch: int,
              device: torch.device) -> WidthFit:  # fmt: skip
    """Measure the candidates of `config` (its `width` the widest) and choose one."""
    started = time.perf_counter()
    widths = candidate_widths(config.width)
    seconds = step_seconds(config, splits, batch, widths, device)
    probe = time.perf_counter() - started
    chosen, predicted = choose(widths, seconds, config.epochs, steps_per_epoch,
                               config.time_budget_s, probe)  # fmt: skip
    return WidthFit(widths, seconds, predicted, config.epochs, chosen, MIN_SHARE, probe)


def adopt_saved_width(config: RunConfig, saved: dict) -> RunConfig:
    """`config` with the width its run folder's `saved` config records, when both choose the
    width (`fit_width`): a resumed run keeps the width it chose."""
    if config.fit_width and saved.get("fit_width") and "width" in saved:
        return config.replace(width=saved["width"])
    return config
