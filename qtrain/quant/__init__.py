"""Grids and rounding: pure functions, no state (docs/paper.md §1)."""

from qtrain.quant.grids import (
    GRID_KINDS,
    Grid,
    binary,
    compute_dtype,
    default_delta,
    kbit,
    lattice,
    parse_grid,
    ternary,
)
from qtrain.quant.rounding import quantize, round_nearest, round_stochastic

__all__ = [
    "GRID_KINDS",
    "Grid",
    "binary",
    "compute_dtype",
    "default_delta",
    "kbit",
    "lattice",
    "parse_grid",
    "quantize",
    "round_nearest",
    "round_stochastic",
    "ternary",
]
