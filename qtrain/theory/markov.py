"""SR on a bounded grid as a Markov chain: exact transitions, stationary law, mixing, simulation.

Weights w ∈ 𝒢^m live on the m-fold product of a bounded `qtrain.quant` grid 𝒢 with levels
x_0 < … < x_{n−1} and spacing s. The objective is the tilted multi-well

    f(w) = Σ_j (w_j⁴/4 − w_j²) + bᵀw + κ·w_1·w_2 (κ only for m = 2),

with two minima per coordinate near ±√2. Noise model (stated): the loss is an average of
per-sample losses f_k(w) = f(w) + σ·ξ_kᵀw and a minibatch is one sample, so the stochastic
gradient is g = ∇f(w) + σξ with the coordinates of ξ independent, each drawn from `values` with
`probs` (zero mean). SR-SGD, w ← Q_s(w − α g), is then a Markov chain on the n^m grid points.

Transition matrix: from x, for each noise value ξ, coordinate j goes to y_j = clip(x_j − α g_j)
and Q_s sends it to the level below y_j or the one above with probabilities (1 − p, p),
p = (y_j − lower)/s; coordinates round independently, so each row of P_α is a mixture over ξ of
products of two-point distributions.

Small-α limit: once α·max|g| ≤ s no update can skip a level, so coordinate j moves one level up
with probability α·E[(−g_j)⁺]/s and down with α·E[g_j⁺]/s. Hence P_α = I + α·Q + O(α²) with the
generator Q of those rates (for m = 1 the O(α²) term is exactly zero). The stationary law π_α
tends to the stationary law of Q — a limit that does not depend on α and does not concentrate
on the minimizer (for m = 1 detailed balance gives π_{i+1}/π_i = E[(−g(x_i))⁺]/E[g(x_{i+1})⁺],
where α cancels) — while the spectral gap of P_α is α times that of Q, so the mixing time grows
like 1/α (Theorems 5 and 6 of the paper as stated in docs/paper.md §5).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from qtrain.base.errors import UserError
from qtrain.base.optional import require
from qtrain.quant import Grid, kbit, round_nearest, round_stochastic


@dataclass(frozen=True)
class ChainProblem:
    """The objective, the grid and the noise model of one chain (see the module docstring)."""

    grid: Grid
    tilt: tuple[float, ...]  # b, one entry per coordinate (its length is m)
    noise: float  # σ
    values: tuple[float, ...] = (-1.0, 1.0)  # support of each coordinate of ξ
    probs: tuple[float, ...] = (0.5, 0.5)
    coupling: float = 0.0  # κ

    def __post_init__(self) -> None:
        if not self.grid.bounded:
            raise UserError("the Markov chain needs a bounded grid, not the lattice")
        if self.dim not in (1, 2):
            raise UserError(f"the chain supports 1 or 2 coordinates, got {self.dim}")
        if abs(sum(self.probs) - 1) > 1e-12 or abs(np.dot(self.values, self.probs)) > 1e-12:
            raise UserError("the noise probabilities must sum to 1 and the noise mean must be 0")

    @property
    def dim(self) -> int:
        return len(self.tilt)

    def levels(self) -> np.ndarray:
        return self.grid.levels(torch.float64).numpy()

    def states(self) -> np.ndarray:
        """All grid points (n^m, m), row-major: state index = Σ_j i_j · n^(m−1−j)."""
        return np.array(list(itertools.product(self.levels(), repeat=self.dim)))

    def value(self, w: np.ndarray) -> np.ndarray:
        """f(w) for points w of shape (..., m)."""
        f = (w**4 / 4 - w**2).sum(-1) + w @ np.asarray(self.tilt)
        return f + self.coupling * w[..., 0] * w[..., -1] if self.dim == 2 else f

    def gradient(self, w: np.ndarray) -> np.ndarray:
        """∇f(w) for points w of shape (..., m)."""
        g = w * w * w - 2 * w + np.asarray(self.tilt)  # w*w*w: numpy's float power is slow
        if self.dim == 2:
            g = g + self.coupling * w[..., ::-1]
        return g

    def noise_table(self) -> tuple[np.ndarray, np.ndarray]:
        """All noise vectors σξ (K, m) and their probabilities (K,)."""
        xi = np.array(list(itertools.product(self.values, repeat=self.dim))) * self.noise
        q = np.array([math.prod(p) for p in itertools.product(self.probs, repeat=self.dim)])
        return xi, q

    @cached_property
    def minimizers(self) -> np.ndarray:
        """The local minimizers of f inside the grid's range (k, m), best first.

        BFGS from a 7^m mesh over the range; a limit point counts when its Hessian (central
        differences of ∇f) is positive definite, which rules out saddles.
        """
        minimize = require("scipy.optimize", "theory", "finding the minimizers").minimize

        found: list[np.ndarray] = []
        eye = 1e-5 * np.eye(self.dim)
        for start in itertools.product(np.linspace(self.grid.lo, self.grid.hi, 7), repeat=self.dim):
            x = minimize(
                lambda w: float(self.value(w)),
                np.array(start),
                jac=self.gradient,
                method="BFGS",
                options={"gtol": 1e-12},
            ).x
            hessian = (self.gradient(x + eye) - self.gradient(x - eye)) / 2e-5
            convex = np.linalg.eigvalsh((hessian + hessian.T) / 2).min() > 0
            inside = np.all(np.abs(x) <= self.grid.hi)
            if convex and inside and not any(np.linalg.norm(x - m) < 1e-5 for m in found):
                found.append(x)
        return np.array(sorted(found, key=lambda m: float(self.value(m))))


def max_skip_free_alpha(problem: ChainProblem) -> float:
    """α* = s / max|g_j|: for α ≤ α* no SR update moves by more than one level per coordinate."""
    xi, _ = problem.noise_table()
    g = problem.gradient(problem.states())[:, None, :] + xi[None]
    return problem.grid.spacing / np.abs(g).max()


def _coordinate_moves(problem: ChainProblem, alpha: float) -> np.ndarray:
    """dist[s, k, j, i]: probability that coordinate j of state s lands on level i, noise k."""
    x = problem.states()  # (S, m)
    xi, _ = problem.noise_table()  # (K, m)
    lo, n = problem.grid.lo, problem.grid.num_levels
    y = np.clip(x[:, None, :] - alpha * (problem.gradient(x)[:, None, :] + xi[None]), lo, -lo)
    u = (y - lo) / problem.grid.spacing  # position in levels, in [0, n−1]
    below = np.minimum(np.floor(u), n - 2).astype(int)
    p = u - below
    dist = np.zeros((*u.shape, n))
    np.put_along_axis(dist, below[..., None], (1 - p)[..., None], axis=-1)
    np.put_along_axis(dist, below[..., None] + 1, p[..., None], axis=-1)
    return dist


def transition_matrix(problem: ChainProblem, alpha: float) -> np.ndarray:
    """The exact transition matrix P_α (S, S) of SR-SGD with step α; rows sum to 1."""
    dist = _coordinate_moves(problem, alpha)  # (S, K, m, n)
    _, q = problem.noise_table()
    joint = dist[:, :, 0, :]
    for j in range(1, problem.dim):  # coordinates round independently: outer products
        joint = np.einsum("ska,skb->skab", joint, dist[:, :, j, :]).reshape(len(joint), len(q), -1)
    return np.einsum("k,sku->su", q, joint)


def limit_generator(problem: ChainProblem) -> np.ndarray:
    """Q = lim_{α→0} (P_α − I)/α: rate E[(−g_j)⁺]/s one level up and E[g_j⁺]/s one level down."""
    x = problem.states()
    xi, q = problem.noise_table()
    g = problem.gradient(x)[:, None, :] + xi[None]  # (S, K, m)
    up = (q[None, :, None] * np.maximum(-g, 0)).sum(1) / problem.grid.spacing  # (S, m)
    down = (q[None, :, None] * np.maximum(g, 0)).sum(1) / problem.grid.spacing
    n, S = problem.grid.num_levels, len(x)
    index = np.arange(S)
    Q = np.zeros((S, S))
    for j in range(problem.dim):
        stride = n ** (problem.dim - 1 - j)
        level = (index // stride) % n
        top, bottom = level < n - 1, level > 0
        Q[index[top], index[top] + stride] = up[top, j]  # clipped at the top: no move
        Q[index[bottom], index[bottom] - stride] = down[bottom, j]
    Q[index, index] = -Q.sum(1)
    return Q


def stationary_distribution(P: np.ndarray) -> np.ndarray:
    """π with πP = π, by the Grassmann–Taksar–Heyman elimination.

    GTH reads only the off-diagonal entries, so it takes a transition matrix or a generator
    alike and never forms 1 − P_ii (which loses all precision when α is small).
    """
    A = np.array(P, dtype=np.float64)
    S = len(A)
    for k in range(S - 1, 0, -1):
        out = A[k, :k].sum()
        if out <= 0:
            raise UserError(
                "the chain is not irreducible: raise the noise so every level is reachable"
            )
        A[:k, k] /= out
        A[:k, :k] += np.outer(A[:k, k], A[k, :k])
    pi = np.zeros(S)
    pi[0] = 1.0
    for k in range(1, S):
        pi[k] = pi[:k] @ A[:k, k]
    return pi / pi.sum()


def spectral_gap(P: np.ndarray) -> float:
    """Absolute spectral gap 1 − max{|λ| : λ an eigenvalue of P other than 1}."""
    lam = np.linalg.eigvals(P)
    lam = np.delete(lam, np.argmin(np.abs(lam - 1)))
    return float(1 - np.abs(lam).max())


def _tv_worst(Pt: np.ndarray, pi: np.ndarray) -> float:
    """max over starts x of ‖P^t(x, ·) − π‖_TV."""
    return float(0.5 * np.abs(Pt - pi[None]).sum(1).max())


def mixing_time(P: np.ndarray, pi: np.ndarray, eps: float = 0.25, t_max: int = 2**40) -> int:
    """t_mix(ε) = min{t : max_x ‖P^t(x,·) − π‖_TV ≤ ε}.

    The worst-case distance is non-increasing in t, so doubling brackets t_mix and the binary
    digits of t_mix are then fixed from the top, reusing the squares P^(2^k).
    """
    powers = [P]
    while _tv_worst(powers[-1], pi) > eps:
        if 2 ** len(powers) > t_max:
            raise UserError(f"the chain does not mix within {t_max} steps")
        powers.append(powers[-1] @ powers[-1])
    if len(powers) == 1:
        return 1
    # largest t with distance > eps, built bit by bit from P^(2^(k−1))
    t, current = 2 ** (len(powers) - 2), powers[-2]
    for k in range(len(powers) - 3, -1, -1):
        trial = current @ powers[k]
        if _tv_worst(trial, pi) > eps:
            t, current = t + 2**k, trial
    return t + 1


def tv(p: np.ndarray, q: np.ndarray) -> float:
    """Total-variation distance ½‖p − q‖₁."""
    return float(0.5 * np.abs(np.asarray(p) - np.asarray(q)).sum())


def state_index(problem: ChainProblem, w: torch.Tensor) -> torch.Tensor:
    """Row-major state index of grid points w (N, m)."""
    codes = problem.grid.to_codes(w)
    n = problem.grid.num_levels
    return (codes * n ** torch.arange(problem.dim - 1, -1, -1)).sum(1)


def sample_states(
    problem: ChainProblem, pi: np.ndarray, chains: int, generator: torch.Generator
) -> torch.Tensor:
    """`chains` grid points (chains, m) drawn from the distribution π over states."""
    idx = torch.multinomial(torch.as_tensor(pi), chains, replacement=True, generator=generator)
    return torch.as_tensor(problem.states())[idx]


def simulate(
    problem: ChainProblem,
    method: str,
    alpha: float,
    start: torch.Tensor,
    steps: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Run independent chains from `start` (N, m) for `steps` steps; return the final weights.

    'sr':  w ← Q_s(w − α g(w))                          (a grid point, the chain above)
    'sgd': w ← clip(w − α g(w))                          (float weights, clipped to the range)
    'bc':  w_r ← clip(w_r − α g(Q_d(w_r))), returns Q_d(w_r) (float copy, deployed grid point)
    """
    if method not in ("sr", "sgd", "bc"):
        raise UserError(f"unknown method {method!r}; use 'sr', 'sgd' or 'bc'")
    grid = problem.grid
    values = torch.as_tensor(problem.values, dtype=torch.float64) * problem.noise
    cdf = torch.cumsum(torch.as_tensor(problem.probs, dtype=torch.float64), 0)[:-1]
    w = start.clone().to(torch.float64)
    for _ in range(steps):
        at = round_nearest(w, grid) if method == "bc" else w
        g = torch.from_numpy(problem.gradient(at.numpy()))
        u = torch.rand(w.shape, generator=generator, dtype=torch.float64)
        moved = w - alpha * (g + values[torch.searchsorted(cdf, u, right=True)])
        if method == "sr":
            w = round_stochastic(moved, grid, generator)
        else:
            w = moved.clamp_(grid.lo, grid.hi)
    return round_nearest(w, grid) if method == "bc" else w


def demo_problems() -> dict[str, ChainProblem]:
    """The experiment's chains: 32 levels on [−1.94, 1.94] in 1-D, 16 × 16 levels in 2-D."""
    return {
        "1d": ChainProblem(grid=kbit(5, 1 / 16), tilt=(0.15,), noise=4.0),
        "2d": ChainProblem(grid=kbit(4, 1 / 8), tilt=(0.15, 0.1), noise=4.0, coupling=0.3),
    }


@dataclass(frozen=True)
class MarkovConfig:
    """The α sweep; SGD and BC run ⌈horizon/α⌉ steps from weights uniform over the range."""

    alphas: tuple[float, ...] = (0.3, 0.1, 0.03, 0.01, 0.003, 0.001)
    chains: int = 2048
    horizon: float = 20.0
    check_alpha: float = 0.1  # the α at which simulated SR chains are compared with π_α
    seed: int = 0


def concentration(problem: ChainProblem, w: np.ndarray, weights: np.ndarray) -> dict:
    """How concentrated a distribution of points w (N, m) with `weights` (N,) is.

    dist: E‖w − nearest minimizer‖; global: P(the nearest minimizer is the global one);
    gap: E[f(w)] − min f.
    """
    mins = problem.minimizers
    distances = np.linalg.norm(w[:, None, :] - mins[None], axis=-1)
    return {
        "dist": float(weights @ distances.min(1)),
        "global": float(weights @ (distances.argmin(1) == 0)),
        "gap": float(weights @ problem.value(w) - problem.value(mins[0])),
    }


def _simulated(problem: ChainProblem, method: str, alpha: float, cfg: MarkovConfig) -> dict:
    g = torch.Generator().manual_seed(cfg.seed)
    lo, hi = problem.grid.lo, problem.grid.hi
    start = lo + (hi - lo) * torch.rand(cfg.chains, problem.dim, generator=g, dtype=torch.float64)
    w = simulate(problem, method, alpha, start, math.ceil(cfg.horizon / alpha), g)
    S = len(problem.states())
    counts = torch.bincount(state_index(problem, round_nearest(w, problem.grid)), minlength=S)
    weights = np.full(cfg.chains, 1.0 / cfg.chains)
    return concentration(problem, w.numpy(), weights) | {
        "histogram": (counts / cfg.chains).tolist()
    }


def _sr_check(problem: ChainProblem, cfg: MarkovConfig) -> dict:
    """Simulated SR chains, started uniformly, after 10·t_mix steps against the exact π_α.

    tv_reference is the TV distance of as many independent draws from π_α itself: the size
    that sampling noise alone gives.
    """
    P = transition_matrix(problem, cfg.check_alpha)
    pi = stationary_distribution(P)
    steps = 10 * mixing_time(P, pi)
    g = torch.Generator().manual_seed(cfg.seed)
    S = len(pi)
    start = sample_states(problem, np.full(S, 1.0 / S), cfg.chains, g)
    w = simulate(problem, "sr", cfg.check_alpha, start, steps, g)
    empirical = torch.bincount(state_index(problem, w), minlength=S).numpy() / cfg.chains
    iid = torch.bincount(
        state_index(problem, sample_states(problem, pi, cfg.chains, g)), minlength=S
    )
    return {
        "alpha": cfg.check_alpha,
        "steps": steps,
        "empirical": empirical.tolist(),
        "tv": tv(empirical, pi),
        "tv_reference": tv(iid.numpy() / cfg.chains, pi),
    }


def sweep(problem: ChainProblem, cfg: MarkovConfig) -> dict:
    """Exact π_α, spectral gap and t_mix of SR for every α, its α → 0 limit, and simulated
    SGD and BC at the same α; JSON-ready."""
    x = problem.states()
    Q = limit_generator(problem)
    pi_limit = stationary_distribution(Q)
    rows = []
    for alpha in cfg.alphas:
        P = transition_matrix(problem, alpha)
        pi = stationary_distribution(P)
        rows.append(
            {
                "alpha": alpha,
                "pi": pi.tolist(),
                "tv_to_limit": tv(pi, pi_limit),
                "spectral_gap": spectral_gap(P),
                "mixing_time": mixing_time(P, pi),
                "sr": concentration(problem, x, pi),
                "sgd": _simulated(problem, "sgd", alpha, cfg),
                "bc": _simulated(problem, "bc", alpha, cfg),
            }
        )
    slow = [r for r in rows if r["alpha"] <= max_skip_free_alpha(problem)]
    slope = None
    if len(slow) >= 2:
        a = np.log([r["alpha"] for r in slow])
        slope = float(np.polyfit(a, np.log([r["mixing_time"] for r in slow]), 1)[0])
    return {
        "dim": problem.dim,
        "levels": problem.levels().tolist(),
        "states": x.tolist(),
        "values": problem.value(x).tolist(),
        "minimizers": problem.minimizers.tolist(),
        "alpha_star": max_skip_free_alpha(problem),
        "limit": {
            "pi": pi_limit.tolist(),
            "generator_gap": float(-np.sort(np.linalg.eigvals(Q).real)[-2]),
            "sr": concentration(problem, x, pi_limit),
        },
        "rows": rows,
        "mixing_slope": slope,
        "sr_check": _sr_check(problem, cfg),
    }


def run_experiment(cfg: MarkovConfig) -> dict:
    """`sweep` on both demo problems."""
    return {
        "config": cfg.__dict__,
        "problems": {k: sweep(p, cfg) for k, p in demo_problems().items()},
    }
