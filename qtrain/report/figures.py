"""Figures 6 and 7 of the paper, drawn from per-epoch metric records.

`runs` arguments map a method label to its records (dicts with `epoch`, `train_error`,
`test_error`, optionally `wb_wr_gap`); several seeds of one label are averaged per epoch.
"""

from __future__ import annotations

import math
from pathlib import Path

from qtrain.base.io import atomic_write_bytes
from qtrain.report.style import colour, pyplot


def mean_curve(seed_runs: list[list[dict]], key: str) -> tuple[list[int], list[float]]:
    """Per-epoch mean of `key` over seeds (epochs that every seed reached)."""
    length = min(len(r) for r in seed_runs)
    epochs = [seed_runs[0][i]["epoch"] for i in range(length)]
    values = []
    for i in range(length):
        points = [r[i].get(key) for r in seed_runs]
        points = [p for p in points if p is not None]
        values.append(sum(points) / len(points) if points else math.nan)
    return epochs, values


def save_figure(fig, path: Path) -> None:
    """Write `fig` as a PNG to `path` atomically."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())


def draw_error_panel(ax, runs: dict[str, list[list[dict]]], title: str) -> None:
    """Train error solid, test error dashed, one colour per method (Figure 6)."""
    for i, (label, seed_runs) in enumerate(runs.items()):
        c = colour(label, i)
        epochs, train = mean_curve(seed_runs, "train_error")
        _, test = mean_curve(seed_runs, "test_error")
        ax.plot(epochs, train, "-", color=c, lw=1.6, label=f"{label} train")
        ax.plot(epochs, test, "--", color=c, lw=1.6, label=f"{label} test")
    ax.set_title(title)
    ax.set_xlabel("epoch")
    ax.set_ylabel("top-1 error (%)")
    ax.set_ylim(bottom=0)


def plot_error_curves(panels: dict[str, dict[str, list[list[dict]]]], path: str | Path) -> None:
    """One panel per Table 1 row; writes a PNG atomically."""
    plt = pyplot()
    n = len(panels)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.0 * rows), squeeze=False)
    for ax, (title, runs) in zip(axes.flat, panels.items()):
        draw_error_panel(ax, runs, title)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.suptitle("Training (solid) and test (dashed) error per epoch")
    fig.tight_layout()
    if n == 1:  # one panel: the legend reads best beside it
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    else:
        fig.legend(
            handles,
            labels,
            loc="upper center",
            ncol=min(len(labels), 5),
            frameon=False,
            bbox_to_anchor=(0.5, 0.0),
        )
    save_figure(fig, Path(path))
    plt.close(fig)


def plot_fig7(runs: dict[str, list[list[dict]]], path: str | Path) -> None:
    """Figure 7: (a) error curves, (b) the mean gap (1/d)‖w_b − w_r‖₁ per epoch."""
    plt = pyplot()
    fig, (ax_err, ax_gap) = plt.subplots(1, 2, figsize=(11, 4))
    draw_error_panel(ax_err, runs, "(a) BC-ADAM error")
    ax_err.legend(frameon=False, fontsize=8)
    for i, (label, seed_runs) in enumerate(runs.items()):
        epochs, gap = mean_curve(seed_runs, "wb_wr_gap")
        ax_gap.plot(epochs, gap, "-", color=colour(label, i), lw=1.8, label=label)
    ax_gap.set_title(r"(b) mean gap $\frac{1}{d}\|w_b - w_r\|_1$")
    ax_gap.set_xlabel("epoch")
    ax_gap.set_ylabel("mean |w_b − w_r|")
    ax_gap.set_ylim(0, 1.05)
    ax_gap.legend(frameon=False)
    fig.tight_layout()
    save_figure(fig, Path(path))
    plt.close(fig)
