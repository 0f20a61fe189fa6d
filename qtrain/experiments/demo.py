"""`qtrain demo`: the paper's five methods on the embedded handwritten digits, offline.

Trains `tiny_cnn` on scikit-learn's 8×8 digits with FP-ADAM, BC-ADAM, big-batch SR-ADAM,
SR-ADAM and R-ADAM (learning rate 0.01, the paper's default), three seeds each, then prints a
Table-1-style table (mean ± std over seeds) and writes into OUT/demo-<budget>:

    table.json   one object per method: method, test_error (% mean over seeds),
                 test_error_std, test_errors, train_error (%), epochs, seconds,
                 packed_bytes, float_bytes
    curves.png   Figure 6 style: train error solid, test error dashed
    <method>/seed<k>/  the full run folders (config, metrics, checkpoint)

Budgets: `full` (20 epochs, 3 seeds) and `smoke` (1 epoch, 1 seed). The cells run through
`runner`: a second `qtrain demo` reads the finished runs back instead of training them again.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

from qtrain.base.errors import UserError
from qtrain.base.io import atomic_write_text
from qtrain.experiments.methods import PAPER_METHODS
from qtrain.experiments.runner import (
    Budget,
    Cell,
    available_cores,
    check_seeds,
    experiment_folder,
    pick_budget,
    run_cells,
)
from qtrain.export.loading import load_any_model, summary_of
from qtrain.report.figures import plot_error_curves
from qtrain.report.tables import format_cell, mean_std
from qtrain.train.config import RunConfig

DEMO_BATCH = 32
BIG_BATCH = 256  # 8× the base batch, as 1024 vs 128 in the paper
# 300 test images: one image is 0.33%, so single runs differ by noise; hence three seeds.
BUDGETS = {
    "full": Budget("20 epochs, 3 seeds: about a minute", seeds=3, settings={"epochs": 20}),
    "smoke": Budget("1 epoch, 1 seed: tests the machinery only", seeds=1,
                    settings={"epochs": 1}),
}  # fmt: skip


def demo_config(method: str, batch_size: int, epochs: int, seed: int) -> RunConfig:
    return RunConfig(
        model="tiny_cnn",
        dataset="digits",
        method=method,
        epochs=epochs,
        batch_size=batch_size,
        lr=0.01,
        seed=seed,
        device="cpu",
        # float32 on every CPU, so that the demo prints the same table on any machine (amp
        # "auto" would pick bf16 where it is native)
        amp="off",
        eval_batch_size=500,
        # A tiny CNN gains nothing from a second thread, and on a busy machine two OpenMP
        # threads wait on each other: measured 0.2 s an epoch with one, 6.8 s with two.
        threads=1,
    )


def cells(epochs: int, seed: int, seeds: int) -> list[Cell]:
    """Every (method, seed) cell: seeds `seed` to `seed + seeds - 1`."""
    return [
        Cell(
            f"{row.slug}/seed{seed + k}",
            demo_config(row.method, BIG_BATCH if row.big_batch else DEMO_BATCH, epochs, seed + k),
            "tiny_cnn digits",
            row.label,
        )
        for row in PAPER_METHODS
        for k in range(seeds)
    ]


def _model_bytes(run_dir: Path) -> dict:
    """Float vs packed storage of the trained model (1 bit per binary weight)."""
    sizes = summary_of(*load_any_model(run_dir))
    return {"float_bytes": sizes.float_bytes, "packed_bytes": sizes.packed_bytes}


def run_demo(
    out: Path,
    epochs: int | None = None,
    seed: int = 0,
    seeds: int | None = None,
    budget: str = "full",
    log=print,
    jobs: int | None = None,
) -> list[dict]:
    """Train the five methods over `seeds` seeds, `jobs` runs at a time (default: one per
    core, each on one thread); write table.json and curves.png into OUT/demo-<budget>."""
    chosen = pick_budget(BUDGETS, budget, "demo")
    seeds = check_seeds(seeds, chosen)
    epochs = chosen.settings["epochs"] if epochs is None else epochs
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise UserError(f"{{epochs}} must be a whole number >= 1, got {epochs!r}", epochs="epochs")
    folder = experiment_folder(out, "demo", budget)
    started = time.perf_counter()
    todo = cells(epochs, seed, seeds)
    jobs = min(available_cores(), len(todo)) if jobs is None else jobs
    finished = run_cells(todo, folder, log=None, jobs=jobs)
    results, curves = [], {}
    for row in PAPER_METHODS:
        runs = [f for f in finished if f.cell.method == row.label]
        metrics = [f.metrics for f in runs]
        test_errors = [m[-1]["test_error"] for m in metrics]
        mean, std = mean_std(test_errors)
        results.append(
            {
                "method": row.label,
                "preset": row.method,
                "batch_size": runs[0].cell.config.batch_size,
                "test_error": mean,
                "test_error_std": std,
                "test_errors": test_errors,
                "train_error": statistics.fmean(m[-1]["train_error"] for m in metrics),
                "epochs": epochs,
                "seeds": seeds,
                "seconds": sum(r["seconds"] for m in metrics for r in m),
                **_model_bytes(runs[-1].run_dir),
            }
        )
        curves[row.label] = metrics
        log(
            f"  {row.label:18s} test error {format_cell(test_errors)}%  "
            f"({results[-1]['seconds']:.1f}s)",
            file=sys.stderr,
        )
    atomic_write_text(folder / "table.json", json.dumps(results, indent=2) + "\n")
    title = f"tiny_cnn on digits (8×8), mean of {seeds} seed{'s' * (seeds > 1)}"
    plot_error_curves({title: curves}, folder / "curves.png")
    log(format_results(results))
    log(
        f"total {time.perf_counter() - started:.0f}s; wrote {folder / 'table.json'} and "
        f"{folder / 'curves.png'}"
    )
    return results


def format_results(results: list[dict]) -> str:
    """The Table-1-style console table: test error as mean ± std over seeds."""
    lines = [
        f"{'method':18s} {'batch':>5s} {'test err % (mean ± std)':>24s} {'train err %':>11s} "
        f"{'model KiB (packed/float)':>25s}",
    ]
    for r in results:
        size = f"{r['packed_bytes'] / 1024:.1f} / {r['float_bytes'] / 1024:.1f}"
        lines.append(
            f"{r['method']:18s} {r['batch_size']:5d} {format_cell(r['test_errors']):>24s} "
            f"{r['train_error']:11.2f} {size:>25s}"
        )
    return "\n".join(lines)
