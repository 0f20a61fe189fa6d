"""SR as a Markov chain: exact transitions, stationary law, small-α limit, mixing (Thms 5–6)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qtrain.quant import kbit
from qtrain.theory.markov import (
    ChainProblem,
    concentration,
    limit_generator,
    max_skip_free_alpha,
    mixing_time,
    sample_states,
    simulate,
    spectral_gap,
    state_index,
    stationary_distribution,
    transition_matrix,
    tv,
)

# 8 levels on [−1.75, 1.75] (spacing 0.5); the noise reaches every level from every level
ONE = ChainProblem(grid=kbit(3, 0.25), tilt=(0.15,), noise=3.0)
# 4 × 4 levels on [−1.5, 1.5] (spacing 1), three-valued noise
TWO = ChainProblem(
    grid=kbit(2, 0.5),
    tilt=(0.15, -0.1),
    noise=2.5,
    values=(-1.0, 0.0, 1.0),
    probs=(0.25, 0.5, 0.25),
    coupling=0.3,
)


@pytest.mark.parametrize("problem", [ONE, TWO], ids=["1d", "2d"])
@pytest.mark.parametrize("alpha", [1.0, 0.2, 0.01])
def test_transition_rows_are_distributions(problem, alpha):
    P = transition_matrix(problem, alpha)
    assert P.shape == (problem.grid.num_levels**problem.dim,) * 2
    assert np.all(P >= 0)
    assert np.allclose(P.sum(1), 1.0, atol=1e-13)


@pytest.mark.parametrize("problem", [ONE, TWO], ids=["1d", "2d"])
def test_transition_matrix_is_one_step_of_the_library_rounding(problem):
    """Rows of P_α against one simulated step (qtrain.quant's Q_s) from every state."""
    alpha, reps = 0.3, 4000
    P = transition_matrix(problem, alpha)
    states = torch.as_tensor(problem.states())
    g = torch.Generator().manual_seed(0)
    start = states.repeat_interleave(reps, 0)
    after = state_index(problem, simulate(problem, "sr", alpha, start, 1, g))
    S = len(states)
    counts = torch.zeros(S, S, dtype=torch.float64)
    counts.index_put_(
        (torch.arange(S).repeat_interleave(reps), after),
        torch.ones(S * reps, dtype=torch.float64),
        accumulate=True,
    )
    freq = counts.numpy() / reps
    assert np.all(np.abs(freq - P) <= 5 * np.sqrt(P * (1 - P) / reps) + 1e-12)


@pytest.mark.parametrize("problem", [ONE, TWO], ids=["1d", "2d"])
def test_exact_stationary_law_matches_a_long_simulation(problem):
    alpha, chains = 0.2, 20_000
    P = transition_matrix(problem, alpha)
    pi = stationary_distribution(P)
    assert np.allclose(pi @ P, pi, atol=1e-14) and pi.sum() == pytest.approx(1.0)
    steps = 20 * mixing_time(P, pi)
    uniform = np.full(len(pi), 1.0 / len(pi))
    # the law at `steps` is itself exact: its distance to π is negligible next to the tolerance
    assert tv(uniform @ np.linalg.matrix_power(P, steps), pi) < 1e-6
    g = torch.Generator().manual_seed(1)
    start = sample_states(problem, uniform, chains, g)
    w = simulate(problem, "sr", alpha, start, steps, g)
    assert problem.grid.contains(w)
    counts = np.bincount(state_index(problem, w).numpy(), minlength=len(pi))
    assert np.all(np.abs(counts - chains * pi) <= 5 * np.sqrt(chains * pi * (1 - pi)) + 1)


def test_small_alpha_1d_chain_is_the_birth_death_limit():
    """Below α* = s/max|g|: P_α = I + αQ exactly, and π_α is the detailed-balance product."""
    alpha_star = max_skip_free_alpha(ONE)
    Q = limit_generator(ONE)
    x = ONE.levels()
    g = ONE.gradient(x[:, None])[:, 0][:, None] + np.array(ONE.values)[None] * ONE.noise
    up = (np.maximum(-g, 0) * ONE.probs).sum(1)
    down = (np.maximum(g, 0) * ONE.probs).sum(1)
    ratios = up[:-1] / down[1:]  # π_{i+1}/π_i = P(i → i+1)/P(i+1 → i); α cancels
    product = np.concatenate([[1.0], np.cumprod(ratios)])
    product /= product.sum()
    for alpha in (alpha_star, alpha_star / 10, alpha_star / 1000):
        P = transition_matrix(ONE, alpha)
        assert np.abs(P - np.eye(len(P)) - alpha * Q).max() < 1e-14
        assert tv(stationary_distribution(P), product) < 1e-12
    # just above α* an update can skip a level and the law moves away from the limit
    assert tv(stationary_distribution(transition_matrix(ONE, 3 * alpha_star)), product) > 1e-3


def test_limit_does_not_concentrate_but_sgd_and_bc_do():
    pi_limit = stationary_distribution(limit_generator(ONE))
    sr = concentration(ONE, ONE.states(), pi_limit)
    levels = ONE.levels()
    bracket = np.zeros(len(levels), dtype=bool)  # the two levels around each minimizer
    for m in ONE.minimizers[:, 0]:
        i = np.searchsorted(levels, m)
        bracket[i - 1 : i + 1] = True
    # SR's limit keeps mass on the worse minimum and away from the minimizers
    assert pi_limit.max() < 0.5 and sr["global"] < 0.9
    assert sr["dist"] > 0.5 * ONE.grid.spacing
    assert pi_limit[bracket].sum() < 0.75
    final = {}
    for method in ("sgd", "bc"):
        for alpha in (0.02, 0.002):
            g = torch.Generator().manual_seed(2)
            start = -1.75 + 3.5 * torch.rand(2000, 1, generator=g, dtype=torch.float64)
            final[method, alpha] = simulate(ONE, method, alpha, start, int(10 / alpha), g)
    uniform = np.full(2000, 1 / 2000)
    sgd = {a: concentration(ONE, final["sgd", a].numpy(), uniform)["dist"] for a in (0.02, 0.002)}
    assert sgd[0.002] < 0.5 * sgd[0.02] and sgd[0.002] < 0.25 * sr["dist"]
    # BC's deployed weights end on the levels around a minimizer
    assert bracket[state_index(ONE, final["bc", 0.002]).numpy()].mean() > 0.99


def test_2d_law_converges_to_the_limit_at_rate_alpha():
    pi_limit = stationary_distribution(limit_generator(TWO))
    alpha_star = max_skip_free_alpha(TWO)
    distance = [
        tv(stationary_distribution(transition_matrix(TWO, a)), pi_limit)
        for a in (alpha_star, alpha_star / 10)
    ]
    assert distance[1] < 0.2 * distance[0]  # O(α): diagonal moves need two roundings
    assert distance[1] < 1e-2


@pytest.mark.parametrize("problem", [ONE, TWO], ids=["1d", "2d"])
def test_spectral_gap_and_mixing_time_scale_like_alpha(problem):
    alpha_star = max_skip_free_alpha(problem)
    alphas = alpha_star * np.array([1.0, 0.1, 0.01])
    gaps, times = [], []
    for a in alphas:
        P = transition_matrix(problem, a)
        gaps.append(spectral_gap(P) / a)
        times.append(mixing_time(P, stationary_distribution(P)) * a)
    assert np.ptp(gaps[1:]) < 0.02 * gaps[-1]  # gap = α·gap(Q) + O(α²)
    assert np.ptp(times[1:]) < 0.05 * times[-1]  # t_mix ∝ 1/α


def test_mixing_time_is_the_first_time_within_a_quarter():
    P = transition_matrix(ONE, 0.05)
    pi = stationary_distribution(P)
    t_mix = mixing_time(P, pi)
    Pt, t = P.copy(), 1
    while 0.5 * np.abs(Pt - pi).sum(1).max() > 0.25:
        Pt, t = Pt @ P, t + 1
    assert t_mix == t > 1


def test_irreducibility_is_required():
    weak = ChainProblem(grid=kbit(3, 0.25), tilt=(0.15,), noise=0.5)  # |f'| > σ near the edges
    with pytest.raises(ValueError, match="not irreducible"):
        stationary_distribution(transition_matrix(weak, 0.001))
