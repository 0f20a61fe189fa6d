"""`qtrain reproduce fig7`: BC-ADAM on VGG-BC with weight decay 1e-5 vs 0 (docs/paper.md §4).

The paper's claim: with weight decay the latent weights w_r shrink towards 0, so the mean gap
(1/d)‖w_b − w_r‖₁ between the binary and the real-valued weights approaches 1 and accuracy
suffers. Adam divides by √v̂, so even a decay of 1e-5 moves weights whose loss gradient is
small by up to the learning rate per step. Budgets as in `table1`; the runs and fig7.png live
in OUT/fig7-<budget>.
"""

from __future__ import annotations

from pathlib import Path

from qtrain.experiments import table1
from qtrain.experiments.methods import MethodRow
from qtrain.experiments.runner import Cell, experiment_folder, pick_budget, run_cells
from qtrain.report.figures import plot_fig7

ROW = "vgg_bc-cifar10"
DECAYS = {"weight decay 1e-5": 1e-5, "no weight decay": 0.0}


def cells(budget: str, data_dir=None, download: bool = True) -> list[Cell]:
    bc = MethodRow("BC-ADAM", "bc-adam")
    config = table1.row_config(ROW, bc, budget, 0, data_dir, download)
    return [
        Cell(
            "wd1e-5" if decay else "wd0",
            config.replace(weight_decay=decay),
            "VGG-BC BC-ADAM",
            label,
        )
        for label, decay in DECAYS.items()
    ]


def run(out: Path, budget: str = "short", data_dir=None, download: bool = True, log=print):
    pick_budget(table1.BUDGETS, budget, "fig7")
    folder = experiment_folder(out, "fig7", budget)
    finished = run_cells(cells(budget, data_dir, download), folder, log)
    curves = {f.cell.method: [f.metrics] for f in finished}
    plot_fig7(curves, folder / "fig7.png")
    for label, (metrics,) in curves.items():
        last = metrics[-1]
        log(f"{label:18s} test error {last['test_error']:.2f}%  final gap {last['wb_wr_gap']:.3f}")
    log(f"wrote {folder / 'fig7.png'}")
    return curves
