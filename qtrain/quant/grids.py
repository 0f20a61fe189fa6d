"""Weight grids (codebooks) that quantized weights live on.

Every grid is symmetric about zero and uniform. Its levels are integer multiples m·Δ:

| grid        | levels m·Δ with m in                   | step of m | levels n | code bits |
|-------------|----------------------------------------|-----------|----------|-----------|
| binary(Δ)   | {−1, +1}                               | 2         | 2        | 1         |
| ternary(Δ)  | {−1, 0, +1}                            | 1         | 3        | 2         |
| kbit(k, Δ)  | {−(2^k−1), …, −3, −1, 1, 3, …, 2^k−1}  | 2         | 2^k      | k         |
| lattice(Δ)  | ℤ (unbounded, never clipped)           | 1         | ∞        | –         |

so the distance between neighbouring levels (the *spacing*) is step·Δ, and `kbit(1, Δ)` is the
binary grid. Computing a level as m·Δ with one rounding keeps every grid exactly symmetric
in floating point. The code of a level is i = (m + M)/step ∈ {0 … n−1}, M the largest m;
packed export stores codes with `code_bits` bits each.

Default Δ (`delta=None` in `kbit` and `parse_grid`): the Δ that puts a bounded grid's end
levels at ±1, i.e. Δ = 1/M — 1 for binary and ternary (the paper's ±1 weights) and
1/(2^k − 1) for k bits, so `kbit(8)` spans [−1, 1] in steps of 2/255 instead of reaching ±255.
The lattice has no range and defaults to Δ = 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qtrain.base.errors import UserError

GRID_KINDS = ("binary", "ternary", "kbit", "lattice")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic precision for rounding: float64 stays, everything else runs in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class Grid:
    """A symmetric uniform grid; build one with `binary`, `ternary`, `kbit` or `lattice`."""

    kind: str
    delta: float = 1.0
    bits: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in GRID_KINDS:
            raise UserError(
                f"unknown grid kind {self.kind!r}; choose one of {', '.join(GRID_KINDS)}"
            )
        if (
            isinstance(self.delta, bool)
            or not isinstance(self.delta, (int, float))
            or not math.isfinite(self.delta)
            or self.delta <= 0
        ):
            raise UserError(f"grid delta must be a finite number > 0, got {self.delta!r}")
        if self.kind == "kbit":
            if not isinstance(self.bits, int) or isinstance(self.bits, bool) or self.bits < 1:
                raise UserError(f"a k-bit grid needs bits >= 1 (an integer), got {self.bits!r}")
            if self.bits > 16:
                raise UserError(f"a k-bit grid supports at most 16 bits, got {self.bits}")
        elif self.bits is not None:
            raise UserError(f"bits only applies to the 'kbit' grid, not to {self.kind!r}")

    # -- geometry in units of Δ -------------------------------------------------------------
    @property
    def step(self) -> int:
        """Distance between neighbouring multiples m (1 or 2)."""
        return 1 if self.kind in ("ternary", "lattice") else 2

    @property
    def max_multiple(self) -> int | None:
        """Largest multiple M (levels lie in [−MΔ, MΔ]); None for the lattice."""
        if self.kind == "lattice":
            return None
        if self.kind == "kbit":
            return 2**self.bits - 1
        return 1

    # -- geometry in weight units ------------------------------------------------------------
    @property
    def bounded(self) -> bool:
        return self.kind != "lattice"

    @property
    def num_levels(self) -> int | None:
        """Number of levels n, or None for the unbounded lattice."""
        return None if not self.bounded else 2 * self.max_multiple // self.step + 1

    @property
    def spacing(self) -> float:
        """Distance between neighbouring levels: step·Δ."""
        return self.step * self.delta

    @property
    def lo(self) -> float:
        """Smallest level −MΔ (−∞ for the lattice)."""
        return -self.max_multiple * self.delta if self.bounded else -math.inf

    @property
    def hi(self) -> float:
        """Largest level MΔ (+∞ for the lattice)."""
        return self.max_multiple * self.delta if self.bounded else math.inf

    @property
    def code_bits(self) -> int:
        """Bits per packed code: ⌈log2 n⌉ (1 binary, 2 ternary, k for k-bit)."""
        if not self.bounded:
            raise UserError("the unbounded lattice Δ·ℤ has no fixed code width; use a bounded grid")
        return max(1, math.ceil(math.log2(self.num_levels)))

    def levels(self, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        """All levels in increasing order (bounded grids only)."""
        if not self.bounded:
            raise UserError("the unbounded lattice Δ·ℤ has infinitely many levels")
        m = torch.arange(-self.max_multiple, self.max_multiple + 1, self.step, device=device)
        return self.from_multiples(m, dtype)

    # -- conversions -------------------------------------------------------------------------
    def from_multiples(self, m: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Level values m·Δ, rounded once from the compute precision into `dtype`."""
        return (m.to(compute_dtype(dtype)) * self.delta).to(dtype)

    def to_multiples(self, w: torch.Tensor) -> torch.Tensor:
        """Nearest multiple m (int64) of weights that are on the grid."""
        return torch.round(w.to(compute_dtype(w.dtype)) / self.delta).to(torch.int64)

    def to_codes(self, w: torch.Tensor) -> torch.Tensor:
        """Codes i = (m + M)/step ∈ {0 … n−1} (int64) of weights that are on the grid."""
        if not self.bounded:
            raise UserError("the unbounded lattice Δ·ℤ has no codes; use a bounded grid")
        return (self.to_multiples(w) + self.max_multiple) // self.step

    def from_codes(self, codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Level values for codes i: (i·step − M)·Δ."""
        if not self.bounded:
            raise UserError("the unbounded lattice Δ·ℤ has no codes; use a bounded grid")
        return self.from_multiples(codes.to(torch.int64) * self.step - self.max_multiple, dtype)

    def contains(self, w: torch.Tensor) -> bool:
        """True when every element of `w` is exactly a level (as represented in w's dtype)."""
        if not bool(torch.isfinite(w).all()):
            return False
        m = self.to_multiples(w)
        valid = (m - (0 if self.step == 1 else 1)) % self.step == 0
        if self.bounded:
            valid &= m.abs() <= self.max_multiple
        return bool(valid.all()) and torch.equal(self.from_multiples(m, w.dtype), w)

    def describe(self) -> str:
        if self.kind == "kbit":
            return f"kbit(bits={self.bits}, delta={self.delta:g})"
        return f"{self.kind}(delta={self.delta:g})"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "delta": float(self.delta), "bits": self.bits}

    @classmethod
    def from_dict(cls, d: dict) -> Grid:
        try:
            return cls(kind=d["kind"], delta=float(d["delta"]), bits=d.get("bits"))
        except (KeyError, TypeError) as e:
            raise UserError(f"invalid grid description {d!r}: {e}") from None


def default_delta(kind: str, bits: int | None = None) -> float:
    """Δ = 1/M, the Δ whose end levels are ±1 (M = 2^k − 1 for k bits); 1 for the lattice."""
    return 1.0 / (2**bits - 1) if kind == "kbit" else 1.0


def binary(delta: float = 1.0) -> Grid:
    """The binary grid {−Δ, +Δ} (Δ = 1 by default, the paper's "large binary weights")."""
    return Grid("binary", delta)


def ternary(delta: float = 1.0) -> Grid:
    """The ternary grid {−Δ, 0, +Δ}."""
    return Grid("ternary", delta)


def kbit(bits: int, delta: float | None = None) -> Grid:
    """The k-bit symmetric uniform grid Δ·{−(2^k−1), …, −1, 1, …, 2^k−1} (2^k levels).

    `delta=None` takes Δ = 1/(2^k − 1), so the levels span exactly [−1, 1].
    """
    if delta is None and isinstance(bits, int) and not isinstance(bits, bool) and bits >= 1:
        delta = default_delta("kbit", bits)
    return Grid("kbit", 1.0 if delta is None else delta, bits)


def lattice(delta: float = 1.0) -> Grid:
    """The unbounded lattice Δ·ℤ used by the convex theory (no clipping)."""
    return Grid("lattice", delta)


def parse_grid(spec: str | Grid, delta: float | None = None) -> Grid:
    """Grid from a short name: 'binary', 'ternary', 'lattice', or '<k>bit' (e.g. '2bit').

    `delta=None` takes the grid's default Δ (module docstring: end levels at ±1). A `Grid`
    passes through unchanged; an explicit `delta` that differs from its Δ is refused.
    """
    if isinstance(spec, Grid):
        if delta is not None and float(delta) != spec.delta:
            raise UserError(
                f"delta={delta!r} conflicts with the grid {spec.describe()}; give the Δ in one "
                "place only"
            )
        return spec
    name = str(spec).strip().lower()
    if name in ("binary", "ternary", "lattice"):
        return Grid(name, default_delta(name) if delta is None else delta)
    if name.endswith("bit") and name[:-3].isdigit():
        return kbit(int(name[:-3]), delta)
    raise UserError(
        f"unknown grid {spec!r}; use 'binary', 'ternary', 'lattice' or '<k>bit' such as '2bit'"
    )
