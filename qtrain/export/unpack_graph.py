"""Quantized weights stored packed inside an exported graph, and unpacked by the graph itself.

`pack_into_model(model, weights)` replaces each named quantized weight of `model` by a
`PackedWeight`: the weight's n codes packed b bits each into ⌈n·b/8⌉ uint8 bytes (the layout
of `qtrain.export.packing`), its grid's level table and its scale. Before every forward the
module rebuilds the weight with plain tensor arithmetic, which an ONNX exporter records as
standard operators (Cast, Div, Mod, Reshape, Slice, Mul, ReduceSum, Gather), so a runtime
runs the file as it is while the file stores 1 bit per binary weight:

    bits[s]   = ⌊byte[s // 8] / 2^(s mod 8)⌋ mod 2              stream bit s (little-endian)
    code[i]   = Σ_j bits[i·b + j]·2^j                            j < b
    w         = (levels[code] ⊙ scale).reshape(shape)           levels = grid multiples m

`scale` is 1 for a fixed grid (levels = its levels m·Δ), or for a scaled one the scale export
reads back from the weight (`qtrain.export.scales`): one Δ for the whole tensor (0-dim) or one
Δ_c per output channel ([C_out, 1, …]), with levels = m, or, for a weight that only restores
as the grid's levels times a scale, levels = fl(m·Δ_g) and scale s. Either is one float32
product that reproduces the trained weight, so the rebuilt weight is bit-identical to it.
"""

from __future__ import annotations

import torch
from torch import nn

from qtrain.base.errors import UserError
from qtrain.export.packing import pack_codes
from qtrain.export.scales import MULTIPLES, scaled_codes
from qtrain.quant import Grid


class PackedWeight(nn.Module):
    """A weight tensor kept as packed codes; `forward()` returns it unpacked (see module doc)."""

    def __init__(
        self, codes: torch.Tensor, bits: int, levels: torch.Tensor, scale: torch.Tensor
    ) -> None:
        super().__init__()
        self.shape = tuple(codes.shape)
        self.count = codes.numel()
        self.bits = int(bits)
        self.register_buffer("packed", pack_codes(codes, bits))  # uint8 [⌈n·b/8⌉]
        self.register_buffer("levels", levels.detach().to(torch.float32).reshape(-1))
        self.register_buffer("scale", scale.detach().to(torch.float32))
        self.register_buffer("byte_powers", 2 ** torch.arange(8, dtype=torch.int32))
        self.register_buffer("code_powers", 2 ** torch.arange(self.bits, dtype=torch.int32))

    def forward(self) -> torch.Tensor:
        byte = self.packed.to(torch.int32).unsqueeze(1)  # [nbytes, 1]
        # bytes are non-negative, so truncating division is floor division (one graph node)
        stream = torch.remainder(torch.div(byte, self.byte_powers, rounding_mode="trunc"), 2)
        stream = stream.reshape(-1)[: self.count * self.bits].reshape(self.count, self.bits)
        codes = (stream * self.code_powers).sum(dim=1)  # [n] int32
        return (self.levels[codes].reshape(self.shape) * self.scale).contiguous()


def _install(module: nn.Module, attribute: str, packed: PackedWeight) -> None:
    """Replace parameter `attribute` of `module` by the output of `packed`, before each call."""
    delattr(module, attribute)
    module.add_module(f"{attribute}_packed", packed)
    setattr(module, attribute, packed())  # a plain tensor until the next forward refreshes it

    def refresh(mod: nn.Module, _inputs) -> None:
        setattr(mod, attribute, getattr(mod, f"{attribute}_packed")())

    module.register_forward_pre_hook(refresh)


def pack_into_model(model: nn.Module, weights: dict[str, PackedWeight]) -> nn.Module:
    """`model` with each parameter named in `weights` served by its `PackedWeight` (in place)."""
    for name, packed in weights.items():
        owner_name, _, attribute = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        if not isinstance(getattr(owner, attribute, None), nn.Parameter):
            raise UserError(f"{name!r} is not a parameter of the model; cannot pack it")
        _install(owner, attribute, packed)
    return model


def level_table(grid: Grid, delta: float) -> torch.Tensor:
    """float32 [2^b]: the level of each code on `grid` with resolution `delta` (codes past the
    last level, which no weight uses, repeat the top level)."""
    codes = torch.arange(2**grid.code_bits).clamp(max=grid.num_levels - 1)
    multiples = codes * grid.step - grid.max_multiple
    return (multiples.to(torch.float32) * delta).to(torch.float32)


def packed_weights(weights: dict[str, torch.Tensor], grid: Grid) -> dict[str, PackedWeight]:
    """A `PackedWeight` for every named weight on `grid`, or on `grid` scaled.

    A weight on the grid itself keeps its levels m·Δ in the table and scale 1; a weight on a
    scaled grid (`qtrain.export.scales`) keeps m in the table (the grid's levels fl(m·Δ_g)
    when its scale multiplies those) and as its scale one Δ (0-dim) when one restores the
    whole tensor, else Δ_c per output channel [C, 1, …]. Anything else raises ValueError: it
    would not be restored exactly.
    """
    if not grid.bounded:
        raise UserError(
            f"the grid {grid.describe()} has no fixed code width, so its weights cannot be "
            "packed; export with {onnx_weights}",
            onnx_weights="onnx_weights=float",
        )
    packed = {}
    for name, weight in weights.items():
        w = weight.detach().cpu()
        if grid.contains(w):
            table, scale, codes = level_table(grid, grid.delta), torch.tensor(1.0), grid.to_codes(w)
        else:
            found = scaled_codes(w, grid)
            if found is None:
                raise UserError(
                    f"weight {name!r} is not on the grid {grid.describe()} (nor on it with one "
                    "scale or one per output channel); export with {onnx_weights}",
                    onnx_weights="onnx_weights=float",
                )
            codes = found.codes
            # the table holds what the scale multiplies: m, or the grid's levels fl(m·Δ_g)
            table = level_table(grid, 1.0 if found.scale_of == MULTIPLES else grid.delta)
            if found.scale.numel() == 1:
                scale = found.scale.reshape(())
            else:
                scale = found.scale.reshape(-1, *([1] * (w.dim() - 1)))
        packed[name] = PackedWeight(codes.reshape(w.shape), grid.code_bits, table, scale)
    return packed
