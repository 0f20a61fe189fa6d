"""`interleaved.median_seconds`: a step that starts cold is timed at its warm speed, and a
slow spell of the machine scales every candidate alike."""

from __future__ import annotations

import pytest
import torch

from qtrain.train import interleaved


class FakeClock:
    """perf_counter for `interleaved`: steps advance it by the seconds they cost."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(interleaved.time, "perf_counter", fake)
    return fake


def cold_step(clock: FakeClock, warm: float, cold: list[float]):
    """A step that costs `cold[i]` seconds on its i-th call and `warm` after them."""
    calls = []

    def step() -> None:
        clock.now += cold[len(calls)] if len(calls) < len(cold) else warm
        calls.append(None)

    return step, calls


def test_a_step_slow_for_its_first_three_calls_is_timed_at_its_warm_speed(clock):
    # the widest speednet in bf16 in a fresh process: 1.04, 0.58, 0.50 s, then 0.34 s
    wide, wide_calls = cold_step(clock, 0.34, [1.04, 0.58, 0.50])
    narrow, _ = cold_step(clock, 0.11, [0.12])
    seconds = interleaved.median_seconds([wide, narrow], torch.device("cpu"))
    assert seconds == pytest.approx([0.34, 0.11])
    assert len(wide_calls) == interleaved.WARMUP_ROUNDS + interleaved.REPEATS
    # one warm-up round and the median of three read it 47% slow
    wide, _ = cold_step(clock, 0.34, [1.04, 0.58, 0.50])
    once = interleaved.median_seconds([wide], torch.device("cpu"), repeats=3, warmup=1)
    assert once[0] == pytest.approx(0.50)


def test_a_slow_spell_scales_the_candidates_alike(clock):
    # the machine runs at 2/3 speed for the steps that start between 1.6 and 5.6 s: timed one
    # after the other, the first candidate's counted steps would all fall in the spell (1.2 s
    # against 0.4 s, a ratio of 3); interleaved, the spell covers two of each one's five
    # counted rounds and the medians keep the ratio of their costs
    def costing(seconds: float):
        def step() -> None:
            clock.now += seconds * (1.5 if 1.6 <= clock.now < 5.6 else 1.0)

        return step

    seconds = interleaved.median_seconds([costing(0.8), costing(0.4)], torch.device("cpu"))
    assert seconds == pytest.approx([0.8, 0.4])
