"""`qtrain reproduce table1`: the paper's Table 1 rows × its five methods (docs/paper.md §4).

Budgets:

The rows are the shipped presets (qtrain/configs): ROW.toml gives the model, data set and
settings of FP/BC/SR/R-ADAM, ROW-sr-bigbatch.toml those of big-batch SR-ADAM.

| budget | epochs | width | batch (big batch)                     | training images    |
|--------|--------|-------|---------------------------------------|--------------------|
| paper  | 160    | 1.0   | 128 (1024; 512 for WRN-56-2/ResNet-18) | all (50,000)       |
| short  | 12     | 0.25  | 128 (1024; 512 for WRN-56-2/ResNet-18) | all (50,000)       |

`short` keeps the paper's data, learning rate 0.01, schedule shape and batch sizes, and shrinks
only the channel width and the number of epochs, so that the VGG-9 row of five methods
finishes in under an hour on a 2-core CPU. Its absolute errors are
higher than the paper's; the ordering of the methods is what it tests. Finished runs are
skipped and interrupted ones resumed, so the command can be re-run after a crash until it
completes.
"""

from __future__ import annotations

from pathlib import Path

from qtrain.base.names import unknown_name
from qtrain.experiments.methods import PAPER_METHODS, MethodRow
from qtrain.report.collect import report_runs
from qtrain.train import rundir
from qtrain.train.config import RunConfig, from_dict, load_toml
from qtrain.train.trainer import Trainer

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
BUDGETS = {
    "paper": {},  # the presets' own settings
    "short": {"epochs": 12, "width": 0.25},
}
LABEL = "label.json"


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
    if budget not in BUDGETS:
        raise unknown_name("budget", budget, BUDGETS)
    values = load_toml(f"{check_rows([row])[0]}{BIG_BATCH if method.big_batch else ''}")
    return from_dict(
        {
            **values,
            "method": method.method,
            "seed": seed,
            "data_dir": None if data_dir is None else str(data_dir),
            "download": download,
            **BUDGETS[budget],
        }
    )


def run_one(config: RunConfig, run_dir: Path, label: dict, log=print) -> None:
    """Train one cell unless finished; resume it when a checkpoint exists.

    The cell's label is written before training starts, so a run folder never holds training
    output without its label, whenever the process stops (two cells with one method preset,
    such as SR-ADAM and big-batch SR-ADAM, are told apart only by it).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / LABEL).exists():
        rundir.write_json(run_dir / LABEL, label)
    if rundir.is_finished(run_dir):
        log(f"skip {run_dir} (finished)")
        return
    resume = (run_dir / rundir.CHECKPOINT).exists()
    log(f"{'resume' if resume else 'train'} {run_dir}")
    Trainer(config, run_dir, log=log).run(resume=resume)


def run(
    out: Path,
    rows: list[str] | None = None,
    budget: str = "short",
    seeds: int = 1,
    data_dir=None,
    download: bool = True,
    log=print,
) -> dict:
    """Train every (row, method, seed) cell, then write the table and the Figure 6 panels."""
    rows = check_rows(rows)
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    for row in rows:
        title = row_title(row)
        for method in PAPER_METHODS:
            for seed in range(seeds):
                config = row_config(row, method, budget, seed, data_dir, download)
                run_dir = out / row / method.slug / f"seed{seed}"
                run_one(config, run_dir, {"row": title, "method": method.label}, log)
    return report_runs([out / row for row in rows], out, log=log)
