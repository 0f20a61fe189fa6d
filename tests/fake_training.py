"""A stand-in for training an experiment's cells: fast, deterministic, and it leaves in a run
folder what the trainer leaves (config.toml, metrics.jsonl, a checkpoint, summary.json)."""

from __future__ import annotations

import random

import pytest

from qtrain.experiments import runner
from qtrain.train import rundir
from qtrain.train.config import RunConfig
from qtrain.train.devices import resolve_amp, resolve_device


def fake_metrics(config: RunConfig) -> list[dict]:
    """Per-epoch records drawn from a generator seeded by the cell's identity, so cells and
    budgets differ."""
    rng = random.Random(repr(sorted(config.to_dict().items(), key=lambda kv: kv[0])))
    steps = 10 + rng.randrange(10)
    return [
        {
            "epoch": e + 1,
            "step": steps * (e + 1),
            "train_error": rng.uniform(0, 90),
            "test_error": rng.uniform(0, 90),
            "test_loss": rng.uniform(0, 3),
            "val_loss": rng.uniform(1, 3),
            "val_bpc": rng.uniform(1, 4),
            "flip_rate": rng.uniform(0, 0.01),
            "wb_wr_gap": rng.uniform(0, 1),
            "seconds": rng.uniform(1, 100),
        }
        for e in range(config.epochs)
    ]


def write_fake_run(config: RunConfig, run_dir, finished: bool = True) -> None:
    """What the trainer leaves in a run folder: a finished run its summary (and no checkpoint,
    which reports would read for the model's size), an interrupted one a checkpoint. As the
    trainer does, the config records the precision "auto" resolves to here."""
    rundir.write_run_files(run_dir, resolve_amp(config, resolve_device(config.device)))
    rundir.write_metrics(run_dir, fake_metrics(config))
    if finished:
        rundir.write_json(run_dir / rundir.SUMMARY, {})
    else:
        (run_dir / rundir.CHECKPOINT).write_bytes(b"fake")


@pytest.fixture
def fake_training(monkeypatch) -> list[tuple[RunConfig, bool]]:
    """Replace training of experiment cells by `write_fake_run`; the (config, resume) of every
    cell trained is recorded in the returned list."""
    calls: list[tuple[RunConfig, bool]] = []

    def train_cell(config, run_dir, resume, log):
        calls.append((config, resume))  # as the experiment asked for it
        write_fake_run(config, run_dir)

    monkeypatch.setattr(runner, "train_cell", train_cell)
    return calls
