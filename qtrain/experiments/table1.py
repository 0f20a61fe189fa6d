"""`qtrain reproduce table1`: the paper's Table 1 rows × its five methods (docs/paper.md §4).

Budgets:

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

from dataclasses import dataclass
from pathlib import Path

from qtrain.base.names import unknown_name
from qtrain.experiments.methods import PAPER_METHODS, MethodRow
from qtrain.report.collect import report_runs
from qtrain.train import rundir
from qtrain.train.config import RunConfig
from qtrain.train.trainer import Trainer


@dataclass(frozen=True)
class TableRow:
    model: str
    dataset: str
    big_batch: int  # the batch of big-batch SR-ADAM [paper]

    @property
    def title(self) -> str:
        return f"{self.model} {self.dataset}"


ROWS = {
    "vgg9-cifar10": TableRow("vgg9", "cifar10", 1024),
    "vggbc-cifar10": TableRow("vgg_bc", "cifar10", 1024),
    "resnet56-cifar10": TableRow("resnet56", "cifar10", 1024),
    "wrn56_2-cifar10": TableRow("wrn56_2", "cifar10", 512),
    "resnet56-cifar100": TableRow("resnet56", "cifar100", 1024),
    "resnet18-imagenet": TableRow("resnet18", "imagenet", 512),
}
BUDGETS = {
    "paper": {"epochs": 160, "width": 1.0},
    "short": {"epochs": 12, "width": 0.25},
}
BASE_BATCH = 128


def check_rows(rows: list[str] | None) -> list[str]:
    rows = list(rows or ROWS)
    for name in rows:
        if name not in ROWS:
            raise unknown_name("Table 1 row", name, ROWS)
    return rows


def row_config(
    row: TableRow, method: MethodRow, budget: str, seed: int, data_dir, download: bool
) -> RunConfig:
    if budget not in BUDGETS:
        raise ValueError(f"unknown budget {budget!r}; choose paper or short")
    return RunConfig(
        model=row.model,
        dataset=row.dataset,
        data_dir=None if data_dir is None else str(data_dir),
        download=download,
        method=method.method,
        batch_size=row.big_batch if method.big_batch else BASE_BATCH,
        lr=0.01,
        seed=seed,
        **BUDGETS[budget],
    )


def run_one(config: RunConfig, run_dir: Path, label: dict, log=print) -> None:
    """Train one cell unless finished; resume it when a checkpoint exists."""
    if rundir.is_finished(run_dir):
        log(f"skip {run_dir} (finished)")
        return
    resume = (run_dir / rundir.CHECKPOINT).exists()
    log(f"{'resume' if resume else 'train'} {run_dir}")
    Trainer(config, run_dir, log=log).run(resume=resume)
    rundir.write_json(run_dir / "label.json", label)


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
    for name in rows:
        row = ROWS[name]
        for method in PAPER_METHODS:
            for seed in range(seeds):
                config = row_config(row, method, budget, seed, data_dir, download)
                run_dir = out / name / method.slug / f"seed{seed}"
                run_one(config, run_dir, {"row": row.title, "method": method.label}, log)
    return report_runs([out / name for name in rows], out, log=log)
