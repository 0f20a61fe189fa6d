"""Scaled grids: every weight on its scaled grid, absmean/he values, clip boxes, resume."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from qtrain.methods import SCALES, create
from qtrain.methods.scales import broadcastable, on_scaled_grid
from qtrain.quant import parse_grid, round_nearest


def small_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1, bias=False),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 4),
    )


def train_steps(model, opt, steps: int, first: int = 0) -> None:
    for i in range(first, first + steps):
        g = torch.Generator().manual_seed(i)
        x, y = torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def combinations():
    """Every valid method × scale × grid (bop only on the binary grid)."""
    for method in ["bc-adam", "bc-sgd", "sr-adam", "r-adamw", "bop-adam", "bop2-adam"]:
        latent = method.startswith("bc")
        for scale in SCALES if latent else ("none", "he"):
            for grid in ("binary",) if method.startswith("bop") else ("binary", "ternary", "2bit"):
                yield method, scale, grid


def lr_for(method: str) -> float:
    """Steps that move weights: R needs more than half a spacing, SR a good fraction of one."""
    mode = method.split("-")[0]
    return {"sr": 0.3, "r": 1.2}.get(mode, 0.05)


@pytest.mark.parametrize("method, scale, grid", list(combinations()))
def test_every_quantized_weight_is_on_its_scaled_grid_after_every_step(method, scale, grid):
    model = small_net()
    with torch.no_grad():  # latent weights spread over the levels, not all rounding to 0
        model[0].weight.mul_(5)
        model[3].weight.mul_(5)
    settings = {"bop_gamma": 0.3, "bop_tau": 1e-4} if method.startswith("bop") else {}
    opt = create(method, model, lr=lr_for(method), grid=grid, scale=scale, seed=3, **settings)
    g = parse_grid(grid)
    weights = [model[0].weight, model[3].weight]
    changed = 0
    for t in range(4):
        before = [w.detach().clone() for w in weights]
        train_steps(model, opt, 1, first=t)
        for w, s, old in zip(weights, opt.scales(), before, strict=True):
            assert on_scaled_grid(w.detach(), broadcastable(s, w), g), (method, scale, t)
            changed += int((w != old).sum())
    assert changed > 0  # the property was checked on weights that moved


@pytest.mark.parametrize("stochastic", [False, True])
def test_absmean_scales_are_the_mean_magnitude_of_each_channel(stochastic):
    model = small_net()
    opt = create("bc-adam", model, lr=0.02, scale="absmean", bc_stochastic=stochastic)
    for t in range(3):
        train_steps(model, opt, 1, first=t)
        for w_r, s, w in zip(
            opt.latent_weights(), opt.scales(), [model[0].weight, model[3].weight], strict=True
        ):
            assert s.shape == (w.shape[0],)
            torch.testing.assert_close(s, w_r.abs().mean(dim=(1, 2, 3)), rtol=0, atol=0)
            if not stochastic:  # XNOR-Net / BWN: w_b = α_c·sign(w_r)
                expected = s.view(-1, 1, 1, 1) * torch.where(w_r >= 0, 1.0, -1.0)
                assert torch.equal(w.detach(), expected)


def test_absmean_tensor_is_bitnets_ternary_rule():
    model = small_net()
    opt = create("bc-adam", model, lr=0.02, grid="ternary", scale="absmean-tensor")
    train_steps(model, opt, 2)
    for w_r, s, w in zip(
        opt.latent_weights(), opt.scales(), [model[0].weight, model[3].weight], strict=True
    ):
        assert s.dim() == 0 and s == w_r.abs().mean()
        expected = round_nearest(w_r / s, parse_grid("ternary")) * s
        assert torch.equal(w.detach(), expected)
        assert set(torch.unique(w.detach() / s).tolist()) <= {-1.0, 0.0, 1.0}


@pytest.mark.parametrize("method", ["bc-adam", "sr-adam", "bop-adam"])
def test_he_scale_is_root_two_over_fan_in_and_bounds_the_latent_weights(method):
    model = small_net()
    opt = create(method, model, lr=0.05, scale="he")
    train_steps(model, opt, 3)
    fan_ins = [3 * 9, 8 * 9]
    for s, fan_in, w in zip(opt.scales(), fan_ins, [model[0].weight, model[3].weight]):
        assert float(s) == pytest.approx(math.sqrt(2 / fan_in), rel=1e-6)
        assert torch.equal(w.detach().abs(), torch.full_like(w, float(s)))
    if method.startswith("bc"):
        for w_r, s in zip(opt.latent_weights(), opt.scales(), strict=True):
            assert float(w_r.abs().max()) <= float(s)  # BC's clip box is the scaled range


def test_absmean_latent_weights_keep_the_unscaled_clip_box():
    model = small_net()
    with torch.no_grad():
        model[0].weight.mul_(40)  # well outside ±1
    opt = create("bc-adam", model, lr=0.01, scale="absmean")
    assert all(float(w.abs().max()) <= 1.0 for w in opt.latent_weights())
    assert any(float(w.abs().max()) == 1.0 for w in opt.latent_weights())


@pytest.mark.parametrize(
    "method, scale",
    [
        ("bc-adam", "absmean"),
        ("bc-adam", "absmean-tensor"),
        ("bc-sgd", "he"),
        ("sr-adam", "he"),
        ("r-adam", "he"),
    ],
)
def test_save_and_restore_with_a_scale_continues_bit_identically(method, scale):
    model = small_net()
    opt = create(method, model, lr=0.05, grid="ternary", scale=scale, seed=9)
    train_steps(model, opt, 3)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    train_steps(model, opt, 3, first=3)
    restored_model = small_net(seed=4)
    restored = create(method, restored_model, lr=0.05, grid="ternary", scale=scale)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    restored_model.load_state_dict(saved["model"])
    restored.load_state_dict(saved["opt"])
    train_steps(restored_model, restored, 3, first=3)
    for a, b in zip(model.state_dict().values(), restored_model.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(opt.scales(), restored.scales(), strict=True):
        assert torch.equal(a, b)


def test_a_state_saved_with_another_scale_is_refused():
    saved = create("bc-adam", small_net(), lr=0.01, scale="absmean").state_dict()
    assert saved["quantization"]["scale"] == "absmean"
    with pytest.raises(ValueError, match="trained with scale 'absmean', not 'he'"):
        create("bc-adam", small_net(), lr=0.01, scale="he").load_state_dict(saved)


@pytest.mark.parametrize(
    "method, scale, message",
    [
        ("bc-adam", "absmen", "did you mean 'absmean'"),
        ("sr-adam", "absmean", "use one of none, he"),
        ("r-sgd", "absmean-tensor", "use one of none, he"),
        ("fp-adam", "he", "use scale='none'"),
    ],
)
def test_scales_a_method_cannot_use_are_refused(method, scale, message):
    with pytest.raises(ValueError, match=message):
        create(method, small_net(), lr=0.01, scale=scale)
