"""Model size summary: per-layer storage as float tensors vs as a packed file (larq style).

A layer is the module owning state entries. Per layer:

    params        values of its parameters (`model.parameters()`, tied ones counted once), so
                  the total is sum(p.numel() for p in model.parameters())
    buffers       values of its stored buffers (BatchNorm running mean and variance and
                  num_batches_tracked): not parameters, but a deployed file needs them
    quantized     values of its quantized parameters
    float bytes   Σ n·(element size) over its `state_dict()` entries, parameters and buffers
                  (a tensor listed under two names, a tied weight, is counted once)
                  (4 per float32 value, 8 per int64 value): the float file
    packed bytes  the packed file's tensors: ⌈n·b/8⌉ per quantized weight of n values with
                  b = grid.code_bits bits per code, plus k·(element size) for a weight stored
                  with k scales (float32, float64 for float64 weights; `qtrain.export.packed`
                  stores them as `<name>:scale`): k = 1 for one scale of the whole tensor,
                  k = C for one per output channel; plus every other entry at its float bytes

A quantized weight is stored with scales when it is not exactly on the fixed grid (trained with
scale he, absmean or absmean-tensor): `summarize` reads that, and how many, from trained
weights as export does (`qtrain.export.scales.scaled_codes`), or is told the `scale` a model
not trained yet will train with: then k is the number of values of that scale
(`qtrain.methods.scales`: one for he and absmean-tensor and for absmean on a 1-D tensor, C for
absmean on a tensor with ≥ 2 dims). `bits` of a layer is the storage width of its
`weight` (b when quantized, else the dtype's bits). Binary activations
(`qtrain.models.activations.BinaryActivation`) are computed by the sign, not stored: they add
no bytes and are listed by name. The totals are the tensor bytes of a packed file; its JSON
header adds a few kilobytes. Ratio = float bytes / packed bytes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from qtrain.base.errors import UserError
from qtrain.export.packing import packed_nbytes
from qtrain.export.scales import scaled_codes
from qtrain.methods.scales import fixed_scale, measured_scale
from qtrain.models.activations import BinaryActivation
from qtrain.quant import Grid

COLUMNS = (
    "layer", "type", "params", "buffers", "quantized", "bits", "float bytes", "packed bytes",
)  # fmt: skip
STORED = (
    "A deployed (packed) file stores every parameter and buffer (BatchNorm running statistics "
    "too): quantized weights as codes, plus their scales when scaled, the rest as floats"
)


@dataclass(frozen=True)
class LayerRow:
    """Storage of one layer: `params` + `buffers` values, `quantized` of them packed."""

    layer: str
    kind: str
    params: int
    buffers: int
    quantized: int
    bits: int
    float_bytes: int
    packed_bytes: int
    scale_bytes: int  # of the scales of its quantized weights, included in packed_bytes


@dataclass(frozen=True)
class Summary:
    """Per-layer rows plus totals of a model's storage as float tensors and packed."""

    rows: tuple[LayerRow, ...]
    grid: Grid
    quantized_float_bytes: int  # float bytes of the quantized weights alone
    quantized_packed_bytes: int  # their codes plus their scales
    binary_activations: tuple[str, ...] = ()

    @property
    def params(self) -> int:
        return sum(r.params for r in self.rows)

    @property
    def buffers(self) -> int:
        return sum(r.buffers for r in self.rows)

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
    def scale_bytes(self) -> int:
        return sum(r.scale_bytes for r in self.rows)

    @property
    def ratio(self) -> float:
        """Compression of the whole model: float bytes / packed bytes."""
        return self.float_bytes / self.packed_bytes if self.packed_bytes else 1.0

    @property
    def quantized_ratio(self) -> float:
        """Compression of the quantized weights alone (32 for unscaled binary float32)."""
        if not self.quantized_packed_bytes:
            return 1.0
        return self.quantized_float_bytes / self.quantized_packed_bytes

    def to_dict(self) -> dict:
        """Plain-JSON form for reports: grid, rows, totals and what a deployed file stores."""
        return {
            "grid": self.grid.to_dict(),
            "rows": [asdict(r) for r in self.rows],
            "totals": {
                "params": self.params,
                "buffers": self.buffers,
                "quantized": self.quantized,
                "float_bytes": self.float_bytes,
                "packed_bytes": self.packed_bytes,
                "scale_bytes": self.scale_bytes,
                "ratio": self.ratio,
                "quantized_float_bytes": self.quantized_float_bytes,
                "quantized_packed_bytes": self.quantized_packed_bytes,
                "quantized_ratio": self.quantized_ratio,
            },
            "binary_activations": list(self.binary_activations),
            "stored": STORED,
        }

    def format_table(self) -> str:
        """An aligned text table, one line per layer, the totals, then what is stored."""
        cells = [COLUMNS] + [
            (
                r.layer,
                r.kind,
                f"{r.params:,}",
                f"{r.buffers:,}",
                f"{r.quantized:,}",
                str(r.bits),
                f"{r.float_bytes:,}",
                f"{r.packed_bytes:,}",
            )
            for r in self.rows
        ]
        total = ("total", "", f"{self.params:,}", f"{self.buffers:,}", f"{self.quantized:,}", "")
        cells.append(total + (f"{self.float_bytes:,}", f"{self.packed_bytes:,}"))
        widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
        rule = "  ".join("-" * w for w in widths)

        def line(row: tuple[str, ...]) -> str:
            text = [
                c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))
            ]
            return "  ".join(text).rstrip()

        body = [line(cells[0]), rule, *map(line, cells[1:-1]), rule, line(cells[-1])]
        body.append(STORED + ".")
        if self.scale_bytes:
            body.append(f"packed bytes include {self.scale_bytes:,} bytes of scales.")
        if self.binary_activations:
            count = len(self.binary_activations)
            body.append(
                f"{count} binary activation{'s' if count > 1 else ''} (sign, 1 bit per value) "
                "computed at run time: no stored bytes."
            )
        body.append(
            f"float {human_bytes(self.float_bytes)} -> packed {human_bytes(self.packed_bytes)} "
            f"({self.ratio:.2f}x smaller); quantized weights "
            f"{human_bytes(self.quantized_float_bytes)} -> "
            f"{human_bytes(self.quantized_packed_bytes)} ({self.quantized_ratio:.2f}x) "
            f"on grid {self.grid.describe()}"
        )
        return "\n".join(body)


def summarize(
    model: nn.Module, quantized_names: list[str], grid: Grid, *, scale: str | None = "none"
) -> Summary:
    """Storage summary of `model` when `quantized_names` are packed as codes of `grid`.

    `scale`: the scale the quantized weights are trained with ("none": codes only; "he",
    "absmean", "absmean-tensor": codes and that scale's values); None reads from each trained
    weight as export does whether it carries scales, and how many.
    """
    state = model.state_dict()
    unknown = sorted(set(quantized_names) - set(state))
    if unknown:
        raise UserError(
            f"quantized parameter {unknown[0]!r} is not in the model; pass names from "
            "model.state_dict(), as in a checkpoint's 'quantized' list"
        )
    quantized = set(quantized_names)
    params = {name: p.numel() for name, p in model.named_parameters()}
    buffers = {name: b.numel() for name, b in model.named_buffers()}
    groups: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for name, tensor in state.items():
        layer, _, entry = name.rpartition(".")
        groups.setdefault(layer, []).append((entry, tensor))
    rows, q_float, q_packed = [], 0, 0
    stored: set[tuple] = set()  # a tied weight (a GPT's head) is one tensor under two names
    for layer, entries in groups.items():
        n_params = n_buffers = n_quantized = float_bytes = packed_bytes = scale_bytes = 0
        bits = _dtype_bits(entries[0][1])
        for entry, tensor in entries:
            full_name = f"{layer}.{entry}" if layer else entry
            where = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape)
            if where in stored:
                continue
            stored.add(where)
            size = tensor.numel() * tensor.element_size()
            n_params += params.get(full_name, 0)
            n_buffers += buffers.get(full_name, 0)
            float_bytes += size
            if full_name in quantized:
                packed = packed_nbytes(tensor.numel(), grid.code_bits)
                scales = _scale_nbytes(tensor, grid, scale)
                packed, scale_bytes = packed + scales, scale_bytes + scales
                n_quantized += tensor.numel()
                q_float, q_packed = q_float + size, q_packed + packed
                packed_bytes += packed
            else:
                packed_bytes += size
            if entry == "weight":
                bits = grid.code_bits if full_name in quantized else _dtype_bits(tensor)
        kind = type(model.get_submodule(layer)).__name__
        rows.append(
            LayerRow(
                layer or "(model)",
                kind,
                n_params,
                n_buffers,
                n_quantized,
                bits,
                float_bytes,
                packed_bytes,
                scale_bytes,
            )  # fmt: skip
        )
    activations = tuple(
        name for name, module in model.named_modules() if isinstance(module, BinaryActivation)
    )
    return Summary(tuple(rows), grid, q_float, q_packed, activations)


def _scale_nbytes(weight: torch.Tensor, grid: Grid, scale: str | None) -> int:
    """Bytes of the scales stored with `weight` (float32, float64 for float64 weights): as
    many as the scale of kind `scale` has values, or, for `scale=None`, as export stores."""
    if scale is None:
        if grid.contains(weight):
            return 0
        found = scaled_codes(weight, grid)
        # a weight export refuses counts one scale per channel, as the nearest storable
        count = found.scale.numel() if found else (weight.shape[0] if weight.dim() else 1)
    elif scale == "none":
        return 0
    else:
        value = fixed_scale(scale, weight)
        count = (value if value is not None else measured_scale(scale, weight.detach())).numel()
    return count * (8 if weight.dtype == torch.float64 else 4)


def _dtype_bits(tensor: torch.Tensor) -> int:
    return tensor.element_size() * 8


def human_bytes(count: int) -> str:
    """Byte count in decimal units: 999 B, 1.50 kB, 2.35 MB, 1.20 GB."""
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if count >= scale:
            return f"{count / scale:.2f} {unit}"
    return f"{count} B"
