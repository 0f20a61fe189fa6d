"""Bop and Bop2: latent-free sign flips of binary weights (docs/paper.md §6).

Bop (Helwegen et al. 2019, "Latent weights do not exist"; larq's `Bop`) keeps no real-valued
copy of a binary weight w ∈ {−s, +s}, only an exponential moving average m of its gradient g:

    m ← m + γ(g − m)                       (m starts at 0)
    w ← −w   where sign(w)·m > τ           (m agrees in sign with w and |m| > τ)

A gradient of the weight's own sign says the loss falls if w shrinks, and on the binary grid
shrinking means flipping. γ plays the part of a learning rate (the EMA's time constant is 1/γ
steps) and τ filters noise. Using sign(w) rather than w keeps τ in gradient units on any scaled
binary grid; with s = 1 it is larq's w·m > τ exactly.

Bop2 (Suarez-Ramirez et al. 2021, "A Bop and Beyond", their Bop2ndOrder) normalises m by an EMA
of the squared gradient, as Adam does:

    v ← v + σ(g² − v)                      (v starts at 0; no bias correction)
    w ← −w   where sign(w)·m/(√v + ε) > τ,  ε = 1e-10

Defaults: Bop γ = 1e-4, τ = 1e-8 (larq); Bop2 γ = 1e-7, σ = 1e-3, τ = 1e-5 (the CIFAR-10
preset of the authors' code). A missing gradient counts as g = 0.
"""

from __future__ import annotations

import torch

from qtrain.base.errors import UserError

BOP_DEFAULTS = {"gamma": 1e-4, "tau": 1e-8}
BOP2_DEFAULTS = {"gamma": 1e-7, "tau": 1e-5, "sigma": 1e-3}
BOP2_EPS = 1e-10


def bop_flips_(
    w: torch.Tensor, g: torch.Tensor, m: torch.Tensor, gamma: float, tau: float
) -> torch.Tensor:
    """Update m in place (m ← m + γ(g − m)) and return the mask sign(w)·m > τ."""
    m.add_(g.sub(m).mul_(gamma))
    return torch.sign(w).mul_(m) > tau


def bop2_flips_(
    w: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    gamma: float,
    sigma: float,
    tau: float,
) -> torch.Tensor:
    """Update m and v in place and return the mask sign(w)·m/(√v + ε) > τ."""
    m.add_(g.sub(m).mul_(gamma))
    v.add_(g.square().sub_(v).mul_(sigma))
    return torch.sign(w).mul_(m).div_(v.sqrt().add_(BOP2_EPS)) > tau


def flip_group_index(param_groups: list[dict], quantized: list, mode: str) -> int:
    """Index of the one param group that holds every quantized parameter and Bop's keys."""
    ids = {id(p) for p in quantized}
    needed = ("gamma", "tau", "sigma") if mode == "bop2" else ("gamma", "tau")
    for i, group in enumerate(param_groups):
        if ids <= {id(p) for p in group["params"]}:
            missing = [k for k in needed if k not in group]
            if missing:
                raise UserError(
                    f"{mode} reads {', '.join(needed)} from the quantized parameter group, "
                    f"which lacks {', '.join(missing)}; build it with qtrain.methods.create "
                    "or add those keys to the group"
                )
            return i
    raise UserError(
        f"{mode} needs all quantized parameters in one parameter group; put them in one group "
        "of the base optimizer"
    )
