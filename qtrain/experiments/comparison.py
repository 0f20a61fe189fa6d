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

Sizing of `cpu` (measured with `qtrain train --model vgg9 --width 0.25 --set threads=1
--set train_subset=4000 --epochs 1` on real CIFAR-10 while other work shared the machine):
about 12 s for 4,000 training images plus the 10,000 test images and start-up. An epoch of
8,192 images is then about 16 s, a cell of 6 epochs (384 steps) about 100 s, and 24 cells
about 40 minutes on one core. Its errors are far above the paper's (160 epochs of 391
steps); it compares methods at one small budget, nothing more. Finished cells are skipped
and interrupted ones resumed, so the command can be re-run until it completes.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

from qtrain.base.io import atomic_write_text
from qtrain.base.names import unknown_name
from qtrain.report.figures import plot_error_curves
from qtrain.report.tables import format_cell
from qtrain.train import rundir

CIFAR10_TRAIN_IMAGES = 50_000


@dataclass(frozen=True)
class Cell:
    """One column of the comparison: a method preset, a weight scale, an activation kind."""

    label: str  # as printed in the table and legends
    method: str  # preset name for qtrain.methods.create
    scale: str = "none"
    activations: str = "float"

    @property
    def slug(self) -> str:
        """Folder name, e.g. 'bc-adam+absmean-binary'."""
        return f"{self.label.lower().replace(' + ', '+').replace(' ', '-')}-{self.activations}"


FLOAT_ACTIVATION_CELLS = (
    Cell("FP-ADAM", "fp-adam"),
    Cell("BC-ADAM", "bc-adam"),
    Cell("BC-ADAM + he", "bc-adam", scale="he"),
    Cell("BC-ADAM + absmean", "bc-adam", scale="absmean"),
    Cell("SR-ADAM", "sr-adam"),
    Cell("R-ADAM", "r-adam"),
    Cell("Bop", "bop-adam"),
    Cell("Bop2", "bop2-adam"),
)
BINARY_ACTIVATION_LABELS = ("BC-ADAM", "BC-ADAM + absmean", "Bop", "Bop2")
CELLS = FLOAT_ACTIVATION_CELLS + tuple(
    replace(c, activations="binary")
    for c in FLOAT_ACTIVATION_CELLS
    if c.label in BINARY_ACTIVATION_LABELS
)

BUDGETS = {
    "cpu": {"width": 0.25, "train_subset": 8192, "epochs": 6, "seeds": 2},
    "paper": {"width": 1.0, "train_subset": None, "epochs": 160, "seeds": 3},
}
RECIPE = {"model": "vgg9", "dataset": "cifar10", "grid": "binary", "batch_size": 128, "lr": 0.01,
          # one intra-op thread: on a shared 2-core machine two OpenMP threads wait on each
          # other (docs/speed.md); it does not change which numbers a cell computes twice
          "threads": 1}  # fmt: skip
PANELS = {"float": "VGG-9, binary weights, float activations", "binary": "VGG-9, fully binary"}


def pick_budget(budgets: dict, budget: str, experiment: str) -> dict:
    """`budgets[budget]`, or a ValueError naming the experiment's budgets."""
    if budget not in budgets:
        raise unknown_name(f"{experiment} budget", budget, budgets)
    return budgets[budget]


def check_budget(budget: str) -> dict:
    """The settings of `budget`, or a ValueError naming the budgets."""
    return pick_budget(BUDGETS, budget, "methods")


def cell_config(cell: Cell, budget: str, seed: int, data_dir=None, download: bool = True) -> dict:
    """The RunConfig dict of one (cell, seed) under `budget`."""
    settings = {k: v for k, v in check_budget(budget).items() if k != "seeds"}
    return {
        **RECIPE,
        **settings,
        "method": cell.method,
        "scale": cell.scale,
        "activations": cell.activations,
        "seed": seed,
        "data_dir": None if data_dir is None else str(data_dir),
        "download": download,
    }


def train_cell(config: dict, run_dir: Path, resume: bool, log) -> None:
    """Train one RunConfig dict into `run_dir` (resuming from its checkpoint if asked)."""
    from qtrain.train.config import from_dict
    from qtrain.train.trainer import train

    train(from_dict(config), run_dir, resume=resume, log=log)


CELL_FILE = "cell.json"  # the RunConfig dict a folder trains, written before training starts


def read_cell(run_dir: Path) -> dict:
    """The RunConfig dict stored in `run_dir` by `run_cell` ({} when there is none)."""
    path = run_dir / CELL_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _check_same_run(config: dict, run_dir: Path) -> None:
    """A run folder is reused only if it was started with `config`'s identity."""
    from qtrain.train.config import from_dict, identity_change

    change = identity_change(read_cell(run_dir), from_dict(config))
    if change is not None:
        key, before, after = change
        raise ValueError(
            f"{run_dir} holds a run with {key}={before!r}, not {after!r}; "
            "pass another --out or delete that folder"
        )


def run_cell(config: dict, run_dir: Path, label: dict, log=print) -> None:
    """Train one cell unless finished; resume it when a checkpoint exists."""
    if (run_dir / CELL_FILE).exists():
        _check_same_run(config, run_dir)
    if rundir.is_finished(run_dir):
        log(f"skip {run_dir} (finished)")
        return
    resume = (run_dir / rundir.CHECKPOINT).exists()
    log(f"{'resume' if resume else 'train'} {run_dir}")
    atomic_write_text(run_dir / CELL_FILE, json.dumps(config, indent=1))
    rundir.write_json(run_dir / "label.json", label)
    train_cell(config, run_dir, resume, log)


def flips_per_epoch(metrics: list[dict], config: dict) -> float:
    """Mean over epochs of (flip fraction per step) × (steps per epoch): the fraction of the
    binary weights that change sign during one epoch, counted with repetition."""
    images = config.get("train_subset") or CIFAR10_TRAIN_IMAGES
    steps = images // config["batch_size"]  # the training loader drops the last partial batch
    return statistics.fmean(m["flip_rate"] for m in metrics) * steps


def summarize(results: list[dict]) -> list[dict]:
    """One row per cell: test/train error, flips per epoch and minutes, over seeds."""
    rows = []
    for cell in CELLS:
        runs = [r for r in results if r["slug"] == cell.slug]
        if not runs:
            continue
        rows.append(
            {
                "label": cell.label,
                "activations": cell.activations,
                "seeds": len(runs),
                **{key: [r[key] for r in runs] for key in ("test_error", "flips", "minutes")},
                "train_error": [r["train_error"] for r in runs],
            }
        )
    return rows


def markdown(rows: list[dict], title: str) -> str:
    """table.md: one line per cell, mean ± std over seeds."""
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


def collect(out: Path, seeds: int) -> tuple[list[dict], dict]:
    """Per-run results and the error-curve panels of every cell's finished runs."""
    results: list[dict] = []
    panels: dict[str, dict[str, list]] = {title: {} for title in PANELS.values()}
    for cell in CELLS:
        for seed in range(seeds):
            run_dir = out / cell.slug / f"seed{seed}"
            if not rundir.is_finished(run_dir):
                continue
            metrics = rundir.read_metrics(run_dir)
            config = read_cell(run_dir)
            results.append(
                {
                    "slug": cell.slug,
                    "seed": seed,
                    "test_error": metrics[-1]["test_error"],
                    "train_error": metrics[-1]["train_error"],
                    "flips": flips_per_epoch(metrics, config),
                    "minutes": sum(m["seconds"] for m in metrics) / 60,
                }
            )
            panel = panels[PANELS[cell.activations]]
            panel.setdefault(cell.label, []).append(metrics)
    return results, {title: runs for title, runs in panels.items() if runs}


def run(
    out: Path,
    budget: str = "cpu",
    seeds: int | None = None,
    data_dir=None,
    download: bool = True,
    log=print,
) -> list[dict]:
    """Train every (cell, seed), then write table.md, table.json and curves.png to `out`."""
    settings = check_budget(budget)
    seeds = settings["seeds"] if seeds is None else seeds
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    for cell in CELLS:
        for seed in range(seeds):
            config = cell_config(cell, budget, seed, data_dir, download)
            label = {"row": PANELS[cell.activations], "method": cell.label}
            run_cell(config, out / cell.slug / f"seed{seed}", label, log)
    results, panels = collect(out, seeds)
    rows = summarize(results)
    title = (
        f"VGG-9 on CIFAR-10, binary conv weights, budget {budget} (width {settings['width']}, "
        f"{settings['epochs']} epochs, {seeds} seeds); mean ± std over seeds."
    )
    table = markdown(rows, title)
    atomic_write_text(out / "table.md", table)
    atomic_write_text(out / "table.json", json.dumps({"runs": results, "rows": rows}, indent=2))
    plot_error_curves(panels, out / "curves.png")
    log(table, end="")
    log(f"wrote {out / 'table.md'}, {out / 'table.json'} and {out / 'curves.png'}")
    return rows
