"""Cells trained in worker processes (`run_cells(..., jobs=N)`): the same numbers as one at a
time, needs respected, failures and signals reported as a single run reports them."""

from __future__ import annotations

import dataclasses
import json
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from qtrain.base.errors import UserError
from qtrain.data.errors import DatasetNotFoundError
from qtrain.experiments import lm
from qtrain.experiments.runner import Cell, run_cells
from qtrain.train import rundir
from qtrain.train.config import from_dict
from qtrain.train.records import MEASURED_KEYS

pytestmark = pytest.mark.slow


def write_text(path: Path, seed: int = 0) -> Path:
    """A few kilobytes of seeded pseudo-words: enough windows for the smoke budget."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefgh ") for _ in range(rng.randrange(2, 8)))
             for _ in range(1500)]  # fmt: skip
    path.write_text(" ".join(words) + "\n")
    return path


def smoke_cells(text: Path, seeds: int = 2) -> list[Cell]:
    rows = (lm.ROWS[0], lm.ROWS[2])  # FP and BC ternary
    return [
        Cell(
            f"{row.slug}/seed{seed}",
            from_dict(lm.cell_config(row, "smoke", seed, text, download=False)),
            "gpt",
            row.name,
        )  # fmt: skip
        for row in rows
        for seed in range(seeds)
    ]


def records(folder: Path, cells: list[Cell]) -> dict:
    """Every cell's records without the fields that measure the machine."""
    return {
        c.path: [
            {k: v for k, v in r.items() if k not in MEASURED_KEYS}
            for r in rundir.read_metrics(folder / c.path)
        ]
        for c in cells
    }


def test_two_workers_give_the_numbers_of_one(tmp_path):
    text = write_text(tmp_path / "text.txt")
    cells = smoke_cells(text)
    run_cells(cells, tmp_path / "one", lambda *a, **k: None, jobs=1)
    run_cells(cells, tmp_path / "two", lambda *a, **k: None, jobs=2)
    assert records(tmp_path / "one", cells) == records(tmp_path / "two", cells)
    # a second invocation finds everything finished and trains nothing
    said = []
    run_cells(cells, tmp_path / "two", said.append, jobs=2)
    assert all(line.startswith("skip ") for line in said) and len(said) == len(cells)


def test_a_cell_starts_only_after_the_cells_it_needs_have_finished(tmp_path):
    text = write_text(tmp_path / "text.txt")
    first, *others = smoke_cells(text, seeds=2)
    needing = [dataclasses.replace(c, needs=(first.path,)) for c in others]
    folder = tmp_path / "runs"
    started = []

    def log(line, *a, **k):
        if line.startswith("train "):
            name = line.split(str(folder) + "/")[1]
            started.append((name, rundir.is_finished(folder / first.path)))

    run_cells([first, *needing], folder, log, jobs=2)
    assert started[0] == (first.path, False)
    assert all(done for _, done in started[1:]) and len(started) == 4


def test_a_need_that_comes_later_is_a_programming_error(tmp_path):
    a, b = smoke_cells(write_text(tmp_path / "t.txt"), seeds=1)
    with pytest.raises(ValueError, match="do not come before it"):
        run_cells([dataclasses.replace(a, needs=(b.path,)), b], tmp_path, jobs=2)


@pytest.mark.parametrize("jobs", [0, -1, 1.5, True])
def test_jobs_must_be_a_whole_number(tmp_path, jobs):
    with pytest.raises(UserError, match="jobs must be a whole number >= 1"):
        run_cells([], tmp_path, jobs=jobs)


def test_a_user_error_in_a_worker_is_raised_as_itself(tmp_path):
    cells = smoke_cells(tmp_path / "missing.txt", seeds=1)
    with pytest.raises(DatasetNotFoundError, match="missing.txt") as raised:
        run_cells(cells, tmp_path / "runs", lambda *a, **k: None, jobs=2)
    assert raised.value.settings == {"data_dir": "data_dir", "download": "download=True"}


SCRIPT = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_parallel_cells import smoke_cells
from qtrain.experiments.runner import run_cells
import dataclasses
if __name__ == "__main__":  # workers are spawned: they import this file again
    cells = [dataclasses.replace(c, config=dataclasses.replace(c.config, max_steps=400,
             eval_every=50)) for c in smoke_cells(Path({text!r}))]
    run_cells(cells, Path({folder!r}), print, jobs=2)
    print("done")
"""


def test_sigterm_stops_every_worker_with_a_checkpoint_and_a_rerun_completes(tmp_path):
    text = write_text(tmp_path / "text.txt")
    folder = tmp_path / "runs"
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(SCRIPT.format(
        tests=str(Path(__file__).parent), text=str(text), folder=str(folder))))  # fmt: skip
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 180
    while not list(folder.glob("*/seed*/metrics.jsonl")):  # both workers are training
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode != 0 and "done" not in out
    assert "TrainingInterrupted" in err  # the script does not catch it; the CLI would
    checkpoints = list(folder.glob("*/seed*/" + rundir.CHECKPOINT))
    assert checkpoints, "an interrupted worker saves its checkpoint"
    again = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                           timeout=600)  # fmt: skip
    assert again.returncode == 0 and again.stdout.strip().endswith("done"), again.stderr
    reference = tmp_path / "reference"
    cells = [dataclasses.replace(c, config=dataclasses.replace(c.config, max_steps=400,
             eval_every=50)) for c in smoke_cells(text)]  # fmt: skip
    run_cells(cells, reference, lambda *a, **k: None, jobs=1)
    assert records(folder, cells) == records(reference, cells)
    assert json.loads((folder / cells[0].path / "summary.json").read_text())
