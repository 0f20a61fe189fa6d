"""Binary activations: sign(x) with sign(0) = +1, the clipped STE, and where the zoo puts them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qtrain import methods, models
from qtrain.models.activations import BinaryActivation, binary_sign
from qtrain.models.registry import list_binary_activation_models

CIFAR_MODELS = ("vgg9", "vgg_bc", "resnet56", "wrn56_2", "tiny_cnn")
TEST_WIDTH = {"vgg_bc": 0.125, "vgg9": 0.25, "resnet56": 0.25, "wrn56_2": 0.125}


def build(name: str, activations: str, classes: int = 10) -> nn.Module:
    return models.create(
        name, num_classes=classes, width=TEST_WIDTH.get(name, 1.0), activations=activations
    )


def conv_inputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The input of every Conv2d in call order, captured by forward hooks."""
    seen: list[torch.Tensor] = []
    hooks = [
        m.register_forward_hook(lambda _m, args, _out: seen.append(args[0].detach()))
        for m in model.modules()
        if isinstance(m, nn.Conv2d)
    ]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_sign_is_plus_or_minus_one_and_zero_maps_to_plus_one(dtype):
    x = torch.cat([torch.randn(1000), torch.zeros(5), -torch.zeros(5)]).to(dtype)
    y = binary_sign(x)
    assert y.dtype == dtype
    assert set(y.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(y, torch.where(x >= 0, 1.0, -1.0).to(dtype))
    assert (y[-10:] == 1).all()  # +0.0 and -0.0 both map to +1, like Q_d on {-1, +1}


def test_ste_gradient_is_one_inside_the_clip_and_zero_outside():
    x = torch.cat([torch.linspace(-3, 3, 601), torch.tensor([-1.0, 1.0, 0.0])])
    x.requires_grad_(True)
    upstream = torch.randn(x.shape)
    binary_sign(x).backward(upstream)
    inside = x.detach().abs() <= 1
    assert torch.equal(x.grad[inside], upstream[inside])  # exactly 1 × upstream, ends included
    assert torch.equal(x.grad[~inside], torch.zeros(int((~inside).sum())))
    assert inside.sum() > 0 and (~inside).sum() > 0


def test_supported_models_are_the_cifar_zoo():
    assert set(list_binary_activation_models()) == set(CIFAR_MODELS)
    for name in models.list_models():
        assert models.model_info(name).binary_activations == (name in CIFAR_MODELS)


@pytest.mark.parametrize("name", CIFAR_MODELS)
def test_every_conv_but_the_first_reads_plus_minus_one(name):
    model = build(name, "binary").train()
    x = torch.randn(4, 3, 32, 32)
    inputs = conv_inputs(model, x)
    assert len(inputs) >= 3
    assert torch.equal(inputs[0], x)  # the first layer sees the image itself
    for i, seen in enumerate(inputs[1:], start=1):
        assert set(seen.unique().tolist()) == {-1.0, 1.0}, (name, i)
    # and with float activations no conv past the first sees only ±1 (ReLU outputs are ≥ 0)
    for seen in conv_inputs(build(name, "float"), x)[1:]:
        assert not set(seen.unique().tolist()) <= {-1.0, 1.0}


@pytest.mark.parametrize("name", CIFAR_MODELS)
def test_binary_activations_keep_the_parameters(name):
    torch.manual_seed(1)
    float_model = build(name, "float")
    torch.manual_seed(1)
    binary_model = build(name, "binary")
    shapes = {k: p.shape for k, p in float_model.named_parameters()}
    assert {k: p.shape for k, p in binary_model.named_parameters()} == shapes
    assert methods.quantized_parameter_names(binary_model) == methods.quantized_parameter_names(
        float_model
    )
    for a, b in zip(float_model.parameters(), binary_model.parameters(), strict=True):
        assert torch.equal(a, b)  # same initialisation draw: the option adds no parameters


@pytest.mark.parametrize("name", CIFAR_MODELS)
def test_every_binary_model_trains_a_step(name):
    model = build(name, "binary", classes=5)
    optimizer = methods.create("bc-adam", model, lr=0.01)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 5
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), (name, pname)
    # the STE lets gradient through to the first conv, past every sign
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.weight.grad.abs().sum() > 0
    optimizer.step()
    for p in optimizer.param_groups[0]["params"]:
        assert set(p.detach().unique().tolist()) <= {-1.0, 1.0}  # binary weights stay binary
    assert torch.isfinite(nn.functional.cross_entropy(model(x), y))


@pytest.mark.parametrize("name", ["tiny_mlp", "resnet18"])
def test_unsupported_model_is_refused_naming_the_supported_ones(name):
    with pytest.raises(ValueError, match=rf"'{name}' does not support binary.*vgg9") as info:
        models.create(name, activations="binary")
    assert "\n" not in str(info.value)
    models.create(name, width=0.125, activations="float")  # float stays available


def test_unknown_activations_value_is_refused():
    with pytest.raises(ValueError, match=r"unknown activations 'binari' \(did you mean 'binary'"):
        models.create("tiny_cnn", activations="binari")


def test_onnx_graph_maps_zero_to_plus_one(tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from qtrain.export.onnx import export_onnx

    model = build("tiny_cnn", "binary").eval()
    with torch.no_grad():  # non-trivial BN statistics, so the graph is not all constants
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
    x = torch.randn(3, 3, 8, 8)

    def run(module: nn.Module, inputs: torch.Tensor, shape) -> torch.Tensor:
        path = tmp_path / f"{type(module).__name__}.onnx"
        export_onnx(module, path, shape)
        session = ort.InferenceSession(str(path))
        name = session.get_inputs()[0].name
        return torch.from_numpy(session.run(None, {name: inputs.numpy()})[0])

    torch.testing.assert_close(run(model, x, (3, 8, 8)), model(x), rtol=1e-4, atol=1e-4)
    # the sign alone: zeros (and ±values) come out as torch computes them, 0 → +1
    probe = torch.tensor([[[[0.0, -0.0, 1e-30, -1e-30], [2.0, -2.0, 0.5, -0.5]]]])
    got = run(BinaryActivation(), probe, (1, 2, 4))
    assert torch.equal(got, torch.tensor([[[[1.0, 1.0, 1.0, -1.0], [1.0, -1.0, 1.0, -1.0]]]]))
