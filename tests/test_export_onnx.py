"""ONNX export: onnxruntime reproduces PyTorch's logits (real CIFAR-10 images), grids survive."""

from __future__ import annotations

import argparse
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qtrain import data, methods, models
from qtrain.base.errors import MissingDependencyError
from qtrain.export import export_onnx, input_shape, load_any_model
from qtrain.export.cli import add_parsers
from qtrain.quant import grids
from qtrain.train.checkpoint import save_checkpoint

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("safetensors")  # packed files are exported here too

TOLERANCE = 1e-4  # max |Δlogit| between onnxruntime and PyTorch


def run_onnx(path, images: torch.Tensor) -> torch.Tensor:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"images": images.numpy()})
    return torch.from_numpy(logits)


def export_cli(*argv) -> int:
    parser = argparse.ArgumentParser(prog="qtrain")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["export", *map(str, argv)])
    return args.func(args)


@torch.no_grad()
def calibrate_bn(model: torch.nn.Module, x: torch.Tensor) -> None:
    """Set every BatchNorm's running statistics to those of batch `x`, as after training."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average: one batch gives its own statistics
    model.train()(x)
    model.eval()


def normalise(images: torch.Tensor, splits) -> torch.Tensor:
    mean = torch.tensor(splits.mean).view(1, -1, 1, 1)
    std = torch.tensor(splits.std).view(1, -1, 1, 1)
    return (images.float() - mean) / std


@pytest.mark.parametrize("weights", ["packed", "float"])
def test_vgg9_onnx_matches_pytorch_on_real_cifar10(cifar10_root, tmp_path, capsys, weights):
    """A BC-ADAM VGG-9 trained a few steps on CIFAR-10, exported from its checkpoint."""
    splits = data.load("cifar10", cifar10_root)
    generator = torch.Generator().manual_seed(0)
    pick = torch.randperm(len(splits.train), generator=generator)[:64]
    x_train, y_train = normalise(splits.train.images[pick], splits), splits.train.labels[pick]
    model = models.create("vgg9")
    optimizer = methods.create("bc-adam", model, lr=0.01)
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(model(x_train), y_train).backward()
        optimizer.step()
    calibrate_bn(model, x_train)
    quantized = methods.quantized_parameter_names(model)
    save_checkpoint(
        tmp_path / "c.pt",
        {
            "model": {"name": "vgg9", "num_classes": 10, "width": 1.0, "in_channels": 3},
            "method": {"name": "bc-adam", "grid": grids.binary().to_dict(), "policy": "conv"},
            "quantized": quantized,
            "model_state": model.state_dict(),
            "config": {},
        },
    )
    out = tmp_path / "m.onnx"
    assert (
        export_cli(tmp_path / "c.pt", "--format", "onnx", "--out", out, "--onnx-weights", weights)
        == 0
    )
    assert f"input images [batch, 3, 32, 32], output logits, opset 17, {weights} weights" in (
        capsys.readouterr().out
    )

    x_test = normalise(splits.test.images[:256], splits)
    with torch.no_grad():
        expected = model(x_test)
    actual = run_onnx(tmp_path / "m.onnx", x_test)
    assert actual.shape == (256, 10)
    assert float((actual - expected).abs().max()) <= TOLERANCE
    assert torch.equal(actual.argmax(1), expected.argmax(1))
    assert float(expected.abs().max()) > 1.0  # the comparison is not between near-zero logits

    graph = onnx.load(out).graph
    stored = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    state = model.state_dict()
    for name in quantized:
        if weights == "float":  # stored exactly, still binary: BatchNorm was not folded in
            assert np.array_equal(stored[name], state[name].numpy())
            assert set(np.unique(stored[name])) <= {-1.0, 1.0}
        else:  # one bit per weight, and no float copy anywhere in the file
            assert name not in stored
            codes = stored[f"{name}_packed.packed"]
            assert codes.dtype == np.uint8 and codes.size == (state[name].numel() + 7) // 8
    if weights == "packed":  # within a few percent of the packed safetensors file
        assert export_cli(tmp_path / "c.pt", "--format", "packed", "--out", tmp_path / "m.st") == 0
        assert out.stat().st_size <= 1.03 * (tmp_path / "m.st").stat().st_size


@pytest.mark.parametrize("name", models.list_models("image"))
def test_every_model_exports_and_runs(tmp_path, name):
    model = models.create(name, 10, 0.2 if name.startswith("tiny") else 0.125, 3)
    methods.create("sr-adam", model, lr=0.01, grid=grids.kbit(2, 0.5))
    shape = (3, 32, 32) if name.startswith("vgg") else (3, 16, 16)  # small and fast
    generator = torch.Generator().manual_seed(0)
    calibrate_bn(model, torch.randn(8, *shape, generator=generator))
    export_onnx(model, tmp_path / "m.onnx", shape)
    x = torch.randn(3, *shape, generator=generator)  # another batch size than at export
    with torch.no_grad():
        expected = model(x)
    assert float((run_onnx(tmp_path / "m.onnx", x) - expected).abs().max()) <= TOLERANCE


@pytest.mark.parametrize(
    ("name", "channels", "expected"),
    [("vgg9", 3, (3, 32, 32)), ("resnet18", 3, (3, 224, 224)), ("tiny_cnn", 1, (1, 8, 8))],
)
def test_default_input_shape_is_the_models_own(name, channels, expected):
    assert input_shape({"model": {"name": name, "in_channels": channels}}) == expected


def test_packed_file_exports_to_onnx(tmp_path):
    model = models.create("tiny_cnn", 10, 0.25, 3)
    methods.create("r-adam", model, lr=0.01, grid=grids.ternary())
    calibrate_bn(model, torch.randn(8, 3, 8, 8))
    save_checkpoint(
        tmp_path / "c.pt",
        {
            "model": {"name": "tiny_cnn", "num_classes": 10, "width": 0.25, "in_channels": 3},
            "method": {"name": "r-adam", "grid": grids.ternary().to_dict(), "policy": "conv"},
            "quantized": methods.quantized_parameter_names(model),
            "model_state": model.state_dict(),
        },
    )
    assert export_cli(tmp_path / "c.pt", "--format", "packed", "--out", tmp_path / "m.st") == 0
    out = tmp_path / "m.onnx"
    assert export_cli(tmp_path / "m.st", "--format", "onnx", "--out", out, "--input-size", 12) == 0
    loaded, _ = load_any_model(tmp_path / "m.st")
    x = torch.randn(5, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        assert float((run_onnx(out, x) - model(x)).abs().max()) <= TOLERANCE


@pytest.mark.parametrize(
    ("option", "match"),
    [("--opset=16", "opset must be >= 17"), ("--input-size=0", "positive number of pixels")],
)
def test_bad_options_write_nothing(tmp_path, option, match):
    model = models.create("tiny_mlp", 10, 0.25, 3)
    save_checkpoint(
        tmp_path / "c.pt",
        {
            "model": {"name": "tiny_mlp", "num_classes": 10, "width": 0.25, "in_channels": 3},
            "method": {"name": "fp-adam", "grid": grids.binary().to_dict(), "policy": "conv"},
            "quantized": [],
            "model_state": model.state_dict(),
        },
    )
    with pytest.raises(ValueError, match=match):
        export_cli(tmp_path / "c.pt", "--format", "onnx", "--out", tmp_path / "m.onnx", option)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]


def test_missing_onnx_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if it were not installed
    with pytest.raises(MissingDependencyError, match=r"pip install 'qtrain\[export\]'"):
        export_onnx(models.create("tiny_mlp"), tmp_path / "m.onnx", (3, 8, 8))
    assert not (tmp_path / "m.onnx").exists()
