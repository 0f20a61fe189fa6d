"""`qtrain reproduce methods`: every method of qtrain side by side on VGG-9, real CIFAR-10.

Weights of every convolution are binary (the paper's policy: linear layers, BatchNorm and
biases stay in float). Cells (docs/methods.md says why each is there):

| label             | method      | scale   | activations      |
|-------------------|-------------|---------|------------------|
| FP-ADAM           | fp-adam     | none    | float            |
| BC-ADAM           | bc-adam     | none    | float and binary |
| BC-ADAM + he      | bc-adam     | he      | float            |
| BC-ADAM + absmean | bc-adam     | absmean | float and binary |
| SR-ADAM           | sr-adam     | none    | float            |
| R-ADAM            | r-adam      | none    | float            |
| Bop               | bop-adam    | none    | float and binary |
| Bop2              | bop2-adam   | none    | float and binary |

With binary activations only methods that train binary networks in their own papers run:
BC-ADAM (BinaryNet's rule), BC-ADAM + absmean (XNOR-Net's scaled binary weights), Bop and
Bop2 (both evaluated on binary-activation networks). FP-ADAM has float weights, so it is not a
binary network; SR-ADAM and R-ADAM already trail BC-ADAM with float activations (Table 1);
BC-ADAM + he differs from BC-ADAM only by a per-layer constant in front of a BatchNorm.

Every method uses its documented defaults, never tuned here: Adam with the paper's
BC-ADAM recipe (lr 0.01, batch 128, ×0.1 at 50% and 75% of training) for every parameter
Adam trains; Bop with larq's γ = 1e-4, τ = 1e-8 and Bop2 with its paper's CIFAR preset
(γ = 1e-7, τ = 1e-5, σ = 1e-3), as the presets `bop-adam` and `bop2-adam` define them.

Budgets:

| budget | width | training images | epochs | seeds | cells × seeds |
|--------|-------|-----------------|--------|-------|---------------|
| cpu    | 0.25  | 8,192           | 6      | 2     | 12 × 2 = 24   |
| paper  | 1.0   | 50,000          | 160    | 3     | 12 × 3 = 36   |
| smoke  | 0.125 | 512 synthetic   | 1      | 1     | 12 × 1 = 12   |

Sizing of `cpu` (measured with `qtrain train --model vgg9 --width 0.25 --set threads=1
--set train_subset=4000 --epochs 1` on real CIFAR-10 while other work shared the machine):
about 12 s for 4,000 training images plus the 10,000 test images and start-up. An epoch of
8,192 images is then about 16 s, a cell of 6 epochs (384 steps) about 100 s, and 24 cells
about 40 minutes on one core. Its errors are far above the paper's (160 epochs of 391
steps); it compares methods at one small budget, nothing more. `smoke` runs every cell for
seconds on synthetic images, offline: it tests the machinery, and its numbers mean nothing.
Runs live in OUT/methods-<budget>/<column>/seed<k> (`runner`): finished cells are skipped and
interrupted ones resumed, so the command can be re-run until it completes.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

from qtrain.base.io import atomic_write_text
from qtrain.experiments.runner import (
    Budget,
    Cell,
    Finished,
    check_seeds,
    experiment_folder,
    pick_budget,
    run_cells,
)
from qtrain.report.figures import plot_error_curves
from qtrain.report.tables import format_cell
from qtrain.train.config import from_dict


@dataclass(frozen=True)
class Column:
    """One column of the comparison: a method preset, a weight scale, an activation kind."""

    label: str  # as printed in the table and legends
    method: str  # preset name for qtrain.methods.create
    scale: str = "none"
    activations: str = "float"

    @property
    def slug(self) -> str:
        """Folder name, e.g. 'bc-adam+absmean-binary'."""
        return f"{self.label.lower().replace(' + ', '+').replace(' ', '-')}-{self.activations}"


FLOAT_ACTIVATION_COLUMNS = (
    Column("FP-ADAM", "fp-adam"),
    Column("BC-ADAM", "bc-adam"),
    Column("BC-ADAM + he", "bc-adam", scale="he"),
    Column("BC-ADAM + absmean", "bc-adam", scale="absmean"),
    Column("SR-ADAM", "sr-adam"),
    Column("R-ADAM", "r-adam"),
    Column("Bop", "bop-adam"),
    Column("Bop2", "bop2-adam"),
)
BINARY_ACTIVATION_LABELS = ("BC-ADAM", "BC-ADAM + absmean", "Bop", "Bop2")
COLUMNS = FLOAT_ACTIVATION_COLUMNS + tuple(
    replace(c, activations="binary")
    for c in FLOAT_ACTIVATION_COLUMNS
    if c.label in BINARY_ACTIVATION_LABELS
)

BUDGETS = {
    "cpu": Budget("width 0.25, 8,192 images, 6 epochs: about 40 minutes on one core", seeds=2,
                  settings={"width": 0.25, "train_subset": 8192, "epochs": 6}),
    "paper": Budget("the paper's width and data, 160 epochs", seeds=3,
                    settings={"width": 1.0, "train_subset": None, "epochs": 160}),
    "smoke": Budget("seconds on synthetic images: tests the machinery only", seeds=1,
                    settings={"width": 0.125, "dataset": "synthetic", "epochs": 1,
                              "batch_size": 64}),
}  # fmt: skip
RECIPE = {"model": "vgg9", "dataset": "cifar10", "grid": "binary", "batch_size": 128, "lr": 0.01,
          # one intra-op thread: on a shared 2-core machine two OpenMP threads wait on each
          # other (docs/speed.md); it does not change which numbers a cell computes twice
          "threads": 1}  # fmt: skip
PANELS = {"float": "VGG-9, binary weights, float activations", "binary": "VGG-9, fully binary"}


def cell_config(
    column: Column, budget: str, seed: int, data_dir=None, download: bool = True
) -> dict:
    """The RunConfig dict of one (column, seed) under `budget`."""
    return {
        **RECIPE,
        **pick_budget(BUDGETS, budget, "methods").settings,
        "method": column.method,
        "scale": column.scale,
        "activations": column.activations,
        "seed": seed,
        "data_dir": None if data_dir is None else str(data_dir),
        "download": download,
    }


def cells(budget: str, seeds: int, data_dir=None, download: bool = True) -> list[Cell]:
    """Every (column, seed) cell under `budget`; a cell's row is its panel."""
    return [
        Cell(
            f"{column.slug}/seed{seed}",
            from_dict(cell_config(column, budget, seed, data_dir, download)),
            PANELS[column.activations],
            column.label,
        )
        for column in COLUMNS
        for seed in range(seeds)
    ]


def flips_per_epoch(metrics: list[dict]) -> float:
    """Mean over epochs of (flip fraction per step) × (steps per epoch): the fraction of the
    binary weights that change sign during one epoch, counted with repetition. The steps of
    an epoch are those of the first record (its `step`, the run's steps so far)."""
    return statistics.fmean(m["flip_rate"] for m in metrics) * metrics[0]["step"]


def result(finished: Finished) -> dict:
    """The table's numbers of one finished cell."""
    metrics = finished.metrics
    return {
        "label": finished.cell.method,
        "activations": finished.cell.config.activations,
        "seed": finished.cell.config.seed,
        "test_error": metrics[-1]["test_error"],
        "train_error": metrics[-1]["train_error"],
        "flips": flips_per_epoch(metrics),
        "minutes": sum(m["seconds"] for m in metrics) / 60,
    }


def summarize(results: list[dict]) -> list[dict]:
    """One row per column: test/train error, flips per epoch and minutes, over seeds."""
    rows = []
    for column in COLUMNS:
        runs = [
            r
            for r in results
            if (r["label"], r["activations"]) == (column.label, column.activations)
        ]
        if not runs:
            continue
        rows.append(
            {
                "label": column.label,
                "activations": column.activations,
                "seeds": len(runs),
                **{key: [r[key] for r in runs] for key in ("test_error", "flips", "minutes")},
                "train_error": [r["train_error"] for r in runs],
            }
        )
    return rows


def markdown(rows: list[dict], title: str) -> str:
    """table.md: one line per column, mean ± std over seeds."""
    lines = [
        f"{title}\n",
        "| method | activations | test error (%) | train error (%) | flips / weight / epoch "
        "| minutes |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        flips = statistics.fmean(r["flips"])
        lines.append(
            f"| {r['label']} | {r['activations']} | {format_cell(r['test_error'])} "
            f"| {format_cell(r['train_error'])} | {flips:.3g} | {format_cell(r['minutes'])} |"
        )
    return "\n".join(lines) + "\n"


def panels_of(finished: list[Finished]) -> dict[str, dict[str, list]]:
    """{panel title: {column label: [records of each seed]}} for the error curves."""
    panels: dict[str, dict[str, list]] = {}
    for f in finished:
        panels.setdefault(f.cell.row, {}).setdefault(f.cell.method, []).append(f.metrics)
    return panels


def run(
    out: Path,
    budget: str = "cpu",
    seeds: int | None = None,
    data_dir=None,
    download: bool = True,
    log=print,
    jobs: int = 1,
) -> list[dict]:
    """Train every (column, seed) cell, `jobs` at a time, then write table.md, table.json
    and curves.png into OUT/methods-<budget>."""
    chosen = pick_budget(BUDGETS, budget, "methods")
    seeds = check_seeds(seeds, chosen)
    folder = experiment_folder(out, "methods", budget)
    finished = run_cells(cells(budget, seeds, data_dir, download), folder, log, jobs)
    results = [result(f) for f in finished]
    rows = summarize(results)
    config = finished[0].cell.config
    title = (
        f"VGG-9 on {config.dataset}, binary conv weights, budget {budget} (width "
        f"{config.width:g}, {config.epochs} epochs, {seeds} seeds); mean ± std over seeds."
    )
    table = markdown(rows, title)
    atomic_write_text(folder / "table.md", table)
    atomic_write_text(folder / "table.json", json.dumps({"runs": results, "rows": rows}, indent=2))
    plot_error_curves(panels_of(finished), folder / "curves.png")
    log(table, end="")
    log(f"wrote {folder / 'table.md'}, {folder / 'table.json'} and {folder / 'curves.png'}")
    return rows
