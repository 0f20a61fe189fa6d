"""Convex theory lab: problems, bounds, and the measured error floors (Theorems 1–3)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qtrain.quant import lattice, round_nearest, round_stochastic
from qtrain.theory import bounds
from qtrain.theory.convex import ConvexConfig, lattice_round, run_experiment, run_method, step_rule
from qtrain.theory.problems import least_squares, logistic


@pytest.fixture(scope="module")
def quick() -> dict:
    """A small run of the whole experiment (both problems, two d, two Δ)."""
    cfg = ConvexConfig(dims=(4, 16), deltas=(0.05, 0.2), steps=1024, seeds=48, bop=((1.0, 0.0),))
    return run_experiment(cfg)


def _get(result: dict, **match) -> dict:
    (record,) = [r for r in result["records"] if all(r[k] == v for k, v in match.items())]
    return record


def _eighth(record: dict) -> int:
    """Index of the checkpoint nearest T/8."""
    T = np.array(record["T"])
    return int(np.abs(T - T[-1] / 8).argmin())


def test_lattice_round_is_the_library_rounding_bit_for_bit():
    deltas, rows = (0.03, 0.1, 0.7), 5
    w = torch.randn(
        len(deltas) * rows, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    scale = torch.tensor(deltas, dtype=torch.float64).repeat_interleave(rows)[:, None]
    ours = lattice_round(w, scale, True, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)  # consumed block by block, as one call would
    blocks = w.split(rows)
    library = torch.cat([round_stochastic(b, lattice(d), g) for b, d in zip(blocks, deltas)])
    assert torch.equal(ours, library)
    nearest = torch.cat([round_nearest(b, lattice(d)) for b, d in zip(blocks, deltas)])
    assert torch.equal(lattice_round(w, scale, False), nearest)


def test_least_squares_gradient_optimum_and_gradient_bound():
    p = least_squares(d=5, seed=3)
    g = torch.Generator().manual_seed(0)
    assert torch.allclose(p.H @ p.w_star, p.z.mean(0), atol=1e-12)  # ∇F(w*) = 0
    # at distance D along the top eigenvector, E‖∇f̃‖² reaches its sup L²D² + v/B
    top = torch.linalg.eigh(p.H).eigenvectors[:, -1]
    D = 2.0
    w = (p.w_star + D * top).expand(200_000, -1)
    grads = p.stochastic_gradient(w, g)
    assert torch.allclose(grads.mean(0), p.H @ (w[0] - p.w_star), atol=0.02)  # unbiased
    second = (grads**2).sum(1).mean().item()
    assert second == pytest.approx(p.gradient_bound(D) ** 2, rel=0.01)
    # F(w) − F* = ½ eᵀHe is the finite sum's excess loss: compare with its directional growth
    e = torch.randn(3, 5, dtype=torch.float64, generator=g)
    assert torch.allclose(p.suboptimality(p.w_star + e), 0.5 * ((e @ p.H) * e).sum(1))


def test_logistic_optimum_and_constants_are_valid():
    p = logistic(d=4, n=128, seed=2)
    w = p.w_star.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(p.loss(w[None])[0], w)
    assert grad.norm() < 1e-10
    g = torch.Generator().manual_seed(0)
    hess = torch.func.hessian(lambda v: p.loss(v[None])[0])
    for _ in range(20):  # Hessian-Lipschitz: ‖∇²F(u) − ∇²F(v)‖ ≤ L₂‖u − v‖
        u, v = (p.w_star + torch.randn(4, dtype=torch.float64, generator=g) for _ in range(2))
        gap = torch.linalg.matrix_norm(hess(u) - hess(v), ord=2)
        assert gap <= p.L2 * (u - v).norm()
        assert torch.linalg.eigvalsh(hess(u)).min() >= p.mu - 1e-12  # μ-strong convexity
    D = 3.0
    directions = torch.randn(64, 4, dtype=torch.float64, generator=g)
    points = p.w_star + D * directions / directions.norm(dim=1, keepdim=True)
    grads = p.stochastic_gradient(points.repeat(500, 1), g).view(500, 64, 4)
    assert (grads**2).sum(-1).mean(0).max() <= p.gradient_bound(D) ** 2


def test_bounds_reduce_to_their_parts():
    T = np.array([1, 10, 1000])
    assert np.allclose(
        bounds.theorem1(T, 2.0, 0.5, 9, 0.0), bounds.strongly_convex_rate(T, 2.0, 0.5)
    )
    assert bounds.sr_floor(16, 0.1, 3.0) == pytest.approx(0.6)
    assert np.allclose(
        bounds.theorem3(T, 2.0, 0.5, 5.0, 0.0, 9, 0.3), bounds.theorem1(T, 2.0, 0.5, 9, 0)
    )
    # S_T = Σ c/√t lies between c(2√(T+1) − 2) and 2c√T
    total = bounds.step_sum(T, 1.5)
    assert np.all(total <= 2 * 1.5 * np.sqrt(T))
    assert np.all(total >= 1.5 * (2 * np.sqrt(T + 1) - 2))


def test_measured_suboptimality_never_exceeds_the_bounds(quick):
    checked = 0
    for r in quick["records"]:
        if r["bound"] is None:
            continue
        gaps, limit = np.array(r["avg_gap"]), np.array(r["bound"])
        assert np.all(gaps <= limit), (r["problem"], r["d"], r["method"], r["delta"], r["schedule"])
        checked += 1
    assert checked == 2 * 2 * (1 + 2 * 2 + 1 + 2)  # problems · d · (FP, SR, BC; FP, SR per rule)


def test_sr_floor_grows_with_delta_and_d_and_does_not_decay(quick):
    """SR's floor = its excess E[F(w̄_T)] − E[F(w̄_T^FP)] over full precision at the same T."""
    for problem in ("least_squares", "logistic"):
        floor = {}
        for d in (4, 16):
            fp = _get(quick, problem=problem, d=d, method="fp", schedule="strongly_convex")
            eighth = _eighth(fp)
            assert fp["avg_gap"][-1] < 0.2 * fp["avg_gap"][eighth]  # FP keeps converging
            for delta in (0.05, 0.2):
                sr = _get(
                    quick,
                    problem=problem,
                    d=d,
                    method="sr",
                    delta=delta,
                    schedule="strongly_convex",
                )
                excess = np.array(sr["avg_gap"]) - np.array(fp["avg_gap"])
                assert excess[-1] > 3 * sr["avg_sem"][-1]
                assert excess[-1] > 0.6 * excess[eighth]  # the floor does not decay with T
                floor[d, delta] = excess[-1]
            assert floor[d, 0.2] > 2.5 * floor[d, 0.05]  # 4× the spacing
        for delta in (0.05, 0.2):
            assert floor[16, delta] > 2 * floor[4, delta]  # 4× the weights: at least √4


def test_bc_floor_on_a_quadratic_is_far_below_sr():
    p = least_squares(d=4, seed=0)
    alpha = step_rule("strongly_convex", p.mu, 1 / p.mu)
    fp, sr, bc = (run_method(p, m, (0.2,), alpha, 4096, 32)[0] for m in ("fp", "sr", "bc"))
    assert bc.avg_gap[-1] < 0.05 * sr.avg_gap[-1]
    assert bc.avg_gap[-1] < 2 * fp.avg_gap[-1]  # BC tracks full precision


def test_r_stalls(quick):
    for problem in ("least_squares", "logistic"):
        for d in (4, 16):
            at = {"problem": problem, "d": d, "schedule": "strongly_convex"}
            r = _get(quick, method="r", delta=0.2, **at)
            sr = _get(quick, method="sr", delta=0.2, **at)
            fp = _get(quick, method="fp", **at)
            assert r["avg_gap"][-1] > sr["avg_gap"][-1]
            assert r["avg_gap"][-1] > 10 * fp["avg_gap"][-1]
            if problem == "least_squares":  # no progress at all in the last 7/8 of the steps
                assert r["avg_gap"][-1] > 0.9 * r["avg_gap"][_eighth(r)]


def test_sr_last_iterate_floor_is_the_same_for_both_step_rules():
    """On the quadratic the deployed weights w_T sit on SR's stationary floor whatever α_t does."""
    p = least_squares(d=4, seed=0)
    last = []
    for schedule in ("strongly_convex", "convex"):
        (trace,) = run_method(p, "sr", (0.2,), step_rule(schedule, p.mu, 1 / p.mu), 2048, 64)
        last.append((trace.last_gap[-1], trace.last_sem[-1]))
    (a, sa), (b, sb) = last
    assert abs(a - b) < 4 * math.hypot(sa, sb)
    assert min(a, b) > 0.1
