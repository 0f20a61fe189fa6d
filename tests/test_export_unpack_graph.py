"""Packed weights unpacked inside the graph: bit-identical in PyTorch and in onnxruntime."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from test_export_scales import level_scaled
from torch import nn

from qtrain.export.scales import scaled_codes
from qtrain.export.unpack_graph import PackedWeight, level_table, pack_into_model, packed_weights
from qtrain.quant import parse_grid

GRIDS = ["binary", "ternary", "2bit", "3bit", "4bit", "8bit"]


def on_grid_weight(grid, shape, generator, per_channel: bool):
    """(weight, codes, levels, scale): random codes, levels m, scale Δ or Δ_c per channel."""
    unit = parse_grid(grid.kind if grid.kind in ("binary", "ternary") else f"{grid.bits}bit", 1.0)
    codes = torch.randint(0, 2**grid.code_bits, shape, generator=generator)
    codes = codes.clamp(max=grid.num_levels - 1)
    levels = unit.from_codes(torch.arange(2**grid.code_bits).clamp(max=grid.num_levels - 1))
    if per_channel:
        scale = torch.rand(shape[0], *([1] * (len(shape) - 1)), generator=generator) + 0.05
    else:
        scale = torch.tensor(grid.delta)
    weight = levels[codes] * scale
    return weight, codes, levels, scale


@pytest.mark.parametrize("per_channel", [False, True], ids=["fixed", "per-channel"])
@pytest.mark.parametrize("grid_name", GRIDS)
def test_unpacked_weight_is_bit_identical(grid_name, per_channel):
    grid = parse_grid(grid_name, 0.37)
    g = torch.Generator().manual_seed(7)
    weight, codes, levels, scale = on_grid_weight(grid, (5, 3, 3, 3), g, per_channel)
    packed = PackedWeight(codes, grid.code_bits, levels, scale)
    assert packed.packed.numel() == (codes.numel() * grid.code_bits + 7) // 8
    assert torch.equal(packed(), weight)


class _Emit(nn.Module):
    def __init__(self, packed: PackedWeight) -> None:
        super().__init__()
        self.packed = packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.packed() + x


def run_onnx(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    ort = pytest.importorskip("onnxruntime")
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (x,), buffer, dynamo=False, opset_version=17, do_constant_folding=False,
            input_names=["x"], output_names=["y"],
        )  # fmt: skip
    session = ort.InferenceSession(buffer.getvalue())
    return torch.from_numpy(session.run(None, {"x": x.numpy()})[0])


@pytest.mark.parametrize("per_channel", [False, True], ids=["fixed", "per-channel"])
@pytest.mark.parametrize("grid_name", GRIDS)
def test_onnxruntime_unpacks_the_same_weight(grid_name, per_channel):
    pytest.importorskip("onnx")
    grid = parse_grid(grid_name, 0.37)
    weight, codes, levels, scale = on_grid_weight(
        grid, (6, 4, 3, 3), torch.Generator().manual_seed(3), per_channel
    )
    module = _Emit(PackedWeight(codes, grid.code_bits, levels, scale))
    assert torch.equal(run_onnx(module, torch.zeros(())), weight)


def test_model_with_packed_weights_computes_the_same_logits():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    conv = model[0]
    with torch.no_grad():
        conv.weight.copy_(torch.where(conv.weight >= 0, 0.5, -0.5))
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    codes = (conv.weight.detach() > 0).long()
    pack_into_model(
        model, {"0.weight": PackedWeight(codes, 1, torch.tensor([-1.0, 1.0]), torch.tensor(0.5))}
    )
    assert "0.weight" not in dict(model.named_parameters())
    assert torch.equal(model(x), expected)


def test_packing_a_name_that_is_not_a_parameter_is_refused():
    model = nn.Sequential(nn.Conv2d(1, 1, 1))
    packed = PackedWeight(
        torch.zeros(1, 1, 1, 1, dtype=torch.long), 1, torch.tensor([-1.0, 1.0]), torch.tensor(1.0)
    )
    with pytest.raises(ValueError, match="not a parameter"):
        pack_into_model(model, {"0.bias_typo": packed})


@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor", "channel"])
def test_a_weight_scaled_as_levels_keeps_the_grids_levels_and_unpacks_exactly(per_channel):
    """A 2-bit weight that only the levels restore: the table holds L(m) = fl(m·Δ_g), the
    scale s, and PyTorch and onnxruntime both rebuild the weight bit for bit."""
    pytest.importorskip("onnx")
    grid = parse_grid("2bit")
    weight, _ = level_scaled((6, 4, 3, 3), grid, per_channel=per_channel)
    packed = packed_weights({"w": weight}, grid)["w"]
    found = scaled_codes(weight, grid)
    assert torch.equal(packed.levels, level_table(grid, grid.delta))
    assert torch.equal(packed.scale.reshape(-1), found.scale)
    assert torch.equal(packed(), weight)
    assert torch.equal(run_onnx(_Emit(packed), torch.zeros(())), weight)
