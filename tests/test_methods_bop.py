"""Bop and Bop2: the flip rule against hand-written references, no float copy, exact resume."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from qtrain.methods import create, quantized_parameter_names
from qtrain.methods.bop import BOP2_DEFAULTS, BOP2_EPS, BOP_DEFAULTS


def small_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def gradients(model: nn.Module, i: int) -> None:
    g = torch.Generator().manual_seed(i)
    x, y = torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()


def train_steps(model, opt, steps: int, first: int = 0) -> None:
    for i in range(first, first + steps):
        opt.zero_grad()
        gradients(model, i)
        opt.step()


QUANTIZED = ["0.weight", "3.weight"]


@pytest.mark.parametrize("method", ["bop-adam", "bop2-adam"])
def test_flips_exactly_the_weights_the_rule_names_and_adam_trains_the_rest(method):
    """Reference: m ← m + γ(g − m) (v ← v + σ(g² − v)); flip where sign(w)·m(/(√v+ε)) > τ."""
    gamma, tau, sigma = 0.3, (1e-3 if method == "bop-adam" else 0.5), 0.2
    extra = {"bop_sigma": sigma} if method == "bop2-adam" else {}
    model = small_net()
    opt = create(method, model, lr=0.01, bop_gamma=gamma, bop_tau=tau, seed=2, **extra)
    reference = small_net()
    reference.load_state_dict(model.state_dict())
    params = dict(reference.named_parameters())
    full = [p for n, p in params.items() if n not in QUANTIZED]
    adam = torch.optim.Adam(full, lr=0.01)
    m = {n: torch.zeros_like(params[n]) for n in QUANTIZED}
    v = {n: torch.zeros_like(params[n]) for n in QUANTIZED}
    total_flips = 0
    for t in range(4):
        gradients(reference, t)
        with torch.no_grad():
            flipped = 0
            for n in QUANTIZED:
                w, g = params[n], params[n].grad
                m[n] = m[n] + gamma * (g - m[n])
                signal = m[n]
                if method == "bop2-adam":
                    v[n] = v[n] + sigma * (g * g - v[n])
                    signal = m[n] / (v[n].sqrt() + BOP2_EPS)
                flip = torch.sign(w) * signal > tau
                flipped += int(flip.sum())
                w.copy_(torch.where(flip, -w, w))
        adam.step()
        train_steps(model, opt, 1, first=t)
        assert opt.flip_rate() == pytest.approx(flipped / opt.num_quantized)
        total_flips += flipped
        for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
            assert torch.equal(p, q), (name, t)
    assert 0 < total_flips < 4 * opt.num_quantized  # the rule both flips and keeps weights


@pytest.mark.parametrize("method", ["bop-adam", "bop2-adam"])
def test_keeps_no_float_copy_only_m_and_v(method):
    model = small_net()
    opt = create(method, model, lr=0.01)
    train_steps(model, opt, 2)
    d = opt.num_quantized
    quantized = {id(p) for p in (model[0].weight, model[3].weight)}
    assert not any(id(p) in quantized for p in opt.base.state)  # Adam never saw them

    def sized(tree) -> list[str]:
        if torch.is_tensor(tree):
            return ["tensor"] if tree.numel() == d else []
        if isinstance(tree, dict):
            return [f"{k}/{x}" for k, val in tree.items() for x in sized(val)]
        if isinstance(tree, (list, tuple)):
            return [x for val in tree for x in sized(val)]
        return []

    expected = ["quantization/m/tensor"]
    if method == "bop2-adam":
        expected.append("quantization/v/tensor")
    assert sized(opt.state_dict()) == expected
    assert sorted(opt._buffers) == sorted(k.split("/")[1] for k in expected)
    assert opt.latent_weights() == [] and opt.latent_gap() is None


@pytest.mark.parametrize(
    "method, settings",
    [
        ("bop-adam", {"bop_tau": 1e9}),
        ("bop-adam", {"bop_gamma": 1e-30}),
        ("bop2-adam", {"bop_tau": 1e9}),
    ],
)
def test_settings_that_never_trigger_leave_the_weights_unchanged(method, settings):
    model = small_net()
    opt = create(method, model, lr=0.01, **settings)
    before = [model[0].weight.detach().clone(), model[3].weight.detach().clone()]
    train_steps(model, opt, 5)
    assert torch.equal(before[0], model[0].weight) and torch.equal(before[1], model[3].weight)
    assert opt.mean_flip_rate() == 0.0


def test_defaults_live_in_the_quantized_group_and_edits_take_effect():
    model = small_net()
    opt = create("bop-adam", model, lr=0.01, bop_gamma=0.5)
    group = opt.param_groups[0]
    assert group["name"] == "quantized"
    assert (group["gamma"], group["tau"]) == (0.5, BOP_DEFAULTS["tau"])
    bop2 = create("bop2-adam", small_net(), lr=0.01).param_groups[0]
    assert {k: bop2[k] for k in BOP2_DEFAULTS} == BOP2_DEFAULTS
    group["tau"] = 1e9  # a schedule edits the group between steps
    before = model[0].weight.detach().clone()
    train_steps(model, opt, 3)
    assert torch.equal(before, model[0].weight)
    group["tau"] = 0.0
    train_steps(model, opt, 1, first=3)
    assert opt.flip_rate() > 0


@pytest.mark.parametrize("method", ["bop-adam", "bop2-adam"])
@pytest.mark.parametrize("scale", ["none", "he"])
def test_save_and_restore_continues_bit_identically(method, scale):
    model = small_net()
    opt = create(method, model, lr=0.01, bop_gamma=0.2, bop_tau=1e-4, scale=scale, seed=7)
    train_steps(model, opt, 3)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    train_steps(model, opt, 3, first=3)
    restored_model = small_net(seed=5)
    restored = create(method, restored_model, lr=0.01, scale=scale, seed=0)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    restored_model.load_state_dict(saved["model"])
    restored.load_state_dict(saved["opt"])
    assert restored.param_groups[0]["gamma"] == 0.2
    train_steps(restored_model, restored, 3, first=3)
    for a, b in zip(model.state_dict().values(), restored_model.state_dict().values()):
        assert torch.equal(a, b)
    for name in opt._buffers:
        assert torch.equal(opt._buffers[name], restored._buffers[name])
    assert opt.mean_flip_rate() == restored.mean_flip_rate()


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda m: create("bop-adam", m, lr=0.01, grid="ternary"), "needs the binary grid"),
        (lambda m: create("bop-adam", m, lr=0.01, bop_sigma=1e-3), "only applies to bop2"),
        (lambda m: create("sr-adam", m, lr=0.01, bop_gamma=1e-3), "only applies to bop-adam"),
        (lambda m: create("bop-adam", m, lr=0.01, bop_tau=-1.0), "bop_tau must be"),
        (lambda m: create("bop2-adam", m, lr=0.01, scale="absmean"), "use one of none, he"),
    ],
)
def test_bad_settings_are_refused_before_the_model_is_touched(build, message):
    model = small_net()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=message):
        build(model)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_policy_all_flips_every_parameter_on_the_binary_grid():
    model = small_net()
    opt = create("bop-adam", model, lr=0.01, policy="all", bop_gamma=0.5, bop_tau=1e-6)
    train_steps(model, opt, 2)
    assert len(quantized_parameter_names(model, "all")) == len(list(model.parameters()))
    assert all(set(p.detach().abs().unique().tolist()) == {1.0} for p in model.parameters())
