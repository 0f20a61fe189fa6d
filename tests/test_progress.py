"""Progress a user can see when the output is not a terminal: a line at least every 30 s
with the step, the rate and the time left."""

from __future__ import annotations

import subprocess
import sys

from qtrain.train import progress
from qtrain.train.config import RunConfig
from qtrain.train.progress import ProgressLines, format_duration
from qtrain.train.trainer import Trainer


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_line_comes_every_interval_with_rate_and_time_left():
    clock, lines = FakeClock(), []
    report = ProgressLines(lines.append, total_steps=100, unit="images", clock=clock)
    for step in range(1, 66):
        clock.now += 1.0  # one step a second, 32 images each
        report.step(step, 32, trained_s=clock.now)
    assert lines == [
        "progress: step 30/100 (30%)  32 images/s  about 1 min 10 s left",
        "progress: step 60/100 (60%)  32 images/s  about 40 s left",
    ]


def test_the_time_left_never_exceeds_the_time_budget_and_a_resume_counts_from_itself():
    clock, lines = FakeClock(), []
    report = ProgressLines(lines.append, 1000, "tokens", budget_s=100.0, interval_s=10,
                           clock=clock)  # fmt: skip
    for step in range(501, 521):  # resumed at step 500: the mean step time is this process's
        clock.now += 1.0
        report.step(step, 768, trained_s=60.0 + clock.now)
    assert lines[0] == "progress: step 510/1000 (51%)  768 tokens/s  about 30 s left"


def test_the_rate_counts_training_time_not_an_evaluation_between_two_lines():
    """A 20-s evaluation after step 40 lengthens the wall time between two lines (31 s for 11
    steps), not the training's rate; the time left, from wall time (61 s for 41 steps),
    includes it, as evaluations recur."""
    clock, lines = FakeClock(), []
    report = ProgressLines(lines.append, total_steps=100, unit="images", clock=clock)
    trained = 0.0
    for step in range(1, 66):
        clock.now += 1.0
        trained += 1.0
        report.step(step, 32, trained_s=trained)
        if step == 40:
            clock.now += 20.0  # evaluating
    assert lines[1] == "progress: step 41/100 (41%)  32 images/s  about 1 min 28 s left"


def test_durations_read_as_a_person_would_say_them():
    assert [format_duration(s) for s in (4.4, 61, 3599, 7500)] == [
        "4 s", "1 min 1 s", "59 min 59 s", "2 h 05 min"]  # fmt: skip


def test_a_run_without_a_terminal_logs_progress_lines(tmp_path, monkeypatch):
    monkeypatch.setattr(progress, "PROGRESS_EVERY_S", 0.0)  # every step
    lines = []
    config = RunConfig(model="tiny_mlp", dataset="synthetic", epochs=2, batch_size=64,
                       device="cpu")  # fmt: skip
    trainer = Trainer(config, tmp_path, log=lines.append, progress=False)
    trainer.run()
    steps = [line for line in lines if line.startswith("progress: ")]
    assert len(steps) == trainer.total_steps
    assert steps[-1].startswith(f"progress: step {trainer.total_steps}/{trainer.total_steps}")
    assert all(" images/s  about " in line and line.endswith(" left") for line in steps)
    lines.clear()
    Trainer(config, tmp_path / "tty", log=lines.append, progress=True).run()
    assert not any(line.startswith("progress: ") for line in lines)


def test_the_command_line_writes_each_line_as_it_comes_into_a_pipe(tmp_path):
    """The first line of a run reaches a pipe before the run ends (stdout is line-buffered)."""
    argv = [sys.executable, "-m", "qtrain", "train", "--model", "tiny_mlp", "--dataset",
            "synthetic", "--epochs", "200", "--batch-size", "64", "--set", "device=cpu",
            "--set", "schedule=constant", "--out", str(tmp_path / "run")]  # fmt: skip
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True)  # fmt: skip
    try:
        first = process.stdout.readline()
        assert first.startswith("epoch ") and process.poll() is None
    finally:
        process.kill()
        process.wait()
