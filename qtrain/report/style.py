"""Figure styling shared by every plot: one colour per method, the paper's line styles."""

from __future__ import annotations

from qtrain.base.optional import require

METHOD_COLOURS = {
    "FP-ADAM": "#1f77b4",
    "BC-ADAM": "#2ca02c",
    "big-batch SR-ADAM": "#9467bd",
    "SR-ADAM": "#ff7f0e",
    "R-ADAM": "#d62728",
}
# Tables and legends list methods in the paper's order: the order of this mapping.
METHOD_ORDER = tuple(METHOD_COLOURS)
# the methods beyond the paper (`qtrain reproduce methods`), each with a colour of its own
LATER_METHOD_COLOURS = {
    "BC-ADAM + he": "#17becf",
    "BC-ADAM + absmean": "#bcbd22",
    "Bop": "#8c564b",
    "Bop2": "#e377c2",
    # AdamW variants (`qtrain reproduce lm`) share their method's colour
    "FP-ADAMW": "#1f77b4",
    "BC-ADAMW": "#2ca02c",
    "SR-ADAMW": "#ff7f0e",
    "R-ADAMW": "#d62728",
}
FALLBACK_COLOURS = ["#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


def colour(label: str, index: int) -> str:
    known = METHOD_COLOURS.get(label) or LATER_METHOD_COLOURS.get(label)
    return known or FALLBACK_COLOURS[index % len(FALLBACK_COLOURS)]


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or a clear error when absent."""
    require("matplotlib", "demo", "drawing figures").use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "figure.dpi": 110,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "font.size": 10,
        }
    )
    return plt
