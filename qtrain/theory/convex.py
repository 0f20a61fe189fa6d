"""SGD on the lattice Δ·ℤ, vectorised over seeds, and the convex error-floor experiment.

The four methods (docs/paper.md §2), each with stochastic gradients ∇f̃ and step α_t, t = 0 … T−1,
all starting from w_0 = 0 (a point of every lattice):

- FP-SGD:  w_{t+1} = w_t − α_t ∇f̃(w_t)                       (full precision, no grid)
- SR-SGD:  w_{t+1} = Q_s(w_t − α_t ∇f̃(w_t))                   (only lattice points are kept)
- R-SGD:   w_{t+1} = Q_d(w_t − α_t ∇f̃(w_t))
- BC-SGD:  w^r_{t+1} = w^r_t − α_t ∇f̃(Q_d(w^r_t)),  w_t = Q_d(w^r_t)  (float copy w^r)

and Bop (docs/paper.md §6; `qtrain.theory.bop`), which has no learning rate: with an EMA of the
gradient m_{t+1} = m_t + γ(∇f̃(w_t) − m_t), m_0 = 0, it moves one lattice level against the sign
of m when |m| > τ: w_{t+1} = w_t − Δ·sign(m_{t+1})·1{|m_{t+1}| > τ}.

For every method w_t is the point the gradient is evaluated at — the quantized weights for SR,
R and BC — and the measured quantity is F at the average of those points,
w̄_T = (1/T) Σ_{t<T} w_t, the iterate that Theorems 1–3 bound. The average of lattice points
is not itself on the lattice, so the experiment also records the last iterate w_T, the weights
a quantized network would be deployed with. Q_d and Q_s are `qtrain.quant`'s rounding on the
lattice (see `lattice_round`).

Step rules: α_t = 1/(μ(t+1)) (Theorems 1 and 3) and α_t = c/√(t+1) (Theorem 2, t+1 = 1 … T).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from qtrain.base.errors import UserError
from qtrain.quant import lattice, quantize
from qtrain.theory import bounds
from qtrain.theory.bop import bop_step
from qtrain.theory.problems import make_problem

METHODS = ("fp", "sr", "r", "bc", "bop")
# the methods run under each step rule: the ones a theorem covers, plus R under the first
SCHEDULE_METHODS = {"strongly_convex": ("fp", "sr", "r", "bc"), "convex": ("fp", "sr")}
SCHEDULES = tuple(SCHEDULE_METHODS)


def step_rule(schedule: str, mu: float, c: float) -> Callable[[int], float]:
    """α_t for t = 0, 1, …: 1/(μ(t+1)) for 'strongly_convex', c/√(t+1) for 'convex'."""
    if schedule == "strongly_convex":
        return lambda t: 1.0 / (mu * (t + 1))
    if schedule == "convex":
        return lambda t: c / math.sqrt(t + 1)
    raise UserError(f"unknown step rule {schedule!r}; use one of {', '.join(SCHEDULES)}")


def checkpoints(steps: int, count: int = 24) -> list[int]:
    """About `count` log-spaced values of T in [1, steps], always ending at `steps`."""
    ts = np.unique(np.round(np.geomspace(1, steps, count)).astype(int))
    return [int(t) for t in ts]


@dataclass
class Trace:
    """One method on one problem, measured at each checkpoint T over all seeds.

    avg_gap[k] = mean over seeds of F(w̄_T) − F*, last_gap[k] = mean of F(w_T) − F*, with
    standard errors; D = the largest ‖x − w*‖ over every point x the run kept (w_t, and w^r_t
    for BC) at every step and seed.
    """

    method: str
    delta: float  # 0 for FP
    schedule: str
    T: list[int]
    avg_gap: list[float]
    avg_sem: list[float]
    last_gap: list[float]
    last_sem: list[float]
    D: float
    gamma: float | None = None  # Bop's γ and τ; None for the other methods
    tau: float | None = None


def lattice_round(
    w: torch.Tensor,
    delta: torch.Tensor,
    stochastic: bool,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Q_s or Q_d on Δ·ℤ with one Δ per row: Δ · Q(w/Δ) on the unit lattice ℤ.

    `qtrain.quant` rounds on `lattice(Δ)` by picking the multiple m from w/Δ and returning m·Δ,
    so this is the same arithmetic (bit for bit) with Δ taken per row of w (R, d) from
    delta (R, 1): runs with different Δ share one call.
    """
    return quantize(w / delta, lattice(1.0), stochastic, generator) * delta


def _mean_sem(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard error along the last axis."""
    return x.mean(-1), x.std(-1) / math.sqrt(x.shape[-1])


def run_method(
    problem,
    method: str,
    deltas: tuple[float, ...],
    alpha: Callable[[int], float] | None,
    steps: int,
    seeds: int,
    seed: int = 0,
    schedule: str = "",
    bop: tuple[float, float] = (1.0, 0.0),
) -> list[Trace]:
    """Run `seeds` independent copies of `method` per Δ for `steps` steps; one `Trace` per Δ.

    All runs are rows of one batch (R = len(deltas)·seeds rows; FP ignores Δ and runs once).
    The minibatch draws come from their own generator seeded with `seed`, so every method sees
    the same minibatches (common random numbers); rounding uses a second generator. `bop` is
    Bop's (γ, τ), used by 'bop' only (which ignores α).
    """
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    deltas = (0.0,) if method == "fp" else tuple(deltas)
    scale = torch.tensor(deltas, dtype=torch.float64).repeat_interleave(seeds)[:, None]
    batches = torch.Generator().manual_seed(seed)
    rounding = torch.Generator().manual_seed(seed + 1)
    w = torch.zeros(len(scale), problem.d, dtype=torch.float64)  # w_t (w^r_t for BC)
    m = torch.zeros_like(w)  # Bop's gradient average
    total = torch.zeros_like(w)  # Σ_{s<t} w_s of the gradient points
    far = torch.zeros(len(scale), dtype=torch.float64)  # running max of ‖· − w*‖ per row
    marks = set(checkpoints(steps))
    out: dict[str, list] = {"avg": [], "last": []}
    for t in range(steps):
        point = lattice_round(w, scale, False) if method == "bc" else w
        total += point
        far = torch.maximum(far, (point - problem.w_star).norm(dim=1))
        gradient = problem.stochastic_gradient(point, batches)
        if method == "bop":
            w, m = bop_step(w, m, gradient, scale, *bop)
            w = lattice_round(w, scale, False)  # exact lattice values: no drift from ± Δ
        elif method in ("sr", "r"):
            w = lattice_round(w - alpha(t) * gradient, scale, method == "sr", rounding)
        else:
            w = w - alpha(t) * gradient
        if method == "bc":
            far = torch.maximum(far, (w - problem.w_star).norm(dim=1))
        if t + 1 in marks:
            last = lattice_round(w, scale, False) if method == "bc" else w
            out["avg"].append(_mean_sem(problem.suboptimality(total / (t + 1)).view(-1, seeds)))
            out["last"].append(_mean_sem(problem.suboptimality(last).view(-1, seeds)))
    avg = torch.stack([torch.stack(pair) for pair in out["avg"]])  # (checkpoints, 2, Δs)
    last = torch.stack([torch.stack(pair) for pair in out["last"]])
    D = far.view(-1, seeds).max(dim=1).values
    return [
        Trace(
            method=method,
            delta=delta,
            schedule=schedule,
            T=sorted(marks),
            avg_gap=avg[:, 0, i].tolist(),
            avg_sem=avg[:, 1, i].tolist(),
            last_gap=last[:, 0, i].tolist(),
            last_sem=last[:, 1, i].tolist(),
            D=D[i].item(),
            **(dict(zip(("gamma", "tau"), bop)) if method == "bop" else {}),
        )
        for i, delta in enumerate(deltas)
    ]


@dataclass(frozen=True)
class ConvexConfig:
    """The convex experiment: every problem × dimension × step rule × method × Δ.

    The step rule 'strongly_convex' runs FP, SR, R and BC (Theorems 1 and 3); 'convex' runs FP
    and SR with c = 1/μ, so both rules start from the same α_0 = 1/μ (Theorem 2). Bop has no
    learning rate; it runs once per (γ, τ) in `bop`, recorded with the schedule 'none'.
    """

    problems: tuple[str, ...] = ("least_squares", "logistic")
    dims: tuple[int, ...] = (4, 16, 64)
    deltas: tuple[float, ...] = (0.025, 0.05, 0.1, 0.2)
    steps: int = 8192
    seeds: int = 128
    seed: int = 0
    # Bop's (γ, τ): sign descent, a short average, larq's defaults; run with no step rule
    bop: tuple[tuple[float, float], ...] = ((1.0, 0.0), (0.01, 0.0), (1e-4, 1e-8))


def theorem_for(schedule: str, method: str) -> str | None:
    """The theorem that bounds `method` under `schedule`; None for R and Bop, which have none."""
    if method in ("r", "bop"):
        return None
    if schedule == "convex":
        return "theorem2"
    return "theorem3" if method == "bc" else "theorem1"


def _bound(theorem: str, problem, delta: float, D: float, G: float, T: list[int], c: float):
    if theorem == "theorem1":
        return bounds.theorem1(T, G, problem.mu, problem.d, delta)
    if theorem == "theorem2":
        return bounds.theorem2(T, c, D, G, problem.d, delta)
    return bounds.theorem3(T, G, problem.mu, D, problem.L2, problem.d, delta)


def _record(problem, name: str, c: float, trace: Trace) -> dict:
    """A JSON-ready trace with G = gradient_bound(D) and its theorem's bound at every T."""
    G = problem.gradient_bound(trace.D)
    theorem = theorem_for(trace.schedule, trace.method)
    bound = None
    if theorem is not None:
        bound = [float(b) for b in _bound(theorem, problem, trace.delta, trace.D, G, trace.T, c)]
    return {"problem": name, "d": problem.d, **trace.__dict__, "G": G} | {
        "theorem": theorem,
        "bound": bound,
    }


def run_experiment(cfg: ConvexConfig, progress: Callable[[str], None] | None = None) -> dict:
    """Run the whole grid of `cfg`; return JSON-ready records with the estimated constants.

    Each record holds a `Trace`, the constant G = gradient_bound(D), the name of the theorem
    that covers the run and its bound at every checkpoint T.
    """
    records, constants = [], []
    for name in cfg.problems:
        for d in cfg.dims:
            problem = make_problem(name, d, seed=cfg.seed)
            c = 1.0 / problem.mu
            constants.append({"problem": name, "d": d, "mu": problem.mu, "L2": problem.L2, "c": c})
            for schedule, methods in SCHEDULE_METHODS.items():
                alpha = step_rule(schedule, problem.mu, c)
                for method in methods:
                    if progress:
                        progress(f"{name} d={d} {schedule} {method}")
                    traces = run_method(
                        problem, method, cfg.deltas, alpha, cfg.steps, cfg.seeds, cfg.seed, schedule
                    )
                    records += [_record(problem, name, c, trace) for trace in traces]
            for bop in cfg.bop:
                if progress:
                    progress(f"{name} d={d} bop γ={bop[0]:g} τ={bop[1]:g}")
                traces = run_method(
                    problem, "bop", cfg.deltas, None, cfg.steps, cfg.seeds, cfg.seed, "none", bop
                )
                records += [_record(problem, name, c, trace) for trace in traces]
    return {"config": cfg.__dict__, "constants": constants, "records": records}


def floors(result: dict) -> list[dict]:
    """Final E[F(w̄_T) − F*] and E[F(w_T) − F*] (T = steps) of every record, with the
    SR floor term √d·Δ·G/2 of Theorems 1–2 for comparison."""
    rows = []
    for r in result["records"]:
        rows.append(
            {
                key: r[key]
                for key in ("problem", "d", "schedule", "method", "delta", "G", "D", "gamma", "tau")
            }
            | {
                "avg_gap": r["avg_gap"][-1],
                "avg_sem": r["avg_sem"][-1],
                "last_gap": r["last_gap"][-1],
                "last_sem": r["last_sem"][-1],
                "sr_floor_term": float(bounds.sr_floor(r["d"], r["delta"], r["G"])),
            }
        )
    return rows
