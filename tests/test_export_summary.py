"""Size summary: exact per-layer and total bytes, agreement with packed files, the command."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from torch.nn import functional as F

from qtrain import methods, models
from qtrain.export import save_packed, summarize, summary_of_target
from qtrain.export.cli import add_parsers
from qtrain.export.summary import human_bytes
from qtrain.quant import grids, parse_grid
from qtrain.train.checkpoint import load_checkpoint, save_checkpoint

safe_open = pytest.importorskip("safetensors").safe_open


def summary_cli(*argv) -> int:
    parser = argparse.ArgumentParser(prog="qtrain")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["summary", *map(str, argv)])
    return args.func(args)


def write_checkpoint(path, name="tiny_cnn", grid="ternary", width=0.2, method="sr-adam"):
    """A checkpoint of a freshly initialised model (SR/R start from ±Δ: on every grid)."""
    model = models.create(name, 10, width, 3)
    methods.create(method, model, lr=0.01, grid=grid)
    quantized = [] if method.startswith("fp") else methods.quantized_parameter_names(model)
    save_checkpoint(
        path,
        {
            "model": {"name": name, "num_classes": 10, "width": width, "in_channels": 3},
            "method": {"name": method, "grid": parse_grid(grid).to_dict(), "policy": "conv"},
            "quantized": quantized,
            "model_state": model.state_dict(),
        },
    )
    return model


def test_vgg9_binary_totals_are_exact():
    model = models.create("vgg9")
    summary = summarize(model, methods.quantized_parameter_names(model), grids.binary())
    assert summary.params == 2_788_554  # 1.73M conv + 1.05M linear weights + BN γ, β, biases
    assert summary.buffers == 2 * 1408 + 8  # running mean and variance of 1,408 BN channels
    assert summary.quantized == 1_734_336
    assert summary.float_bytes == 4 * (2_788_554 + 2 * 1408) + 8 * 8 == 11_165_544
    assert summary.quantized_float_bytes == 4 * 1_734_336
    assert summary.quantized_packed_bytes == 1_734_336 // 8
    assert summary.quantized_ratio == 32.0
    assert summary.packed_bytes == 11_165_544 - 4 * 1_734_336 + 1_734_336 // 8 == 4_444_992
    assert summary.ratio == pytest.approx(11_165_544 / 4_444_992)


@pytest.mark.parametrize("name", models.list_models("image"))  # the GPT: the tied test below
def test_counted_parameters_are_the_models_parameters(name):
    model = models.create(name, 10, 0.25, 3)
    summary = summarize(model, methods.quantized_parameter_names(model), grids.binary())
    assert summary.params == sum(p.numel() for p in model.parameters())
    assert summary.buffers == sum(b.numel() for b in model.buffers())
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    row = next(r for r in summary.rows if model.get_submodule(r.layer) is bn)
    c, affine = bn.num_features, 2 * bn.affine  # γ, β (speednet's BatchNorm learns no scale)
    assert (row.params, row.buffers, row.quantized) == (affine * c, 2 * c + 1, 0)  # | μ, σ², n
    assert row.float_bytes == row.packed_bytes == 4 * (affine + 2) * c + 8


@pytest.mark.parametrize("grid", ["binary", "ternary", "3bit"])
def test_rows_count_every_state_entry(grid):
    grid = parse_grid(grid)
    model = models.create("resnet18", 10, 0.25, 3)
    names = methods.quantized_parameter_names(model, "conv+linear")
    summary = summarize(model, names, grid)
    state = model.state_dict()
    parameters = dict(model.named_parameters())
    layers = list(dict.fromkeys(key.rpartition(".")[0] for key in state))
    assert [r.layer for r in summary.rows] == layers
    for row in summary.rows:
        entries = {k: t for k, t in state.items() if k.rpartition(".")[0] == row.layer}
        assert row.params == sum(t.numel() for k, t in entries.items() if k in parameters)
        assert row.buffers == sum(t.numel() for k, t in entries.items() if k not in parameters)
        assert row.float_bytes == sum(t.numel() * t.element_size() for t in entries.values())
        weight = f"{row.layer}.weight"
        if weight in names:
            n = state[weight].numel()
            assert row.bits == grid.code_bits and row.quantized == n
            assert row.packed_bytes == row.float_bytes - 4 * n + -(-n * grid.code_bits // 8)
        else:
            assert row.bits == 32 and row.quantized == 0
            assert row.packed_bytes == row.float_bytes
    assert summary.params + summary.buffers == sum(t.numel() for t in state.values())


def test_packed_bytes_equal_the_tensor_bytes_of_the_packed_file(tmp_path):
    write_checkpoint(tmp_path / "c.pt", "wrn56_2", "3bit", width=0.3)
    record = load_checkpoint(tmp_path / "c.pt")
    save_packed(tmp_path / "m.safetensors", record)
    with safe_open(tmp_path / "m.safetensors", framework="pt") as f:
        stored = [f.get_tensor(key) for key in f.keys()]  # noqa: SIM118
    summary = summary_of_target(str(tmp_path / "c.pt"))
    assert summary.packed_bytes == sum(t.numel() * t.element_size() for t in stored)
    assert summary_of_target(str(tmp_path / "m.safetensors")) == summary


def test_table_is_aligned_and_ends_with_totals():
    model = models.create("tiny_cnn", 10, 1.0, 3)
    summary = summarize(model, methods.quantized_parameter_names(model), grids.binary())
    lines = summary.format_table().splitlines()
    header, rule = lines[0], lines[1]
    assert header.split() == ["layer", "type", "params", "buffers", "quantized", "bits", "float",
                              "bytes", "packed", "bytes"]  # fmt: skip
    rows = lines[2 : 2 + len(summary.rows)]
    assert [line.split()[0] for line in rows] == [r.layer for r in summary.rows]
    assert lines[2 + len(summary.rows)] == rule
    total = lines[3 + len(summary.rows)].split()
    assert total[0] == "total" and total[-1] == f"{summary.packed_bytes:,}"
    # right-aligned numeric columns: every number ends where its header ends
    for line in rows:
        assert line.rstrip().endswith(f"{int(line.split()[-1].replace(',', '')):,}")
        assert len(line) == len(header)
    assert lines[-1].startswith(f"float {human_bytes(summary.float_bytes)} -> packed")
    assert "(32.00x)" in lines[-1]


def test_to_dict_is_json_with_totals():
    model = models.create("tiny_mlp", 10, 0.25, 3)
    summary = summarize(model, methods.quantized_parameter_names(model), grids.kbit(2, 1.0))
    report = json.loads(json.dumps(summary.to_dict()))
    assert report["grid"] == {"kind": "kbit", "delta": 1.0, "bits": 2}
    assert len(report["rows"]) == len(summary.rows)
    assert report["rows"][0] == {
        "layer": "hidden.1",
        "kind": "Conv2d",
        "params": 16 * 3 * 4 * 4,
        "buffers": 0,
        "quantized": 16 * 3 * 4 * 4,
        "bits": 2,
        "float_bytes": 4 * 768,
        "packed_bytes": 768 * 2 // 8,
        "scale_bytes": 0,
    }
    assert "BatchNorm running statistics" in report["stored"]
    assert report["totals"]["packed_bytes"] == summary.packed_bytes
    assert report["totals"]["quantized_ratio"] == 16.0


def test_full_precision_model_is_not_compressed(tmp_path):
    write_checkpoint(tmp_path / "c.pt", method="fp-adam")
    summary = summary_of_target(str(tmp_path / "c.pt"))
    assert summary.quantized == 0 and summary.ratio == 1.0 and summary.quantized_ratio == 1.0


def test_model_name_uses_conv_policy_and_binary_grid_by_default():
    model = models.create("resnet56")
    expected = summarize(model, methods.quantized_parameter_names(model), grids.binary())
    assert summary_of_target("resnet56") == expected
    wide = summary_of_target("resnet56", grid="ternary", policy="all", width=0.5)
    assert wide.quantized == wide.params  # every parameter, no buffer
    assert all(r.bits == 2 for r in wide.rows if r.quantized)


def test_command_prints_table_or_json(tmp_path, capsys):
    write_checkpoint(tmp_path / "c.pt")
    assert summary_cli(tmp_path / "c.pt") == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith("on grid ternary(delta=1)")
    assert summary_cli("vgg9", "--json", "--width", "0.5", "--num-classes", "100") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows"][-1]["params"] == 128 * 100 + 100  # the last linear layer


def test_bad_targets_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither an existing file nor a registered model"):
        summary_cli("vgg10")
    write_checkpoint(tmp_path / "c.pt")
    with pytest.raises(ValueError, match="grid applies to model names only"):
        summary_cli(tmp_path / "c.pt", "--grid", "binary")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="neither a qtrain checkpoint nor a packed model file"):
        summary_cli(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="'fc.nothing' is not in the model"):
        summarize(models.create("tiny_mlp"), ["fc.nothing"], grids.binary())


def trained_scaled_checkpoint(path, scale: str):
    """A tiny_cnn trained three BC steps with `scale`, saved as a checkpoint."""
    torch.manual_seed(0)
    model = models.create("tiny_cnn", 10, 0.25, 3)
    opt = methods.create("bc-adam", model, lr=0.05, scale=scale)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    save_checkpoint(
        path,
        {
            "model": {"name": "tiny_cnn", "num_classes": 10, "width": 0.25, "in_channels": 3},
            "method": {"name": "bc-adam", "grid": opt.grid.to_dict(), "policy": "conv"},
            "quantized": methods.quantized_parameter_names(model),
            "model_state": model.state_dict(),
        },
    )
    return model


@pytest.mark.parametrize("scale", ["he", "absmean", "absmean-tensor"])
def test_scaled_weights_count_their_scales_as_the_packed_file_stores_them(tmp_path, scale):
    model = trained_scaled_checkpoint(tmp_path / "c.pt", scale)
    save_packed(tmp_path / "m.safetensors", load_checkpoint(tmp_path / "c.pt"))
    with safe_open(tmp_path / "m.safetensors", framework="pt") as f:
        stored = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    summary = summary_of_target(str(tmp_path / "c.pt"))
    names = methods.quantized_parameter_names(model)
    # one scale per output channel for absmean, one per tensor for he and absmean-tensor
    channels = sum(model.get_parameter(name).shape[0] for name in names)
    assert (
        summary.scale_bytes
        == 4 * (channels if scale == "absmean" else len(names))
        == sum(t.numel() * t.element_size() for k, t in stored.items() if k.endswith(":scale"))
    )
    assert summary.packed_bytes == sum(t.numel() * t.element_size() for t in stored.values())
    assert f"include {summary.scale_bytes:,} bytes of scales" in summary.format_table()
    # a model name with a scale counts the same scale vectors for the untrained model
    named = summary_of_target("tiny_cnn", scale=scale, width=0.25)
    assert named.scale_bytes == summary.scale_bytes
    assert summary_of_target("tiny_cnn", width=0.25).scale_bytes == 0


def test_binary_activations_are_listed_and_store_nothing():
    binary = summary_of_target("vgg9", activations="binary", width=0.25)
    plain = summary_of_target("vgg9", width=0.25)
    assert binary.binary_activations and not plain.binary_activations
    assert (binary.float_bytes, binary.packed_bytes) == (plain.float_bytes, plain.packed_bytes)
    model = models.create("vgg9", 10, 0.25, 3, activations="binary")
    assert all(
        type(model.get_submodule(name)).__name__ == "BinaryActivation"
        for name in binary.binary_activations
    )
    assert f"{len(binary.binary_activations)} binary activations" in binary.format_table()
    assert "no stored bytes" in binary.format_table()
    assert summary_cli("vgg9", "--activations", "binary", "--width", "0.25") == 0


def test_a_tied_gpt_counts_its_shared_embedding_once():
    from qtrain.models.gpt import build_gpt

    model = build_gpt(65, n_layer=1, n_embd=32, n_head=2, block_size=16)
    assert model.lm_head.weight is model.tok_emb.weight
    summary = summarize(model, methods.quantized_parameter_names(model, "linear"), grids.ternary())
    assert summary.params == sum(p.numel() for p in model.parameters())
    assert summary.quantized > 0
    # bytes too: the head adds nothing, the model's tensors are counted once
    unique = {(t.untyped_storage().data_ptr(), t.shape) for t in model.state_dict().values()}
    assert len(unique) == len(model.state_dict()) - 1
    assert summary.float_bytes == sum(
        t.numel() * t.element_size() for n, t in model.state_dict().items() if n != "lm_head.weight"
    )
