"""The im2col weight gradient of small convolutions (qtrain.models.conv_grad).

Gᵀ·im2col(x) is the weight gradient of the convolution for every geometry (float64, against
autograd's), a model's convolutions take it only on a CPU with native bf16 (patched here), and
SmallOutputConv2d takes it exactly where its rule says (bf16 on the CPU, at most 64 output
positions per image, while training) and is nn.Conv2d everywhere else.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qtrain.base import cpu_isa
from qtrain.models import conv_grad
from qtrain.models.conv_grad import SmallOutputConv2d, im2col_weight_grads, weight_grad

GEOMETRIES = [  # kernel, stride, padding, dilation, input side
    ((3, 3), (1, 1), (1, 1), (1, 1), 7),
    ((3, 3), (2, 2), (1, 1), (1, 1), 8),
    ((1, 1), (1, 1), (0, 0), (1, 1), 5),
    ((3, 3), (1, 1), (2, 2), (2, 2), 6),
    ((3, 2), (2, 1), (1, 0), (1, 1), 9),
    ((5, 5), (1, 1), (0, 0), (1, 1), 5),  # one output position
]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("kernel, stride, padding, dilation, side", GEOMETRIES)
def test_the_im2col_product_is_the_weight_gradient(kernel, stride, padding, dilation, side,
                                                   channels_last):  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, side, side, generator=generator, dtype=torch.float64)
    weight = torch.randn(4, 5, *kernel, generator=generator, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight.requires_grad_()
    y = F.conv2d(x, weight, None, stride, padding, dilation)
    grad = torch.randn(y.shape, generator=generator, dtype=torch.float64)
    y.backward(grad)
    ours = weight_grad(grad, x, weight.shape, stride, padding, dilation)
    assert ours.shape == weight.shape
    torch.testing.assert_close(ours, weight.grad, rtol=1e-12, atol=1e-12)


def conv_pair(monkeypatch, native: bool, **options) -> tuple[nn.Conv2d, nn.Conv2d, list]:
    """(nn.Conv2d, the same after `im2col_weight_grads`, the calls of weight_grad), on a CPU
    with native bf16 or without (`cpu_isa.has_native_bf16` patched to `native`)."""
    monkeypatch.setattr(cpu_isa, "has_native_bf16", lambda: native)
    calls = []
    real = conv_grad.weight_grad

    def counted(*args):
        calls.append(args[1].shape)
        return real(*args)

    monkeypatch.setattr(conv_grad, "weight_grad", counted)
    torch.manual_seed(0)
    plain = nn.Conv2d(16, 8, 3, padding=1, bias=True, **options)
    small = im2col_weight_grads(copy.deepcopy(plain))
    for conv in (plain, small):
        conv.to(memory_format=torch.channels_last)
    return plain, small, calls


def run(conv, x, amp: bool):
    conv.zero_grad()
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", torch.bfloat16, enabled=amp):
        y = conv(x)
    y.float().square().sum().backward()
    return y, x.grad, conv.weight.grad, conv.bias.grad


def images(side: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4, 16, side, side, generator=generator)
    return x.contiguous(memory_format=torch.channels_last)


def test_small_bf16_outputs_with_native_bf16_take_the_im2col_path_with_the_same_values(
    monkeypatch,
):
    plain, small, calls = conv_pair(monkeypatch, native=True)
    x = images(8)  # 64 output positions: the largest the rule takes
    (y0, gx0, gw0, gb0), (y1, gx1, gw1, gb1) = run(plain, x, True), run(small, x, True)
    assert len(calls) == 1
    assert y1.dtype == torch.bfloat16 and torch.equal(y0, y1)  # the forward is F.conv2d's
    assert torch.equal(gx0, gx1)  # the input gradient is oneDNN's
    assert gw1.dtype == torch.float32 and gw1.shape == gw0.shape
    torch.testing.assert_close(gw1, gw0, rtol=2e-2, atol=1e-2 * gw0.abs().max().item())
    torch.testing.assert_close(gb1, gb0, rtol=2e-2, atol=1e-2 * gb0.abs().max().item())


def test_the_compiled_network_computes_the_eager_gradients(monkeypatch):
    """torch.compile traces the im2col path: the layout the compiler gives the padded input
    must not change which values the patches read (a first layer, whose input needs no
    gradient, read wrong values through `as_strided` once)."""
    try:
        torch.compile(lambda t: t * 2 + 1, fullgraph=True)(torch.ones(3))
    except Exception as error:  # inductor reports a missing toolchain in several ways
        pytest.skip(f"torch.compile does not work here: {type(error).__name__}: {error}")
    monkeypatch.setattr(cpu_isa, "has_native_bf16", lambda: True)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
    net = im2col_weight_grads(net.to(memory_format=torch.channels_last))
    x = torch.randn(4, 8, 6, 6).contiguous(memory_format=torch.channels_last)

    def weight_grads(model) -> list[torch.Tensor]:
        net.zero_grad()
        with torch.autocast("cpu", torch.bfloat16):
            model(x).float().square().sum().backward()
        return [net[0].weight.grad.clone(), net[2].weight.grad.clone()]

    torch._dynamo.reset()
    try:
        eager, compiled = weight_grads(net), weight_grads(torch.compile(net))
    finally:
        torch._dynamo.reset()
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-2, atol=1e-2 * a.abs().max().item())


@pytest.mark.parametrize("case", ["large output", "float32", "no native bf16", "no grad",
                                  "frozen"])  # fmt: skip
def test_elsewhere_a_small_output_conv_is_nn_conv2d_to_the_bit(monkeypatch, case):
    plain, small, calls = conv_pair(monkeypatch, native=case != "no native bf16")
    # without native bf16 nothing converts
    assert (type(small) is nn.Conv2d) == (case == "no native bf16")
    x, amp = images(9 if case == "large output" else 8), case != "float32"
    if case == "frozen":
        for conv in (plain, small):
            conv.weight.requires_grad_(False)
    if case == "no grad":
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
            assert torch.equal(plain(x), small(x))
    else:
        for a, b in zip(run(plain, x, amp), run(small, x, amp), strict=True):
            assert (a is None and b is None) or torch.equal(a, b)
    assert calls == []


def test_only_plain_convolutions_are_converted_and_the_state_dict_is_unchanged(monkeypatch):
    monkeypatch.setattr(cpu_isa, "has_native_bf16", lambda: True)

    class Custom(nn.Conv2d):
        pass

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, groups=2),
                          nn.Conv2d(4, 4, 3, padding="same"), Custom(4, 4, 1),
                          nn.Conv2d(4, 4, 3, padding_mode="reflect"), nn.Linear(4, 4))  # fmt: skip
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert im2col_weight_grads(model) is model
    assert [type(m) for m in model] == [SmallOutputConv2d, nn.Conv2d, nn.Conv2d, Custom,
                                        nn.Conv2d, nn.Linear]  # fmt: skip
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
