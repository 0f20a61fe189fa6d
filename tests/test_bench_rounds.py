"""The speed benchmarks' shared timing parts (benchmarks/speed_common.py): a timed round of the
trainer's loop does the work it is timed for, and the clock waits for the GPU's kernels."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def speed_common(benchmark_module):
    return benchmark_module("speed_common")


@pytest.fixture
def trainer(speed_common, tmp_path):
    root = speed_common.write_synthetic_cifar10(tmp_path / "data", images_per_file=32, seed=1)
    return speed_common.qtrain_trainer(
        root, tmp_path / "run", images=64, width=0.125, batch_size=32, threads=1
    )


def latent_weights(trainer) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in trainer.model.parameters()])


@pytest.mark.parametrize("round_index", [0, 3, 7])
def test_every_round_the_benchmarks_time_takes_its_optimizer_steps(speed_common, trainer,
                                                                   round_index):  # fmt: skip
    # interleave times rounds 0..rounds-1 after a warm-up round at index `rounds`: each of
    # them must be a whole epoch of the trainer's loop, not an empty one past the run's end
    before = latent_weights(trainer)
    steps = []
    step = trainer.optimizer_step
    trainer.optimizer_step = lambda x, y: (steps.append(len(y)), step(x, y))[1]
    speed_common.train_round(trainer, round_index)
    assert steps == [32, 32]
    assert not torch.equal(latent_weights(trainer), before)


def test_a_round_past_the_trainers_epochs_is_refused(speed_common, trainer):
    with pytest.raises(ValueError, match="would train nothing"):
        speed_common.train_round(trainer, trainer.epochs)


def test_interleave_times_each_variant_once_a_round_after_one_warm_up(speed_common):
    calls = []
    times = speed_common.interleave({"a": calls.append, "b": lambda r: calls.append(-r)}, 3)
    assert calls == [3, -3, 0, 0, 1, -1, 2, -2]
    assert [len(t) for t in times.values()] == [3, 3]
    assert all(t >= 0 for ts in times.values() for t in ts)


def test_step_clock_counts_the_time_inside_each_step_and_ends_a_lap_per_round(speed_common):
    """bench_lm's split of a step: what the hooks read is the optimizer's step alone, summed
    over a round's steps and restarted at each lap (a fake clock the steps move by 2 s),
    the outer call only where the hooks fire again inside it (`super().step()`)."""
    now = [0.0]

    class TwoSecondSGD(torch.optim.SGD):
        def step(self, closure=None):
            now[0] += 2.0
            return super().step(closure)

    w = torch.nn.Parameter(torch.ones(3))
    w.grad = torch.ones(3)
    torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)  # SGD.step hooked too
    optimizer = TwoSecondSGD([w], lr=0.1)
    clock = speed_common.StepClock(optimizer, clock=lambda: now[0])
    for steps in (3, 1, 0):
        for _ in range(steps):
            optimizer.step()
            now[0] += 7.0  # the forward and backward passes: not the step's
        clock.lap()
    assert clock.laps == [6.0, 2.0, 0.0]
    assert torch.allclose(w.detach(), torch.full((3,), 0.6))  # the steps were taken
