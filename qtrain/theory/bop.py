"""Bop (Helwegen et al. 2019; docs/paper.md §6) in the theory lab: on a grid, and as a chain.

Bop keeps no latent weights. Per weight it keeps m, an exponential moving average of the
stochastic gradient, and on binary weights w ∈ {−1, +1} it flips w when m agrees in sign with
w and is large enough:

    m ← m + γ(g − m),        w ← −w   if w·m > τ.

Flipping +1 to −1 is a move of one level in the direction −sign(m), and it happens only when
that level exists. That reading carries over to any grid: **move one level in the direction
−sign(m) when |m| > τ**,

    w ← w − s·sign(m)·1{|m| > τ}     (s the spacing; on a bounded grid, only if the level exists)

On {−1, +1} (s = 2) this is exactly Bop: w = +1 with m > τ moves to −1; w = −1 with m > τ
would leave the grid and stays. On the lattice Δ·ℤ every move exists, so nothing saturates.

Two limits fix the rule's meaning. τ → ∞: w never moves. γ = 1: m = g, the rule is sign
descent with step s on the grid, w ← w − s·sign(g)·1{|g| > τ}; then w alone is a Markov chain
with an exact transition matrix (`sign_chain`): one level up with probability P(g < −τ), one
down with P(g > τ). For γ < 1 the state (w, m) is continuous in m and w alone is not Markov
(m carries the past), so no finite exact chain exists; `simulate` runs it instead.

Unlike BC's w_r, m is an average, not a sum: its size tracks the recent gradient, never the
accumulated steps, and each move is a whole level whatever |m| is. Nothing in Bop shrinks the
step as training goes on, so a fixed point of the deployed weights needs |m| ≤ τ there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from qtrain.base.errors import UserError
from qtrain.quant import round_nearest
from qtrain.theory.markov import (
    ChainProblem,
    concentration,
    demo_problems,
    limit_generator,
    stationary_distribution,
)


def bop_step(
    w: torch.Tensor,
    m: torch.Tensor,
    g: torch.Tensor,
    spacing: torch.Tensor | float,
    gamma: float,
    tau: float,
    lo: float = -math.inf,
    hi: float = math.inf,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Bop step on a grid of spacing s (per row, broadcast) between lo and hi.

    m' = m + γ(g − m); w' = w − s·sign(m')·1{|m'| > τ}, kept where the new level lies outside
    [lo, hi]. Returns (w', m'); w' is on the grid whenever w is.
    """
    m = m + gamma * (g - m)
    moved = w - spacing * torch.sign(m) * (m.abs() > tau)
    inside = (moved >= lo - 1e-12) & (moved <= hi + 1e-12)
    return torch.where(inside, moved, w), m


def sign_chain(problem: ChainProblem, tau: float = 0.0) -> np.ndarray:
    """Exact transition matrix of Bop with γ = 1 (sign descent) on the problem's grid, 1-D.

    From level x_i: up with P(g(x_i) < −τ) (if i < n−1), down with P(g(x_i) > τ) (if i > 0),
    else stay; g = f'(x_i) + σξ over the noise table.
    """
    if problem.dim != 1:
        raise UserError("the exact Bop chain is built for 1-D problems; simulate the 2-D one")
    x = problem.states()  # (n, 1)
    xi, q = problem.noise_table()
    g = problem.gradient(x)[:, None, 0] + xi[None, :, 0]  # (n, K)
    up, down = (q * (g < -tau)).sum(1), (q * (g > tau)).sum(1)
    n = len(x)
    P = np.zeros((n, n))
    index = np.arange(n)
    P[index[:-1], index[:-1] + 1] = up[:-1]
    P[index[1:], index[1:] - 1] = down[1:]
    P[index, index] = 1 - P.sum(1)
    return P


def simulate(
    problem: ChainProblem,
    gamma: float,
    tau: float,
    start: torch.Tensor,
    steps: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run independent Bop chains from grid points `start` (N, m), m = 0, for `steps` steps.

    Returns (w, m) at the end; w stays on the problem's bounded grid (a move past an end is
    not made, as a binary weight that already has the sign Bop wants is not flipped).
    """
    grid = problem.grid
    values = torch.as_tensor(problem.values, dtype=torch.float64) * problem.noise
    cdf = torch.cumsum(torch.as_tensor(problem.probs, dtype=torch.float64), 0)[:-1]
    w = start.clone().to(torch.float64)
    m = torch.zeros_like(w)
    for _ in range(steps):
        g = torch.from_numpy(problem.gradient(w.numpy()))
        u = torch.rand(w.shape, generator=generator, dtype=torch.float64)
        g = g + values[torch.searchsorted(cdf, u, right=True)]
        w, m = bop_step(w, m, g, grid.spacing, gamma, tau, grid.lo, grid.hi)
        w = round_nearest(w, grid)  # exact grid values: no drift from repeated ± s
    return w, m


def compare_with_sr(
    problem: ChainProblem,
    gammas: tuple[float, ...],
    tau: float,
    chains: int,
    steps: int,
    seed: int = 0,
) -> dict:
    """Concentration of Bop against SR's α → 0 stationary law on one chain problem.

    'sign' is the exact stationary law of γ = 1 (1-D only); every γ in `gammas` is simulated
    with `chains` chains started uniformly over the grid, for `steps` steps. JSON-ready.
    """
    x = problem.states()
    sr = concentration(problem, x, stationary_distribution(limit_generator(problem)))
    out: dict = {"sr_limit": sr, "tau": tau, "steps": steps, "simulated": []}
    if problem.dim == 1:
        pi = stationary_distribution(sign_chain(problem, tau))
        out["sign_exact"] = concentration(problem, x, pi) | {"pi": pi.tolist()}
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(problem.grid.num_levels, (chains, problem.dim), generator=g)
    start = torch.as_tensor(problem.levels())[codes]
    for gamma in gammas:
        w, _ = simulate(problem, gamma, tau, start, steps, g)
        weights = np.full(chains, 1.0 / chains)
        out["simulated"].append({"gamma": gamma} | concentration(problem, w.numpy(), weights))
    return out


@dataclass(frozen=True)
class BopChainConfig:
    """Bop on the Markov-chain problems: γ values (1 is sign descent), τ, chains, steps.

    γ = 1e-4, τ = 1e-8 are larq's defaults; `steps` is two averaging times 1/γ of the slowest.
    """

    gammas: tuple[float, ...] = (1.0, 0.01, 1e-4)
    tau: float = 1e-8
    chains: int = 1024
    steps: int = 20_000
    seed: int = 0


def run_experiment(cfg: BopChainConfig) -> dict:
    """`compare_with_sr` on both demo chain problems; JSON-ready."""
    return {
        "config": cfg.__dict__,
        "problems": {
            key: compare_with_sr(p, cfg.gammas, cfg.tau, cfg.chains, cfg.steps, cfg.seed)
            for key, p in demo_problems().items()
        },
    }
