"""Bop in the theory lab: its update by hand, its limits (τ → ∞, γ = 1), its exact chain."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qtrain.quant import binary
from qtrain.theory import bop, convex, markov
from qtrain.theory.problems import least_squares


def test_bop_step_on_a_hand_example():
    w = torch.tensor([[0.5, -0.5, 0.0, 1.0]])
    m = torch.tensor([[0.5, -0.5, 0.0, 0.25]])
    g = torch.tensor([[1.0, 1.0, -0.125, -1.0]])
    # γ = 0.5: m' = m + (g − m)/2 = (0.75, 0.25, −0.0625, −0.375); τ = 0.3 lets only |m'| > 0.3
    # move, one level of 0.5 against the sign of m': 0.5 → 0 and 1 → 1.5
    w2, m2 = bop.bop_step(w, m, g, 0.5, gamma=0.5, tau=0.3)
    assert torch.equal(m2, torch.tensor([[0.75, 0.25, -0.0625, -0.375]]))
    assert torch.equal(w2, torch.tensor([[0.0, -0.5, 0.0, 1.5]]))
    # the same step on the bounded grid [−0.5, 1]: 1 → 1.5 would leave it, so 1 stays
    w3, _ = bop.bop_step(w, m, g, 0.5, gamma=0.5, tau=0.3, lo=-0.5, hi=1.0)
    assert torch.equal(w3, torch.tensor([[0.0, -0.5, 0.0, 1.0]]))


def test_on_binary_weights_the_rule_is_bops_flip():
    """{−1, +1} has spacing 2: moving against sign(m) is w ← −w exactly when w·m > τ."""
    g_ = torch.Generator().manual_seed(4)
    grid = binary()
    w = torch.where(torch.rand(5000, generator=g_) < 0.5, -1.0, 1.0)
    m = torch.randn(5000, generator=g_) * 1e-3
    g = torch.randn(5000, generator=g_)
    gamma, tau = 1e-2, 5e-3
    ours, m2 = bop.bop_step(w, m, g, grid.spacing, gamma, tau, grid.lo, grid.hi)
    larq = torch.where(w * (m + gamma * (g - m)) > tau, -w, w)
    assert torch.equal(ours, larq)
    assert 0 < (ours != w).sum() < len(w)  # some flip, some do not


def test_with_tau_infinite_bop_never_moves():
    p = least_squares(d=4, seed=1)
    (trace,) = convex.run_method(p, "bop", (0.1,), None, 64, 8, bop=(0.5, math.inf))
    at_zero = p.suboptimality(torch.zeros(1, 4, dtype=torch.float64)).item()
    assert trace.avg_gap == pytest.approx([at_zero] * len(trace.T), rel=1e-12)
    assert trace.last_gap == pytest.approx([at_zero] * len(trace.T), rel=1e-12)
    assert pytest.approx(p.w_star.norm().item()) == trace.D


def test_with_gamma_one_and_tau_zero_bop_is_sign_descent_on_the_lattice():
    p = least_squares(d=3, seed=2)
    delta, steps, seeds = 0.25, 40, 6
    (trace,) = convex.run_method(p, "bop", (delta,), None, steps, seeds, seed=5, bop=(1.0, 0.0))
    batches = torch.Generator().manual_seed(5)  # the experiment's minibatch stream
    w = torch.zeros(seeds, 3, dtype=torch.float64)
    total = torch.zeros_like(w)
    for _ in range(steps):
        total += w
        w = w - delta * torch.sign(p.stochastic_gradient(w, batches))
    assert trace.last_gap[-1] == pytest.approx(p.suboptimality(w).mean().item(), rel=1e-12)
    average = p.suboptimality(total / steps).mean().item()
    assert trace.avg_gap[-1] == pytest.approx(average, rel=1e-12)
    assert trace.gamma == 1.0 and trace.tau == 0.0


def test_bop_stays_on_the_lattice():
    p = least_squares(d=4, seed=0)
    w = torch.zeros(3, 4, dtype=torch.float64)
    m = torch.zeros_like(w)
    scale = torch.tensor([[0.05], [0.1], [0.3]], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        w, m = bop.bop_step(w, m, p.stochastic_gradient(w, g), scale, 0.1, 0.0)
        w = convex.lattice_round(w, scale, False)
    codes = w / scale
    assert torch.allclose(codes, codes.round(), atol=1e-9) and (w != 0).any()


def test_exact_sign_chain_matches_one_simulated_step_from_every_state():
    problem = markov.demo_problems()["1d"]
    P = bop.sign_chain(problem, tau=0.0)
    assert np.allclose(P.sum(1), 1.0) and (P >= 0).all()
    levels = torch.as_tensor(problem.levels())
    n, chains = len(levels), 4000
    start = levels.repeat_interleave(chains)[:, None]
    w, _ = bop.simulate(problem, 1.0, 0.0, start, 1, torch.Generator().manual_seed(3))
    codes = problem.grid.to_codes(w[:, 0]).view(n, chains)
    empirical = np.stack([np.bincount(row.numpy(), minlength=n) for row in codes]) / chains
    se = np.sqrt(P * (1 - P) / chains)
    assert (np.abs(empirical - P) <= 5 * se + 1e-12).all()


def test_simulated_bop_stays_on_the_bounded_grid_and_the_comparison_is_complete():
    problem = markov.demo_problems()["2d"]
    result = bop.compare_with_sr(problem, (1.0, 0.1), 0.0, chains=64, steps=30, seed=1)
    assert [s["gamma"] for s in result["simulated"]] == [1.0, 0.1]
    assert "sign_exact" not in result and 0 <= result["sr_limit"]["global"] <= 1
    g = torch.Generator().manual_seed(2)
    start = torch.as_tensor(problem.states())[torch.randint(256, (64,), generator=g)]
    w, m = bop.simulate(problem, 0.1, 0.0, start, 30, g)
    assert problem.grid.contains(w)
    assert m.abs().max() > 0
