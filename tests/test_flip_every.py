"""Counting flips on every k-th step only (`flip_every`, qtrain.methods.flips).

Counting reads the weights and changes none of them: a run that counts every third step trains
the very same weights as one that counts every step, and its count is theirs on the steps it
counts (the first, fourth, seventh, …, also across a save and restore).
"""

from __future__ import annotations

import io

import pytest
import torch
from test_methods import small_net, train_steps

from qtrain.base.errors import UserError
from qtrain.methods import create
from qtrain.methods.flips import FlipCounter
from qtrain.quant import ternary

CASES = [("bc-adam", "absmean"), ("bc-adam", "he"), ("sr-adam", "none"), ("r-adam", "he"),
         ("bop-adam", "none")]  # fmt: skip


def build(method: str, scale: str, every: int):
    model = small_net()
    grid = "binary" if method.startswith("bop") else ternary(0.5)
    lr = 1e-4 if method.startswith("bop") else 0.05  # Bop's τ is its step: flips need a small one
    opt = create(method, model, lr=lr, seed=3, grid=grid, scale=scale, flip_every=every)
    return model, opt


def per_step_counts(model, opt, steps: int) -> list[float]:
    counts = []
    for i in range(steps):
        train_steps(model, opt, 1, first_batch=i)
        counts.append(float(opt.flips.last))
    return counts


@pytest.mark.parametrize(("method", "scale"), CASES)
def test_every_third_step_is_counted_and_the_weights_are_those_of_counting_every_step(
    method, scale
):
    model_1, every_step = build(method, scale, 1)
    counts = per_step_counts(model_1, every_step, 7)
    assert sum(counts) > 0  # the case flips weights at all
    model_3, sampled = build(method, scale, 3)
    train_steps(model_3, sampled, 7)
    for a, b in zip(model_1.state_dict().values(), model_3.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert sampled.flips.steps == 3  # steps 1, 4 and 7
    assert float(sampled.flips.sum) == counts[0] + counts[3] + counts[6]
    assert float(sampled.flips.last) == counts[6]
    d = sampled.num_quantized
    assert sampled.mean_flip_rate() == pytest.approx((counts[0] + counts[3] + counts[6]) / 3 / d)


def test_a_restored_run_counts_the_steps_an_uninterrupted_one_counts():
    model, opt = build("sr-adam", "none", 3)
    train_steps(model, opt, 2)  # counted: step 1; the next counted step is the fourth
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    train_steps(model, opt, 5, first_batch=2)

    restored_model, restored = build("sr-adam", "none", 3)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    restored_model.load_state_dict(saved["model"])
    restored.load_state_dict(saved["opt"])
    train_steps(restored_model, restored, 5, first_batch=2)
    assert restored.flips.state() == opt.flips.state()
    assert opt.flips.steps == 3 and opt.flips.offered == 7


def test_the_first_step_after_a_reset_is_counted_so_every_record_has_a_rate():
    """A record (an epoch, an evaluation) shorter than the cadence still counts a step."""
    model, opt = build("sr-adam", "none", 10)
    train_steps(model, opt, 2)  # step 1 counted
    opt.reset_flip_stats()
    train_steps(model, opt, 2, first_batch=2)  # step 3, the first after the reset, counted
    assert opt.flips.steps == 1 and opt.flips.offered == 4
    model_1, every_step = build("sr-adam", "none", 1)
    counts = per_step_counts(model_1, every_step, 3)
    assert opt.mean_flip_rate() == counts[2] / opt.num_quantized


def test_a_state_saved_before_the_cadence_existed_loads_and_starts_it_there():
    counter = FlipCounter(every=4)
    old = {"sum": torch.tensor(5.0, dtype=torch.float64),
           "last": torch.tensor(2.0, dtype=torch.float64), "steps": 3}  # fmt: skip
    counter.load(old)
    assert counter.steps == 3 and float(counter.sum) == 5.0 and counter.due()


@pytest.mark.parametrize("every", [0, -2, 2.5, True, "3"])
def test_a_cadence_that_is_not_a_whole_number_of_steps_is_refused(every):
    with pytest.raises(UserError, match="flip_every must be a whole number of steps"):
        build("sr-adam", "none", every)
