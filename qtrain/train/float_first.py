"""Training in float first (`float_fraction`): the first steps of a quantized run train float
weights, then the method quantizes them.

With f = `float_fraction` and S the run's length in optimizer steps, the steps 0 … F − 1,

    F = round(f · S),

take FP's step on the quantized parameters (BC on w_r, which it still clips; SR and R on w_b,
unrounded: `QuantizedOptimizer.float_phase`), so the model holds float weights. At step F the
base optimizer's state of those parameters restarts (`QuantizedOptimizer.end_float_phase`) and
from then on every step is the method's own. This is quantization-aware training from float
weights (as `init_from` starts from a trained float model, docs/lm.md) inside one run and one
schedule: the float phase learns at float's pace while the learning rate is high, and the
quantized phase ends the run on the grid (docs/speedrun.md, "Training in float first").

A ramp onto the grid (`quant_ramp` = r, BC only, which keeps w_r) spreads the switch over the
R = round(r · S) steps F … F + R − 1 after it: step s writes the model's weights

    w_b = w_r + λ_s · (Q(w_r) − w_r),    λ_s = (s − F + 1) / (R + 1),

so they move from the float weights (λ = 0, the float phase's) to the grid (λ = 1, from step
F + R on) in R + 1 equal parts, while BC trains w_r from the gradient at w_b as always. This
is the "λ warm-up" with which float language models are fine-tuned to ternary weights
(Hugging Face's 1.58-bit fine-tuning, 2024), here after a float phase of the same run, or from
a float model's weights (`init_from`, F = 0). The last step is always on the grid (R ≤ S − 1 − F).

S is the run's length as planned from its config, or, with `fit_to_budget`, as the first fit
chose it when that is shorter (a fit never lengthens the recipe). A refit (`refit_to_budget`)
at step a to the length S' moves the switch with the run while the run has not reached it:

    a < F:          F' = max(a, round(f · min(S', planned))),  R' = round(r · min(S', planned))
    F ≤ a < F + R:  F' = F,  R' = min(R, S' − 1 − F)  (when a step is left, S' > a)
    a ≥ F + R:      nothing moves

(F' and R' capped as above, so the last step is on the grid; a refit that leaves no step moves
nothing, and the run is cut there). So the run keeps its share f of float steps when its
machine slows down or speeds up in the float phase (or ends the phase at once, f·S' < a): with
F fixed at the first fit, a run whose steps slow 3x after a tenth of them, refitted to S' =
0.1·S + 0.9·S/3 = 0.4·S, would train 75% of that in float (F = 0.3·S), and one refitted to
fewer steps than F ends in its float phase, its weights rounded onto the grid untrained (a
speedrun moved to a slower CPU in its second epoch ended at 18% accuracy that way). F never
moves to a step already taken, on the ramp λ only grows, and both are a function of the config
and the recorded fit with its refits alone: a resumed run switches at the very step an
uninterrupted one does, and restarts the moments there even when it resumed exactly at F. A run
cut by its time budget before step F + R rounds its weights onto the grid before its last
record (`QuantizedOptimizer.round_float_weights`), so that what it reports and keeps is
quantized.
"""

from __future__ import annotations

from qtrain.train.checks import check_fraction


def check_float_fraction(value: float) -> float:
    """`value` when it is a fraction of the run in [0, 1) (0: off)."""
    return check_fraction("float_fraction", value, "a fraction of the run's steps trained in "
                          "float before the method quantizes; 0 turns it off")  # fmt: skip


def check_quant_ramp(value: float) -> float:
    """`value` when it is a fraction of the run in [0, 1) (0: off)."""
    hint = "a fraction of the run's steps over which BC's weights move onto the grid; 0: at once"
    return check_fraction("quant_ramp", value, hint)


def _length(planned_steps: int, first_fit_steps: int | None) -> int:
    """S: the planned length, or the first fit's when shorter (a fit never lengthens it)."""
    return planned_steps if first_fit_steps is None else min(planned_steps, first_fit_steps)


def float_steps(fraction: float, planned_steps: int, first_fit_steps: int | None = None) -> int:
    """F = round(f · S) (module doc), S the planned length or the first fit's when shorter,
    and at most S − 1: a run always ends with a quantized step."""
    length = _length(planned_steps, first_fit_steps)
    return max(0, min(round(fraction * length), length - 1))


def ramp_steps(ramp: float, f: int, planned_steps: int, first_fit_steps: int | None = None) -> int:
    """R = round(r · S) (module doc), S as for F = `f`, and at most S − 1 − F: the run's last
    step writes weights on the grid."""
    length = _length(planned_steps, first_fit_steps)
    return max(0, min(round(ramp * length), length - 1 - f))


def phases(fraction: float, ramp: float, planned_steps: int, first_fit_steps: int | None = None,
           redraws: tuple[tuple[int, int], ...] | list = ()) -> tuple[int, int]:  # fmt: skip
    """(F, R) of a run (module doc): from S, the planned length or the first fit's when
    shorter, then moved by each refit (a, S') of `redraws`, in order, as the module doc says."""
    f = float_steps(fraction, planned_steps, first_fit_steps)
    r = ramp_steps(ramp, f, planned_steps, first_fit_steps)
    for at, steps in redraws:
        length = min(planned_steps, steps)
        if at < f and steps > at:  # in float: the switch follows the length, never into the past
            f = max(at, float_steps(fraction, length))
            r = ramp_steps(ramp, f, length)
        elif at < f + r and steps > at:  # on the ramp: it ends by the last step (λ only grows)
            r = min(r, length - 1 - f)
    return f, r


def grid_weight(step: int, f: int, r: int) -> float:
    """λ_s of the weights step s = `step` writes (module doc), F = `f`, R = `r`: 0 in the float
    phase, (s − F + 1) / (R + 1) on the ramp, 1 from step F + R on."""
    if step < f:
        return 0.0
    if step >= f + r:
        return 1.0
    return (step - f + 1) / (r + 1)
