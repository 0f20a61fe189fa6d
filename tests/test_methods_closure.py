"""`step(closure)`: the closure runs once, at w_b, with gradients, and the step is unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from qtrain.methods import METHODS, create
from qtrain.quant import binary

QUANTIZED_METHODS = [m for m in METHODS if not m.startswith("fp")]


def small_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 3, 6, 6, generator=g), torch.randint(0, 4, (16,), generator=g)


def options(name: str) -> dict:
    # Bop's defaults flip almost nothing in three steps; a large γ and a tiny τ make it flip
    return {"bop_gamma": 0.5, "bop_tau": 1e-12} if name.startswith("bop") else {}


def run(name: str, use_closure: bool, steps: int = 3):
    """(model, optimizer, losses) after `steps` steps with or without a closure."""
    model = small_net()
    opt = create(name, model, lr=0.05, seed=3, **options(name))
    losses = []
    for i in range(steps):
        x, y = batch(i)

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        if use_closure:
            losses.append(opt.step(closure))
        else:
            losses.append(closure())
            assert opt.step() is None
    return model, opt, torch.stack([loss.detach() for loss in losses])


@pytest.mark.parametrize("name", [*QUANTIZED_METHODS, "fp-adam"])
def test_closure_step_equals_the_plain_step(name):
    with_closure, opt_c, losses_c = run(name, use_closure=True)
    plain, opt_p, losses_p = run(name, use_closure=False)
    assert torch.equal(losses_c, losses_p)
    for a, b in zip(with_closure.state_dict().values(), plain.state_dict().values()):
        assert torch.equal(a, b)
    saved_c, saved_p = opt_c.state_dict()["quantization"], opt_p.state_dict()["quantization"]
    for key in ("latent", "m", "v"):
        if saved_c[key] is not None:
            assert torch.equal(saved_c[key], saved_p[key])
    assert opt_c.mean_flip_rate() == opt_p.mean_flip_rate()


@pytest.mark.parametrize("name", ["bc-adam", "sr-sgd", "bop-adam"])
def test_the_closure_runs_once_with_gradients_at_the_quantized_weights(name):
    model = small_net()
    opt = create(name, model, lr=0.05, seed=1, **options(name))
    weight = model[0].weight
    x, y = batch(0)
    seen = []

    def closure():
        seen.append((weight.detach().clone(), torch.is_grad_enabled()))
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)  # first step: BC's w_r differs from w_b only after it
    opt.step(closure)
    assert len(seen) == 2
    for w, grad_enabled in seen:
        assert grad_enabled
        assert torch.equal(w.abs(), torch.ones_like(w) * binary().delta)
    latent = opt.latent_weights()
    if latent:  # BC: the closure saw w_b = Q(w_r), not the latent weights
        assert not torch.equal(seen[1][0], latent[0])
