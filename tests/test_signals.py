"""SIGTERM (a scheduler's pre-emption notice) and SIGINT (Ctrl-C) stop `qtrain train` cleanly.

A real `python -m qtrain train` process gets the signal while it trains. It must finish the
step, save a checkpoint, print one line on stderr and exit with 128 + the signal number; the
checkpoint must resume to exactly the weights of a run that was never interrupted.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qtrain.cli import main
from qtrain.train import rundir
from qtrain.train.checkpoint import load_checkpoint

STARTUP_LIMIT_S = 120.0  # interpreter + torch import on a busy 2-core machine
EXIT_LIMIT_S = 60.0


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """The in-process runs set one intra-op thread (threads=1); later tests get theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def train_argv(out: Path, epochs: int) -> list[str]:
    # A constant schedule makes the run's length irrelevant to every step, so a long run
    # stopped in epoch E can be compared with a short run of E + 1 epochs.
    return [
        "train",
        "--model",
        "tiny_mlp",
        "--dataset",
        "synthetic",
        "--epochs",
        str(epochs),
        "--batch-size",
        "64",
        "--method",
        "bc-adam",
        "--set",
        "device=cpu",
        "--set",
        "channels_last=false",
        "--set",
        "schedule=constant",
        "--set",
        "checkpoint_every_steps=1",
        "--set",
        "threads=1",
        "--out",
        str(out),
    ]


def wait_for(path: Path, process: subprocess.Popen, limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    while not path.exists():
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, f"{path} did not appear within {limit_s} s"
        time.sleep(0.02)


def test_sigterm_and_sigint_save_a_checkpoint_and_exit_with_one_line(tmp_path, capsys):
    signals = {"sigterm": signal.SIGTERM, "sigint": signal.SIGINT}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # Both runs start together: the interpreter start-up dominates and there are two cores.
    processes = {
        name: subprocess.Popen(
            [sys.executable, "-m", "qtrain", *train_argv(tmp_path / name, epochs=10_000)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for name in signals
    }
    try:
        for name, process in processes.items():
            # The first checkpoint is written inside the loop that handles the signals.
            wait_for(tmp_path / name / rundir.CHECKPOINT, process, STARTUP_LIMIT_S)
            process.send_signal(signals[name])
        outcomes = {name: p.communicate(timeout=EXIT_LIMIT_S) for name, p in processes.items()}
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()

    for name, sig in signals.items():
        _, err = outcomes[name]
        assert processes[name].returncode == 128 + sig, err
        assert err.strip().splitlines() == [
            "qtrain: interrupted; a checkpoint was saved, continue with --resume"
        ]
        training = load_checkpoint(tmp_path / name)["training"]
        assert not training["finished"] and training["epoch"] < 10_000

        # Resume to the end of the interrupted epoch and compare with a run never stopped.
        epochs = training["epoch"] + 1
        assert main([*train_argv(tmp_path / name, epochs), "--resume"]) == 0
        assert main(train_argv(tmp_path / f"{name}-reference", epochs)) == 0
        capsys.readouterr()
        got = load_checkpoint(tmp_path / name)["model_state"]
        want = load_checkpoint(tmp_path / f"{name}-reference")["model_state"]
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in got)


def test_a_stop_asked_for_after_the_last_step_still_stops_an_experiment(tmp_path, monkeypatch):
    """SIGTERM during a cell's final evaluation: that cell ends finished, and the experiment
    stops instead of training its next cell (found by benchmarks/soak.py)."""
    import signal

    from qtrain.experiments.runner import Cell, run_cells
    from qtrain.train import rundir
    from qtrain.train.config import RunConfig
    from qtrain.train.trainer import Trainer, TrainingInterrupted

    finish = Trainer._finish_epoch

    def finish_then_sigterm(self, state):
        record = finish(self, state)
        self._request_stop(signal.SIGTERM)  # as the handler does when the signal arrives
        return record

    monkeypatch.setattr(Trainer, "_finish_epoch", finish_then_sigterm)
    config = RunConfig(model="tiny_mlp", dataset="synthetic", epochs=1, batch_size=64,
                       device="cpu")  # fmt: skip
    cells = [Cell("a", config, "r", "m"), Cell("b", config.replace(seed=1), "r", "m")]
    with pytest.raises(TrainingInterrupted):
        run_cells(cells, tmp_path, log=lambda *a, **k: None)
    assert rundir.is_finished(tmp_path / "a") and not (tmp_path / "b" / rundir.CONFIG).exists()
