"""Packed export of weights on scaled grids: codes plus one Δ, or one per output channel,
bit-identical, the scale multiplying the multiples m or, when only those restore, the levels."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from test_export_packed import (
    _drop,
    _set,
    assert_same_model,
    calibrate_bn,
    export_cli,
    input_side,
    make_checkpoint,
    rewrite,
    save_record,
)

from qtrain import methods, models
from qtrain.export import (
    PackedFormatError,
    export_onnx,
    load_packed,
    packed_nbytes,
    save_packed,
    summary_of_target,
)
from qtrain.export import packed as packed_module
from qtrain.export.scales import LEVELS, scaled_codes, weight_from_codes
from qtrain.methods.scales import scaled_round
from qtrain.quant import grids
from qtrain.train.checkpoint import load_checkpoint, save_checkpoint

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
    with pytest.raises(PackedFormatError, match="with one scale per tensor or per output channel"):
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


# -- weights whose scale multiplies the grid's levels ------------------------------------------
# Training stores fl(L(m)·s) with L(m) = fl(m·Δ_g); on a k-bit grid fl(3·fl(L(1)·s)) can miss
# fl(L(3)·s) by one ulp, so such a weight restores only as levels times a scale.


def level_scaled(shape, grid, *, per_channel: bool, seed=0, tries=50):
    """(weight, s): the first seeded weight that `scaled_round` puts on `grid` scaled by s
    (one s, or one per output channel) that needs the levels to restore."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(tries):
        s = 0.01 + torch.rand(shape[0] if per_channel else 1, generator=generator)
        s = s.reshape(-1, *[1] * (len(shape) - 1)) if per_channel else s.reshape(())
        x = torch.randn(shape, generator=generator) * s
        weight = scaled_round(x, s, grid, stochastic=False)
        if scaled_codes(weight, grid).scale_of == LEVELS:
            return weight, s
    raise AssertionError(f"no seeded scale of {tries} needs the levels of {grid.describe()}")


@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor", "channel"])
@pytest.mark.parametrize("grid", [grids.kbit(2), grids.kbit(3), grids.kbit(4, 0.01)])
def test_a_weight_that_only_levels_restore_is_read_back_bit_exactly(grid, per_channel):
    weight, s = level_scaled((8, 3, 3, 3), grid, per_channel=per_channel)
    found = scaled_codes(weight, grid)
    assert found.scale_of == LEVELS
    assert found.scale.shape == (8 if per_channel else 1,)
    assert torch.allclose(found.scale, s.reshape(-1), rtol=1e-6, atol=0)
    # the codes training rounded to: w/s is L(m) up to rounding, which to_codes rounds away
    assert torch.equal(found.codes, grid.to_codes(weight / s).reshape(-1))
    restored = weight_from_codes(found.codes, found.scale, grid, list(weight.shape),
                                 weight.dtype, found.scale_of)  # fmt: skip
    assert torch.equal(restored, weight)


def test_a_channel_at_its_outer_levels_only_restores_as_levels():
    """Channels at ±3 only next to one that needs the levels: m = ±1 times one s′ cannot reach
    every float that L(3)·s reaches (L(1) < 1 spreads the products of neighbouring s′ wider than
    the floats near them), so j = 3 is found for those channels."""
    grid = grids.kbit(2)
    mixed, _ = level_scaled((1, 9), grid, per_channel=False)
    generator = torch.Generator().manual_seed(0)
    s = 0.01 + torch.rand(63, 1, generator=generator)
    outer = grid.from_multiples(signs((63, 9), generator) * 3) * s
    weight = torch.cat([mixed, outer])
    found = scaled_codes(weight, grid)
    assert found.scale_of == LEVELS and found.scale.shape == (64,)
    restored = weight_from_codes(found.codes, found.scale, grid, [64, 9], weight.dtype,
                                 found.scale_of)  # fmt: skip
    assert torch.equal(restored, weight)
    codes = found.codes.reshape(64, 9)[1:]
    assert bool((codes == 0).logical_or(codes == 3).all(dim=1).any())  # some at ±3 as ±3


KBIT = grids.kbit(2)


def kbit_levels(shape, generator):
    """Levels L(m) of the 2-bit grid (float32, as rounding computes them): `hand_scaled` then
    stores L(m)·s, the weight training writes."""
    return KBIT.from_codes(torch.randint(0, KBIT.num_levels, shape, generator=generator))


def header_of(path) -> dict:
    with safe_open(path, framework="pt") as f:
        return json.loads(f.metadata()["qtrain"])


@pytest.mark.parametrize("scale", ["tensor", "channel"])
def test_level_scaled_weights_round_trip_bit_identically(tmp_path, scale):
    def one_per_tensor(p, generator):
        return torch.full((p.shape[0],), 0.01 + float(torch.rand((), generator=generator)))

    scales = one_per_tensor if scale == "tensor" else per_channel
    model, x, _, record = hand_scaled(tmp_path / "c.pt", KBIT, kbit_levels, scales, seed=3)
    save_packed(tmp_path / "m.safetensors", record)
    header = header_of(tmp_path / "m.safetensors")
    levels = [n for n, entry in header["quantized"].items() if entry.get("scale_of") == LEVELS]
    assert levels  # seed 3 gives weights that only the levels restore
    assert header["format_version"] == 5
    assert {header["quantized"][n]["scale"] for n in levels} == {scale}
    assert_same_model(model, load_packed(tmp_path / "m.safetensors"), x)


def trained_2bit(path, scale: str, seed: int):
    """tiny_cnn trained two BC-Adam steps on the 2-bit grid with `scale`, saved as a
    checkpoint. Returns (model, x)."""
    torch.manual_seed(seed)
    model = models.create("tiny_cnn", 10, 0.25, 3)
    optimizer = methods.create("bc-adam", model, lr=0.05, grid="2bit", scale=scale, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 3, 8, 8, generator=generator)
    y = torch.randint(0, 10, (8,), generator=generator)
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    calibrate_bn(model, x)
    save_record(path, model, "tiny_cnn", KBIT, width=0.25, seed=seed)
    record = load_checkpoint(path)
    record["method"]["scale"] = scale
    save_checkpoint(path, record)
    return model, x


# seeds whose run has weights that only the levels restore (found by training seeds 0-5)
LEVEL_RUNS = {"absmean-tensor": 3, "absmean": 0}


@pytest.mark.parametrize("scale", list(LEVEL_RUNS))
def test_a_2bit_bc_run_exports_and_loads_bit_identically(tmp_path, scale):
    model, x = trained_2bit(tmp_path / "c.pt", scale, LEVEL_RUNS[scale])
    assert export_cli(tmp_path / "c.pt", "--format", "packed", "--out", tmp_path / "m.st") == 0
    header = header_of(tmp_path / "m.st")
    kinds = {entry["scale"] for entry in header["quantized"].values()}
    assert kinds == {"tensor" if scale == "absmean-tensor" else "channel"}
    assert any(entry.get("scale_of") == LEVELS for entry in header["quantized"].values())
    assert header["format_version"] == 5
    assert_same_model(model, load_packed(tmp_path / "m.st"), x)
    stored = stored_tensors(tmp_path / "m.st")
    summary = summary_of_target(str(tmp_path / "c.pt"))
    assert summary.scale_bytes == sum(4 * t.numel() for k, t in stored.items() if ":scale" in k)


def test_the_onnx_graph_of_a_2bit_run_computes_its_logits(tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model, x = trained_2bit(tmp_path / "c.pt", "absmean", LEVEL_RUNS["absmean"])
    names = methods.quantized_parameter_names(model)
    export_onnx(model, tmp_path / "m.onnx", (3, 8, 8), quantized=names, grid=KBIT)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"images": x.numpy()})
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(logits), model(x), atol=1e-5)


@pytest.fixture
def level_file(tmp_path):
    """A packed file of a 2-bit absmean-tensor run with weights scaled as levels."""
    trained_2bit(tmp_path / "c.pt", "absmean-tensor", LEVEL_RUNS["absmean-tensor"])
    save_packed(tmp_path / "m.safetensors", load_checkpoint(tmp_path / "c.pt"))
    return tmp_path / "m.safetensors"


def test_a_reader_of_version_4_refuses_a_file_with_level_scales(level_file, monkeypatch):
    monkeypatch.setattr(packed_module, "READABLE_VERSIONS", (1, 2, 3, 4))
    with pytest.raises(PackedFormatError, match="packed format version 5, this qtrain reads"):
        load_packed(level_file)


def test_scale_of_in_a_file_of_version_4_is_refused(level_file):
    rewrite(level_file, header=lambda h: _set(h, "format_version", 4))
    with pytest.raises(PackedFormatError, match="declares 'scale_of', which version 5 introduced"):
        load_packed(level_file)


@pytest.mark.parametrize("value", ["multiples", "Levels", 3, None])
def test_a_tampered_scale_of_is_refused_in_one_line(level_file, value):
    name = next(n for n, e in header_of(level_file)["quantized"].items() if "scale_of" in e)
    rewrite(level_file, header=lambda h: _set(h["quantized"][name], "scale_of", value) and h)
    with pytest.raises(PackedFormatError, match=f"'{name}' declares 'scale_of' '{value}'") as e:
        load_packed(level_file)
    assert "\n" not in str(e.value)


def test_files_without_level_scales_stay_version_3_with_scales_of_multiples(tmp_path):
    """Binary and ternary runs, and 2-bit ones that the multiples restore, write what they
    wrote before: version 3, no "scale_of", the scale the smallest nonzero |w|."""
    for grid, seed in (("binary", 0), ("ternary", 0)):
        make_checkpoint(tmp_path / "c.pt", grid=grid, seed=seed)
        save_packed(tmp_path / f"{grid}.safetensors", load_checkpoint(tmp_path / "c.pt"))
    trained_2bit(tmp_path / "k.pt", "absmean-tensor", 0)  # seed 0: every weight as multiples
    record = load_checkpoint(tmp_path / "k.pt")
    save_packed(tmp_path / "2bit.safetensors", record)
    for name in ("binary", "ternary", "2bit"):
        header = header_of(tmp_path / f"{name}.safetensors")
        assert header["format_version"] == 3
        assert not [e for e in header["quantized"].values() if "scale_of" in e]
    stored = stored_tensors(tmp_path / "2bit.safetensors")
    for name in record["quantized"]:
        weight = record["model_state"][name]
        assert torch.equal(stored[name + ":scale"], weight[weight != 0].abs().min().reshape(1))


def test_a_quantized_run_whose_weight_left_the_grid_names_the_change(tmp_path):
    trained_2bit(tmp_path / "c.pt", "absmean-tensor", 0)
    record = load_checkpoint(tmp_path / "c.pt")
    record["model_state"][FIRST][0, 0, 0, 0] *= 1.5  # no scale restores this weight
    with pytest.raises(PackedFormatError) as e:
        save_packed(tmp_path / "m.safetensors", record)
    message = str(e.value)
    assert "although method 'bc-adam' keeps its weights there" in message
    assert "changed after training" in message and "format=onnx" in message
    assert "full-precision" not in message
    assert not (tmp_path / "m.safetensors").exists()
