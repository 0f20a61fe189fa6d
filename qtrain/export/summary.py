"""Model size summary: per-layer storage as float tensors vs as a packed file (larq style).

Every entry of `model.state_dict()` is stored, so every entry is counted: parameters and
buffers (BatchNorm running statistics, num_batches_tracked). A layer is the module owning
the entries. For an entry of n values:

    float bytes   n · element size of its dtype (4 for float32, 8 for int64)
    packed bytes  ⌈n·b/8⌉ for a quantized weight with b = grid.code_bits bits per code,
                  otherwise the float bytes (those tensors are stored as they are)

`bits` of a layer is the storage width of its `weight` (b when quantized, else the dtype's
bits). The totals are the tensor bytes of a packed file; the file adds a JSON header of a
few kilobytes. Compression ratio = float bytes / packed bytes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from qtrain.export.packing import packed_nbytes
from qtrain.quant import Grid

COLUMNS = ("layer", "type", "params", "quantized", "bits", "float bytes", "packed bytes")


@dataclass(frozen=True)
class LayerRow:
    """Storage of one layer: `params` values, `quantized` of them packed with `bits` bits."""

    layer: str
    kind: str
    params: int
    quantized: int
    bits: int
    float_bytes: int
    packed_bytes: int


@dataclass(frozen=True)
class Summary:
    """Per-layer rows plus totals of a model's storage as float tensors and packed."""

    rows: tuple[LayerRow, ...]
    grid: Grid
    quantized_float_bytes: int  # float bytes of the quantized weights alone
    quantized_packed_bytes: int

    @property
    def params(self) -> int:
        return sum(r.params for r in self.rows)

    @property
    def quantized(self) -> int:
        return sum(r.quantized for r in self.rows)

    @property
    def float_bytes(self) -> int:
        return sum(r.float_bytes for r in self.rows)

    @property
    def packed_bytes(self) -> int:
        return sum(r.packed_bytes for r in self.rows)

    @property
    def ratio(self) -> float:
        """Compression of the whole model: float bytes / packed bytes."""
        return self.float_bytes / self.packed_bytes if self.packed_bytes else 1.0

    @property
    def quantized_ratio(self) -> float:
        """Compression of the quantized weights alone (32 for binary float32 weights)."""
        if not self.quantized_packed_bytes:
            return 1.0
        return self.quantized_float_bytes / self.quantized_packed_bytes

    def to_dict(self) -> dict:
        """Plain-JSON form for reports: grid, rows and totals."""
        return {
            "grid": self.grid.to_dict(),
            "rows": [asdict(r) for r in self.rows],
            "totals": {
                "params": self.params,
                "quantized": self.quantized,
                "float_bytes": self.float_bytes,
                "packed_bytes": self.packed_bytes,
                "ratio": self.ratio,
                "quantized_float_bytes": self.quantized_float_bytes,
                "quantized_packed_bytes": self.quantized_packed_bytes,
                "quantized_ratio": self.quantized_ratio,
            },
        }

    def format_table(self) -> str:
        """An aligned text table, one line per layer, then the totals."""
        cells = [COLUMNS] + [
            (
                r.layer,
                r.kind,
                f"{r.params:,}",
                f"{r.quantized:,}",
                str(r.bits),
                f"{r.float_bytes:,}",
                f"{r.packed_bytes:,}",
            )
            for r in self.rows
        ]
        total = ("total", "", f"{self.params:,}", f"{self.quantized:,}", "")
        cells.append(total + (f"{self.float_bytes:,}", f"{self.packed_bytes:,}"))
        widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
        rule = "  ".join("-" * w for w in widths)

        def line(row: tuple[str, ...]) -> str:
            text = [
                c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))
            ]
            return "  ".join(text).rstrip()

        body = [line(cells[0]), rule, *map(line, cells[1:-1]), rule, line(cells[-1])]
        body.append(
            f"float {human_bytes(self.float_bytes)} -> packed {human_bytes(self.packed_bytes)} "
            f"({self.ratio:.2f}x smaller); quantized weights "
            f"{human_bytes(self.quantized_float_bytes)} -> "
            f"{human_bytes(self.quantized_packed_bytes)} ({self.quantized_ratio:.2f}x) "
            f"on grid {self.grid.describe()}"
        )
        return "\n".join(body)


def summarize(model: nn.Module, quantized_names: list[str], grid: Grid) -> Summary:
    """Storage summary of `model` when `quantized_names` are packed as codes of `grid`."""
    state = model.state_dict()
    unknown = sorted(set(quantized_names) - set(state))
    if unknown:
        raise ValueError(
            f"quantized parameter {unknown[0]!r} is not in the model; pass names from "
            "model.state_dict(), as in a checkpoint's 'quantized' list"
        )
    quantized = set(quantized_names)
    groups: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for name, tensor in state.items():
        layer, _, entry = name.rpartition(".")
        groups.setdefault(layer, []).append((entry, tensor))
    rows, q_float, q_packed = [], 0, 0
    for layer, entries in groups.items():
        params = n_quantized = float_bytes = packed_bytes = 0
        bits = _dtype_bits(entries[0][1])
        for entry, tensor in entries:
            full_name = f"{layer}.{entry}" if layer else entry
            size = tensor.numel() * tensor.element_size()
            params += tensor.numel()
            float_bytes += size
            if full_name in quantized:
                packed = packed_nbytes(tensor.numel(), grid.code_bits)
                n_quantized += tensor.numel()
                q_float, q_packed = q_float + size, q_packed + packed
                packed_bytes += packed
            else:
                packed_bytes += size
            if entry == "weight":
                bits = grid.code_bits if full_name in quantized else _dtype_bits(tensor)
        kind = type(model.get_submodule(layer)).__name__
        rows.append(
            LayerRow(layer or "(model)", kind, params, n_quantized, bits, float_bytes, packed_bytes)
        )
    return Summary(tuple(rows), grid, q_float, q_packed)


def _dtype_bits(tensor: torch.Tensor) -> int:
    return tensor.element_size() * 8


def human_bytes(count: int) -> str:
    """Byte count in decimal units: 999 B, 1.50 kB, 2.35 MB, 1.20 GB."""
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if count >= scale:
            return f"{count / scale:.2f} {unit}"
    return f"{count} B"
