"""Model zoo: registry behaviour, the paper's parameter counts, forward + backward for all."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qtrain import models
from qtrain.models.registry import register_model

# name, num_classes, conv params, linear params (weights + biases), paper conv / linear in
# millions as printed (docs/paper.md §3). Convolutions carry no bias (BatchNorm follows each one);
# counting conv biases would give ResNet-56 0.850 M, one printed unit away from the paper's
# 0.84, so the paper's figures are read without them. Linear biases are counted.
PAPER_COUNTS = [
    ("vgg9", 10, 1_734_336, 1_051_402, "1.7", "1.1"),
    ("vgg_bc", 10, 4_574_592, 9_449_482, "4.6", "9.4"),
    ("resnet56", 10, 848_304, 650, "0.84", "0.0006"),
    ("wrn56_2", 10, 3_387_312, 1_290, "3.4", "0.001"),
    ("resnet18", 1000, 11_166_912, 513_000, "11.2", "0.5"),
]

# Small widths keep the forward/backward checks of the big networks fast on a CPU.
TEST_WIDTH = {"vgg_bc": 0.125, "vgg9": 0.25, "resnet56": 0.25, "wrn56_2": 0.125, "resnet18": 0.125}


def count(model: nn.Module, kind: type) -> int:
    return sum(p.numel() for m in model.modules() if isinstance(m, kind) for p in m.parameters())


def printed_unit(figure: str) -> float:
    """One unit in the last digit the paper prints, e.g. "0.84" → 0.01."""
    decimals = len(figure.split(".")[1]) if "." in figure else 0
    return 10.0**-decimals


@pytest.mark.parametrize("name,classes,conv,linear,paper_conv,paper_linear", PAPER_COUNTS)
def test_parameter_counts_match_paper(name, classes, conv, linear, paper_conv, paper_linear):
    model = models.create(name, num_classes=classes)
    assert count(model, nn.Conv2d) == conv
    assert count(model, nn.Linear) == linear
    # The paper rounds inconsistently (VGG-9 1.051 → 1.1, ResNet-56 0.848 → 0.84), so a count
    # agrees when it lies within one unit of the last printed digit.
    for got, figure in ((conv, paper_conv), (linear, paper_linear)):
        assert abs(got / 1e6 - float(figure)) < printed_unit(figure), (name, got, figure)
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))


def test_every_paper_model_is_registered():
    assert {row[0] for row in PAPER_COUNTS} <= set(models.list_models())
    assert {"tiny_cnn", "tiny_mlp"} <= set(models.list_models())


def input_for(name: str, batch: int = 4) -> torch.Tensor:
    side = 32 if name.startswith("vgg") else 16  # the VGGs need 32×32, the rest take any size
    return torch.randn(batch, 3, side, side)


@pytest.mark.parametrize("name", models.list_models("image"))
def test_forward_backward_reaches_every_parameter(name):
    model = models.create(name, num_classes=7, width=TEST_WIDTH.get(name, 1.0))
    x = input_for(name)
    logits = model(x)
    assert logits.shape == (4, 7)
    nn.functional.cross_entropy(logits, torch.arange(4) % 7).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}.{pname} received no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}.{pname} has a non-finite gradient"


@pytest.mark.parametrize("name", models.list_models("image"))
def test_channels_last_matches_contiguous(name):
    model = models.create(name, num_classes=5, width=TEST_WIDTH.get(name, 1.0)).eval()
    x = input_for(name)
    expected = model(x)
    model = model.to(memory_format=torch.channels_last)
    got = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", models.list_models("image"))
def test_every_conv_and_hidden_linear_is_followed_by_batchnorm_relu(name):
    model = models.create(name, width=TEST_WIDTH.get(name, 1.0))
    leaves = [m for m in model.modules() if not list(m.children())]  # registration order
    linears = [i for i, m in enumerate(leaves) if isinstance(m, nn.Linear)]
    for i, m in enumerate(leaves):
        is_hidden_linear = isinstance(m, nn.Linear) and i != linears[-1]
        if isinstance(m, nn.Conv2d) or is_hidden_linear:
            assert isinstance(leaves[i + 1], (nn.BatchNorm1d, nn.BatchNorm2d)), (name, i, m)


def test_tiny_models_accept_digits_and_cifar_shapes():
    for name in ("tiny_cnn", "tiny_mlp"):
        digits = models.create(name, num_classes=10, in_channels=1)
        assert digits(torch.randn(3, 1, 8, 8)).shape == (3, 10)
        cifar = models.create(name, num_classes=100)
        assert cifar(torch.randn(3, 3, 32, 32)).shape == (3, 100)


def test_width_scales_every_layer():
    full = models.create("resnet56")
    half = models.create("resnet56", width=0.5)
    full_convs = [m.out_channels for m in full.modules() if isinstance(m, nn.Conv2d)]
    half_convs = [m.out_channels for m in half.modules() if isinstance(m, nn.Conv2d)]
    assert half_convs == [c // 2 for c in full_convs]
    vgg = models.create("vgg_bc", width=0.25)
    assert [m.out_features for m in vgg.modules() if isinstance(m, nn.Linear)] == [256, 256, 10]
    # At a small width every layer keeps at least one channel.
    assert models.create("tiny_cnn", width=1e-3)(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_unknown_name_suggests_the_closest():
    with pytest.raises(ValueError, match=r"did you mean 'resnet56'\?.*vgg9"):
        models.create("resnet65")
    with pytest.raises(ValueError, match="unknown model"):
        models.model_info("nope")


@pytest.mark.parametrize("width", [0, -1.0, float("nan"), "1"])
def test_bad_width_is_rejected(width):
    with pytest.raises(ValueError, match="width"):
        models.create("tiny_cnn", width=width)


def test_bad_class_or_channel_count_is_rejected():
    with pytest.raises(ValueError, match="num_classes"):
        models.create("tiny_cnn", num_classes=0)
    with pytest.raises(ValueError, match="in_channels"):
        models.create("tiny_cnn", in_channels=2.5)


def test_model_info_describes_each_model():
    for name in models.list_models("image"):
        info = models.model_info(name)
        assert info.name == name and info.description and "\n" not in info.description
        assert info.input_size in (8, 32, 224)
    assert models.model_info("resnet18").input_size == 224
    assert models.model_info("resnet18").dataset == "imagenet"
    assert models.model_info("vgg9").dataset == "cifar10"


def test_register_model_rejects_a_duplicate_name():
    with pytest.raises(ValueError, match="already registered"):
        register_model("vgg9")(lambda num_classes, width, in_channels: nn.Identity())


def test_same_seed_gives_same_initialisation():
    torch.manual_seed(3)
    a = models.create("tiny_cnn")
    torch.manual_seed(3)
    b = models.create("tiny_cnn")
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
