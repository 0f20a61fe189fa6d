"""`qtrain reproduce table1`: the paper's Table 1 rows × its five methods (docs/paper.md §4).

The rows are the shipped presets (qtrain/configs): ROW.toml gives the model, data set and
settings of FP/BC/SR/R-ADAM, ROW-sr-bigbatch.toml those of big-batch SR-ADAM.

Budgets:

| budget | epochs | width | batch (big batch)                      | training images          |
|--------|--------|-------|----------------------------------------|--------------------------|
| paper  | 160    | 1.0   | 128 (1024; 512 for WRN-56-2/ResNet-18) | all (50,000)             |
| short  | 12     | 0.25  | 128 (1024; 512 for WRN-56-2/ResNet-18) | all (50,000)             |
| smoke  | 1      | 0.125 | 64 for every cell                      | 512 synthetic, 128 test  |

`short` keeps the paper's data, learning rate 0.01, schedule shape and batch sizes, and shrinks
only the channel width and the number of epochs, so that the VGG-9 row of five methods
finishes in under an hour on a 2-core CPU. Its absolute errors are higher than the paper's;
the ordering of the methods is what it tests. `smoke` runs every cell for seconds on
synthetic images of the row's shape, offline: it tests the machinery, and its numbers mean
nothing. Runs live in OUT/table1-<budget>/<row>/<method>/seed<k> (`runner`): finished runs
are skipped and interrupted ones resumed, so the command can be re-run after a crash until it
completes.
"""

from __future__ import annotations

from pathlib import Path

from qtrain.base.names import unknown_name
from qtrain.experiments.methods import PAPER_METHODS, MethodRow
from qtrain.experiments.runner import (
    Budget,
    Cell,
    check_seeds,
    experiment_folder,
    pick_budget,
    run_cells,
)
from qtrain.report.collect import load_run, write_report
from qtrain.train.config import RunConfig, from_dict, load_toml

# Each row is the shipped preset of that name (qtrain/configs); its big-batch SR-ADAM cell is
# the preset ROW-sr-bigbatch. The presets are the one source of every row's settings.
ROWS = (
    "vgg9-cifar10",
    "vgg_bc-cifar10",
    "resnet56-cifar10",
    "wrn56_2-cifar10",
    "resnet56-cifar100",
    "resnet18-imagenet",
)
BIG_BATCH = "-sr-bigbatch"
SMOKE = {"dataset": "synthetic", "epochs": 1, "width": 0.125, "batch_size": 64}
BUDGETS = {
    "paper": Budget("the paper's settings (the presets as shipped)", seeds=1),
    "short": Budget("width 0.25, 12 epochs: the method ordering in hours on a CPU", seeds=1,
                    settings={"epochs": 12, "width": 0.25}),
    "smoke": Budget("seconds on synthetic images: tests the machinery only", seeds=1,
                    settings=SMOKE),
}  # fmt: skip


def check_rows(rows: list[str] | None) -> list[str]:
    rows = list(rows or ROWS)
    for name in rows:
        if name not in ROWS:
            raise unknown_name("Table 1 row", name, ROWS)
    return rows


def row_title(row: str) -> str:
    """The row as printed in the table: its preset's model and data set."""
    values = load_toml(row)
    return f"{values['model']} {values['dataset']}"


def row_config(
    row: str, method: MethodRow, budget: str, seed: int, data_dir, download: bool
) -> RunConfig:
    """The config of one cell: the row's preset (or its big-batch preset) with the method,
    the budget, the seed and where the data lives."""
    settings = pick_budget(BUDGETS, budget, "table1").settings
    values = load_toml(f"{check_rows([row])[0]}{BIG_BATCH if method.big_batch else ''}")
    return from_dict(
        {
            **values,
            "method": method.method,
            "seed": seed,
            "data_dir": None if data_dir is None else str(data_dir),
            "download": download,
            **settings,
        }
    )


def cells(rows: list[str], budget: str, seeds: int, data_dir=None, download=True) -> list[Cell]:
    """Every (row, method, seed) cell of the table under `budget`."""
    return [
        Cell(
            f"{row}/{method.slug}/seed{seed}",
            row_config(row, method, budget, seed, data_dir, download),
            row_title(row),
            method.label,
        )
        for row in check_rows(rows)
        for method in PAPER_METHODS
        for seed in range(seeds)
    ]


def run(
    out: Path,
    rows: list[str] | None = None,
    budget: str = "short",
    seeds: int | None = None,
    data_dir=None,
    download: bool = True,
    log=print,
) -> dict:
    """Train every (row, method, seed) cell, then write the table and the Figure 6 panels
    into OUT/table1-<budget>."""
    seeds = check_seeds(seeds, pick_budget(BUDGETS, budget, "table1"))
    folder = experiment_folder(out, "table1", budget)
    finished = run_cells(cells(rows, budget, seeds, data_dir, download), folder, log)
    return write_report([load_run(f.run_dir) for f in finished], folder, log=log)
