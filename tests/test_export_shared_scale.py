"""A quantized weight whose channels share one scale is exported with that one scale.

Under policy "all" with scale "absmean", a 1-D quantized tensor (a bias, a BatchNorm weight)
takes one scale, its mean |w_r| (`qtrain.methods.scales`); the packed file stores it as
`<name>:scale` float32 [1] instead of C equal values, and files that store it per channel
(format version 2) still load.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F
from test_export_packed import assert_same_model, calibrate_bn, rewrite

from qtrain import methods, models
from qtrain.export import (
    PackedFormatError,
    export_onnx,
    load_packed,
    save_packed,
    summary_of_target,
)
from qtrain.export.unpack_graph import packed_weights
from qtrain.quant import grids
from qtrain.train.checkpoint import load_checkpoint, save_checkpoint

safe_open = pytest.importorskip("safetensors").safe_open

SCALE = ":scale"
HEADER_LENGTH = 8  # a safetensors file starts with the JSON header's length, uint64


def trained_all_absmean(path, grid: str):
    """tiny_cnn (convs, BatchNorms with biases, a linear layer with a bias) trained three BC
    steps with policy "all" and scale "absmean", saved as a checkpoint. Returns (model, x)."""
    model = models.create("tiny_cnn", 10, 0.25, 3)
    optimizer = methods.create("bc-adam", model, lr=0.05, grid=grid, policy="all", scale="absmean")
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 8, 8, generator=generator)
    y = torch.randint(0, 10, (8,), generator=generator)
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    calibrate_bn(model, x)
    save_checkpoint(
        path,
        {
            "model": {"name": "tiny_cnn", "num_classes": 10, "width": 0.25, "in_channels": 3},
            "method": {
                "name": "bc-adam",
                "grid": optimizer.grid.to_dict(),
                "policy": "all",
                "scale": "absmean",
            },  # fmt: skip
            "quantized": methods.quantized_parameter_names(model, "all"),
            "model_state": model.state_dict(),
        },
    )
    return model, x


def stored_tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(path, framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118


def header_of(path) -> dict:
    with safe_open(path, framework="pt") as f:
        return json.loads(f.metadata()["qtrain"])


def data_bytes(path) -> int:
    """Bytes of a safetensors file's tensor data: the file less its length field and header."""
    raw = path.read_bytes()
    return len(raw) - HEADER_LENGTH - int.from_bytes(raw[:HEADER_LENGTH], "little")


def as_channel_scales(path, quantized: dict[str, torch.Tensor]) -> None:
    """Rewrite the packed file at `path` as format version 2 wrote it: every shared scale
    repeated once per output channel, its entry saying "scale": "channel"."""

    def repeat(tensors):
        for name, weight in quantized.items():
            if tensors.get(name + SCALE, torch.empty(0)).numel() == 1:
                tensors[name + SCALE] = tensors[name + SCALE].repeat(weight.shape[0])
        return tensors

    def channel(header):
        header["format_version"] = 2
        for entry in header["quantized"].values():
            if entry.get("scale") == "tensor":
                entry["scale"] = "channel"
        return header

    rewrite(path, tensors=repeat, header=channel)


@pytest.mark.parametrize("grid", ["binary", "ternary"])
def test_a_one_dimensional_absmean_weight_is_stored_with_one_scale(tmp_path, grid):
    model, x = trained_all_absmean(tmp_path / "c.pt", grid)
    record = load_checkpoint(tmp_path / "c.pt")
    save_packed(tmp_path / "m.safetensors", record)
    stored = stored_tensors(tmp_path / "m.safetensors")
    entries = header_of(tmp_path / "m.safetensors")["quantized"]
    one_dimensional = [n for n in record["quantized"] if record["model_state"][n].dim() == 1]
    assert len(one_dimensional) == 7  # three BatchNorms' weights and biases, fc's bias
    for name in one_dimensional:
        assert stored[name + SCALE].shape == (1,), name
        assert entries[name]["scale"] == "tensor"
        # the one scale is the tensor's level: every nonzero |w| equals it
        weight = model.state_dict()[name]
        assert torch.equal(weight[weight != 0].abs().unique(), stored[name + SCALE])
    for name in set(record["quantized"]) - set(one_dimensional):  # per-channel absmean
        assert stored[name + SCALE].shape == record["model_state"][name].shape[:1], name
        assert entries[name]["scale"] == "channel"
    assert_same_model(model, load_packed(tmp_path / "m.safetensors"), x)


def test_the_file_shrinks_by_the_saved_scales_and_old_files_still_load(tmp_path):
    model, x = trained_all_absmean(tmp_path / "c.pt", "binary")
    record = load_checkpoint(tmp_path / "c.pt")
    new, old = tmp_path / "new.safetensors", tmp_path / "old.safetensors"
    save_packed(new, record)
    save_packed(old, record)
    quantized = {name: record["model_state"][name] for name in record["quantized"]}
    as_channel_scales(old, quantized)
    shared = [n for n, w in quantized.items() if w.dim() == 1]
    saved = sum(4 * (quantized[n].shape[0] - 1) for n in shared)
    assert saved == 4 * (2 * (8 + 8 + 16) + 10 - 7) == 268  # 7 tensors of 74 channels
    assert data_bytes(old) - data_bytes(new) == saved
    assert new.stat().st_size < old.stat().st_size
    for name in shared:
        assert stored_tensors(old)[name + SCALE].shape == quantized[name].shape[:1]
    assert_same_model(model, load_packed(old), x)
    assert_same_model(model, load_packed(new), x)


def test_the_summary_counts_the_scales_the_file_stores(tmp_path):
    trained_all_absmean(tmp_path / "c.pt", "binary")
    save_packed(tmp_path / "m.safetensors", load_checkpoint(tmp_path / "c.pt"))
    stored = stored_tensors(tmp_path / "m.safetensors")
    summary = summary_of_target(str(tmp_path / "c.pt"))
    assert summary.scale_bytes == sum(4 * t.numel() for k, t in stored.items() if SCALE in k)
    assert summary.packed_bytes == sum(t.numel() * t.element_size() for t in stored.values())
    # a model name predicts the same scales for the untrained model
    named = summary_of_target("tiny_cnn", width=0.25, policy="all", scale="absmean")
    assert named.scale_bytes == summary.scale_bytes


@pytest.mark.parametrize("grid", ["binary", "ternary"])
def test_packed_onnx_weights_keep_one_scale_for_a_shared_one(tmp_path, grid):
    model, _ = trained_all_absmean(tmp_path / "c.pt", grid)
    names = methods.quantized_parameter_names(model, "all")
    weights = {name: model.get_parameter(name) for name in names}
    packed = packed_weights(weights, grids.binary() if grid == "binary" else grids.ternary())
    for name, weight in weights.items():
        expected = 1 if weight.dim() == 1 else weight.shape[0]
        assert packed[name].scale.numel() == expected, name
        assert torch.equal(packed[name](), weight.detach())


def test_the_onnx_graph_stores_one_scale_and_computes_the_model(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model, x = trained_all_absmean(tmp_path / "c.pt", "binary")
    names = methods.quantized_parameter_names(model, "all")
    export_onnx(model, tmp_path / "m.onnx", (3, 8, 8), quantized=names, grid=grids.binary())
    graph = onnx.load(tmp_path / "m.onnx").graph
    scales = {t.name: list(t.dims) for t in graph.initializer if t.name.endswith(".scale")}
    for name in names:
        weight = model.get_parameter(name)
        expected = [] if weight.dim() == 1 else [weight.shape[0]] + [1] * (weight.dim() - 1)
        assert scales[f"{name}_packed.scale"] == expected, name
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"images": x.numpy()})
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(logits), model(x), atol=1e-5)


@pytest.mark.parametrize(
    ("entry", "scales", "match"),
    [
        ("tensor", lambda s, c: s.repeat(c), "are not 1 finite float value"),
        ("channel", lambda s, c: s, "finite float value(s) >= 0 (one per output channel)"),
    ],
)
def test_a_scale_count_that_contradicts_its_entry_is_refused(tmp_path, entry, scales, match):
    trained_all_absmean(tmp_path / "c.pt", "binary")
    record = load_checkpoint(tmp_path / "c.pt")
    save_packed(tmp_path / "m.safetensors", record)
    name = "fc.bias"  # 10 channels, one shared scale
    channels = record["model_state"][name].shape[0]
    rewrite(
        tmp_path / "m.safetensors",
        tensors=lambda t: {**t, name + SCALE: scales(t[name + SCALE], channels)},
        header=lambda h: {
            **h,
            "quantized": {**h["quantized"], name: {**h["quantized"][name], "scale": entry}},
        },
    )
    with pytest.raises(PackedFormatError, match=re.escape(match)):
        load_packed(tmp_path / "m.safetensors")
