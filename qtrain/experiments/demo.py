"""`qtrain demo`: the paper's five methods on the embedded handwritten digits, offline.

Trains `tiny_cnn` on scikit-learn's 8×8 digits with FP-ADAM, BC-ADAM, big-batch SR-ADAM,
SR-ADAM and R-ADAM (learning rate 0.01, the paper's default), three seeds each, then prints a
Table-1-style table (mean ± std over seeds) and writes:

    OUT/results.json   one object per method: method, test_error (% mean over seeds),
                       test_error_std, test_errors, train_error (%), epochs, seconds,
                       packed_bytes, float_bytes
    OUT/curves.png     Figure 6 style: train error solid, test error dashed
    OUT/runs/<method>/seed<k>/  the full run folders (config, metrics, checkpoint)
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import time
from pathlib import Path

from qtrain.base.io import atomic_write_text
from qtrain.experiments.methods import PAPER_METHODS
from qtrain.export.summary import summarize
from qtrain.report.figures import plot_error_curves
from qtrain.report.tables import format_cell, mean_std
from qtrain.train import rundir
from qtrain.train.config import RunConfig
from qtrain.train.trainer import Trainer

DEMO_EPOCHS = 20
DEMO_SEEDS = 3  # 300 test images: one image is 0.33%, so single runs differ by noise
DEMO_BATCH = 32
BIG_BATCH = 256  # 8× the base batch, as 1024 vs 128 in the paper


def demo_config(method: str, batch_size: int, epochs: int, seed: int) -> RunConfig:
    return RunConfig(
        model="tiny_cnn",
        dataset="digits",
        method=method,
        epochs=epochs,
        batch_size=batch_size,
        lr=0.01,
        seed=seed,
        channels_last=False,
        device="cpu",
        eval_batch_size=500,
        # A tiny CNN gains nothing from a second thread, and on a busy machine two OpenMP
        # threads wait on each other: measured 0.2 s an epoch with one, 6.8 s with two.
        threads=1,
    )


def _model_bytes(trainer: Trainer) -> dict:
    """Float vs packed storage of the trained model (1 bit per binary weight)."""
    sizes = summarize(trainer.model, trainer.quantized_names, trainer.optimizer.grid)
    return {"float_bytes": sizes.float_bytes, "packed_bytes": sizes.packed_bytes}


def run_demo(
    out: Path, epochs: int | None = None, seed: int = 0, seeds: int = DEMO_SEEDS, log=print
) -> list[dict]:
    """Train the five methods over `seeds` seeds; write results.json and curves.png to `out`."""
    epochs = epochs or DEMO_EPOCHS
    if epochs <= 0 or seeds <= 0:
        raise ValueError(f"--epochs and --seeds must be > 0, got {epochs} and {seeds}")
    out.mkdir(parents=True, exist_ok=True)
    results, curves = [], {}
    started = time.perf_counter()
    for row in PAPER_METHODS:
        batch = BIG_BATCH if row.big_batch else DEMO_BATCH
        runs = []
        for k in range(seeds):
            run_dir = out / "runs" / row.slug / f"seed{seed + k}"
            shutil.rmtree(run_dir, ignore_errors=True)  # the demo always starts afresh
            config = demo_config(row.method, batch, epochs, seed + k)
            trainer = Trainer(config, run_dir, log=lambda *a, **k: None)
            runs.append(trainer.run())
            label = {"row": "tiny_cnn digits", "method": row.label}
            rundir.write_json(run_dir / "label.json", label)
        test_errors = [metrics[-1]["test_error"] for metrics in runs]
        mean, std = mean_std(test_errors)
        results.append(
            {
                "method": row.label,
                "preset": row.method,
                "batch_size": batch,
                "test_error": mean,
                "test_error_std": std,
                "test_errors": test_errors,
                "train_error": statistics.fmean(m[-1]["train_error"] for m in runs),
                "epochs": epochs,
                "seeds": seeds,
                "seconds": sum(r["seconds"] for metrics in runs for r in metrics),
                **_model_bytes(trainer),
            }
        )
        curves[row.label] = runs
        log(
            f"  {row.label:18s} test error {format_cell(test_errors)}%  "
            f"({results[-1]['seconds']:.1f}s)",
            file=sys.stderr,
        )
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    title = f"tiny_cnn on digits (8×8), mean of {seeds} seed{'s' * (seeds > 1)}"
    plot_error_curves({title: curves}, out / "curves.png")
    log(format_results(results))
    log(
        f"total {time.perf_counter() - started:.0f}s; wrote {out / 'results.json'} and "
        f"{out / 'curves.png'}"
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
