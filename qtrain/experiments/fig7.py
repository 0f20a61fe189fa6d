"""`qtrain reproduce fig7`: BC-ADAM on VGG-BC with weight decay 1e-5 vs 0 (docs/paper.md §4).

The paper's claim: with weight decay the latent weights w_r shrink towards 0, so the mean gap
(1/d)‖w_b − w_r‖₁ between the binary and the real-valued weights approaches 1 and accuracy
suffers. Adam divides by √v̂, so even a decay of 1e-5 moves weights whose loss gradient is
small by up to the learning rate per step. Budgets as in `table1`.
"""

from __future__ import annotations

from pathlib import Path

from qtrain.experiments.methods import MethodRow
from qtrain.experiments.table1 import row_config, run_one
from qtrain.report.figures import plot_fig7
from qtrain.train import rundir

DECAYS = {"weight decay 1e-5": 1e-5, "no weight decay": 0.0}


def run(out: Path, budget: str = "short", data_dir=None, download: bool = True, log=print):
    row = "vgg_bc-cifar10"
    bc = MethodRow("BC-ADAM", "bc-adam")
    curves = {}
    for label, decay in DECAYS.items():
        config = row_config(row, bc, budget, 0, data_dir, download).replace(weight_decay=decay)
        run_dir = out / "fig7" / ("wd1e-5" if decay else "wd0")
        run_one(config, run_dir, {"row": "VGG-BC BC-ADAM", "method": label}, log)
        curves[label] = [rundir.read_metrics(run_dir)]
    plot_fig7(curves, out / "fig7.png")
    for label, (metrics,) in curves.items():
        last = metrics[-1]
        log(f"{label:18s} test error {last['test_error']:.2f}%  final gap {last['wb_wr_gap']:.3f}")
    log(f"wrote {out / 'fig7.png'}")
    return curves
