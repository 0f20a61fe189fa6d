"""The convex bounds of Theorems 1–3 (docs/paper.md §5) on E[F(w̄_T) − F*].

Notation: T steps, w̄_T the average of the T iterates the gradients were evaluated at, d the
number of weights, Δ the lattice spacing, G² ≥ E‖∇f̃‖² at every iterate, D ≥ ‖w_t − w*‖ for every
t, μ the strong-convexity constant, L₂ the Lipschitz constant of the Hessian. Every function takes
T as a number or a numpy array and returns the bound with the same shape. Δ = 0 turns Theorems 1
and 2 into the classical bounds for full-precision SGD.
"""

from __future__ import annotations

import numpy as np


def strongly_convex_rate(T, G: float, mu: float):
    """(1 + log(T+1)) G² / (2μT): the part of Theorems 1 and 3 that α_t = 1/(μ(t+1)) drives to 0."""
    T = np.asarray(T, dtype=float)
    return (1.0 + np.log(T + 1.0)) * G**2 / (2.0 * mu * T)


def sr_floor(d: int, delta: float, G: float) -> float:
    """√d·Δ·G/2: stochastic rounding's error floor in Theorems 1 and 2 (Lemma 1's variance)."""
    return np.sqrt(d) * delta * G / 2.0


def bc_floor(d: int, delta: float, D: float, L2: float) -> float:
    """D·L₂·√d·Δ/2: BinaryConnect's floor in Theorem 3; 0 for a quadratic (L₂ = 0)."""
    return D * L2 * np.sqrt(d) * delta / 2.0


def theorem1(T, G: float, mu: float, d: int, delta: float):
    """SR-SGD, μ-strongly convex F, α_t = 1/(μ(t+1)):
    E[F(w̄_T) − F*] ≤ (1 + log(T+1)) G²/(2μT) + √d·Δ·G/2."""
    return strongly_convex_rate(T, G, mu) + sr_floor(d, delta, G)


def step_sum(T, c: float):
    """S_T = Σ_{t=1}^{T} c/√t, the sum of the steps α_t = c/√t."""
    T = np.asarray(T, dtype=int)
    partial = np.cumsum(c / np.sqrt(np.arange(1, int(T.max()) + 1)))
    return partial[T - 1]


def theorem2(T, c: float, D: float, G: float, d: int, delta: float):
    """SR-SGD, convex F, α_t = c/√t:
    E[F(w̄_T) − F*] ≤ D²/(2c√T) + S_T·G²/(2T) + √d·Δ·G/2, with S_T = Σ_{t≤T} α_t.

    The paper states the middle term as √(T+1)·c·G²/(2T), i.e. under Σα_t ≤ c√(T+1); the steps
    c/√t sum to about 2c√T, so the bound for this step rule carries S_T itself (the standard
    argument: Σ_t (F(w_t) − F*) ≤ D²/(2α_T) + (G²/2) Σ_t α_t + T·√d·Δ·G/2).
    """
    T = np.asarray(T, dtype=float)
    return D**2 / (2.0 * c * np.sqrt(T)) + step_sum(T, c) * G**2 / (2.0 * T) + sr_floor(d, delta, G)


def theorem3(T, G: float, mu: float, D: float, L2: float, d: int, delta: float):
    """BC-SGD, μ-strongly convex F with L₂-Lipschitz Hessian, α_t = 1/(μ(t+1)):
    E[F(w̄_T) − F*] ≤ (1 + log(T+1)) G²/(2μT) + D·L₂·√d·Δ/2."""
    return strongly_convex_rate(T, G, mu) + bc_floor(d, delta, D, L2)
