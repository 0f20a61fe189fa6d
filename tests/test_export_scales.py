"""Packed export of weights on scaled grids: codes plus one Δ, or one per output channel,
bit-identical."""

from __future__ import annotations

import math

import pytest
import torch
from test_export_packed import (
    _drop,
    _set,
    assert_same_model,
    calibrate_bn,
    input_side,
    rewrite,
    save_record,
)

from qtrain import methods, models
from qtrain.export import PackedFormatError, load_packed, packed_nbytes, save_packed
from qtrain.quant import grids
from qtrain.train.checkpoint import load_checkpoint

safe_open = pytest.importorskip("safetensors").safe_open

FIRST = "features.0.0.weight"


def hand_scaled(path, grid, multiples, scale, *, name="tiny_cnn", seed=0):
    """A checkpoint whose quantized weights are m·Δ_c: `multiples(shape, generator)` draws m,
    `scale(weight, generator)` gives Δ [C]. Returns (model, inputs, {name: Δ}, record), the
    record's method declaring a scale as a scaled run's would."""
    model = models.create(name, 10, 0.5, 3)
    generator = torch.Generator().manual_seed(seed)
    deltas = {}
    with torch.no_grad():
        for key in methods.quantized_parameter_names(model):
            p = model.get_parameter(key)
            deltas[key] = scale(p, generator).float()
            shape = (-1,) + (1,) * (p.dim() - 1)
            p.copy_(multiples(p.shape, generator).float() * deltas[key].reshape(shape))
    side = input_side(name)
    x = torch.randn(4, 3, side, side, generator=generator)
    calibrate_bn(model, x)
    save_record(path, model, name, grid, width=0.5)
    record = load_checkpoint(path)
    record["method"]["scale"] = "absmean"
    return model, x, deltas, record


def signs(shape, generator):
    return torch.randint(0, 2, shape, generator=generator) * 2 - 1


def per_channel(p, generator):
    return 0.01 + torch.rand(p.shape[0], generator=generator)


def stored_tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(path, framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118


def test_binary_weights_scaled_per_channel_round_trip_bit_identically(tmp_path):
    model, x, deltas, record = hand_scaled(tmp_path / "c.pt", grids.binary(), signs, per_channel)
    save_packed(tmp_path / "m.safetensors", record)
    assert_same_model(model, load_packed(tmp_path / "m.safetensors"), x)
    stored = stored_tensors(tmp_path / "m.safetensors")
    for key, delta in deltas.items():
        assert torch.equal(stored[key + ":scale"], delta)
        assert stored[key].dtype == torch.uint8
        assert stored[key].numel() == packed_nbytes(model.get_parameter(key).numel(), 1)


def test_one_scale_per_tensor_is_stored_once(tmp_path):
    """The he scale: one constant Δ = √(2/fan_in) per layer, stored as float32 [1]."""

    def he(p, generator):
        return torch.full((p.shape[0],), math.sqrt(2 / p[0].numel()))

    model, x, deltas, record = hand_scaled(tmp_path / "c.pt", grids.binary(), signs, he)
    save_packed(tmp_path / "m.safetensors", record)
    assert_same_model(model, load_packed(tmp_path / "m.safetensors"), x)
    stored = stored_tensors(tmp_path / "m.safetensors")
    for key, delta in deltas.items():
        assert torch.equal(stored[key + ":scale"], delta[:1])


def test_ternary_with_a_zero_channel_and_kbit_without_its_smallest_level(tmp_path):
    def ternary_multiples(shape, generator):
        m = torch.randint(-1, 2, shape, generator=generator)
        m[0] = 0  # a channel of zeros only: Δ_0 = 0
        return m

    model, x, _, record = hand_scaled(
        tmp_path / "t.pt", grids.ternary(), ternary_multiples, per_channel
    )
    save_packed(tmp_path / "t.safetensors", record)
    assert_same_model(model, load_packed(tmp_path / "t.safetensors"), x)
    assert stored_tensors(tmp_path / "t.safetensors")[FIRST + ":scale"][0] == 0

    def outer_levels_only(shape, generator):
        return signs(shape, generator) * 3  # ±3Δ_c only: stored as level ±1 of Δ = 3Δ_c

    model, x, _, record = hand_scaled(
        tmp_path / "k.pt", grids.kbit(2), outer_levels_only, per_channel
    )
    save_packed(tmp_path / "k.safetensors", record)
    assert_same_model(model, load_packed(tmp_path / "k.safetensors"), x)


def test_weights_on_the_fixed_grid_carry_no_scales(tmp_path):
    def one(p, generator):
        return torch.ones(p.shape[0])

    model, x, _, record = hand_scaled(tmp_path / "c.pt", grids.binary(), signs, one)
    save_packed(tmp_path / "m.safetensors", record)
    assert not [key for key in stored_tensors(tmp_path / "m.safetensors") if ":" in key]
    assert_same_model(model, load_packed(tmp_path / "m.safetensors"), x)


def test_a_channel_with_two_magnitudes_is_refused(tmp_path):
    model, _, _, record = hand_scaled(tmp_path / "c.pt", grids.binary(), signs, per_channel)
    weight = record["model_state"][FIRST]
    weight[1, 0, 0, 0] *= 2  # channel 1 is no longer ±Δ_1
    with pytest.raises(PackedFormatError, match="nor on it with one scale per output channel"):
        save_packed(tmp_path / "m.safetensors", record)
    assert not (tmp_path / "m.safetensors").exists()


SCALE = FIRST + ":scale"
CORRUPT_SCALES = {
    "missing scale": (dict(tensors=lambda t: _drop(t, SCALE)), f"lacks scale tensor '{SCALE}'"),
    "scale of an unscaled weight": (
        dict(header=lambda h: _drop(h["quantized"][FIRST], "scale") and h),
        f"unexpected scale tensor '{SCALE}'",
    ),
    "negative scale": (
        dict(tensors=lambda t: _set(t, SCALE, -t[SCALE])),
        f"scales of quantized tensor '{FIRST}' are not",
    ),
    "scale of the wrong length": (
        dict(tensors=lambda t: _set(t, SCALE, t[SCALE][:-1])),
        f"scales of quantized tensor '{FIRST}' are not",
    ),
    "unknown scale kind": (
        dict(header=lambda h: _set(h["quantized"][FIRST], "scale", "row") and h),
        "no scale other than 'channel' or 'tensor'",
    ),
}


@pytest.mark.parametrize("case", list(CORRUPT_SCALES))
def test_corrupt_scales_are_refused(tmp_path, case):
    _, _, _, record = hand_scaled(tmp_path / "c.pt", grids.binary(), signs, per_channel)
    save_packed(tmp_path / "m.safetensors", record)
    edits, match = CORRUPT_SCALES[case]
    rewrite(tmp_path / "m.safetensors", **edits)
    with pytest.raises(PackedFormatError, match=match):
        load_packed(tmp_path / "m.safetensors")
