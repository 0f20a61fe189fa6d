"""Convex test problems with a known optimum, minibatch gradients, and the theorems' constants.

Every problem is a finite sum F(w) = (1/n) Σ_i f_i(w) over generated data. A stochastic
gradient ∇f̃(w) averages the per-sample gradients of a minibatch of B indices drawn uniformly
with replacement, so it is unbiased. Weights come batched: w has shape (R, d), one row per
independent run, and every method below returns one value (or one gradient) per row.

The constants of Theorems 1–3 (docs/paper.md §5):

- μ: strong convexity, ∇²F ⪰ μI everywhere;
- L₂: Lipschitz constant of the Hessian, ‖∇²F(u) − ∇²F(v)‖₂ ≤ L₂‖u − v‖;
- G: E‖∇f̃(w)‖² ≤ G² at every iterate. G depends on where the iterates go, so
  `gradient_bound(D)` returns the supremum of E‖∇f̃(w)‖² over the ball ‖w − w*‖ ≤ D (or an upper
  bound of it), and the experiment passes the largest distance D its runs actually reached.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qtrain.base.errors import UserError

# max |ℓ'''(z)| for the logistic loss ℓ(z) = log(1 + e^{−z}): ℓ''' = s(1 − s)(1 − 2s) with s the
# sigmoid, largest at s = (3 ± √3)/6 where it equals 1/(6√3)
_LOGISTIC_THIRD_DERIVATIVE = 1.0 / (6.0 * math.sqrt(3.0))


def _rows(n: int, batch: int, generator: torch.Generator, rows: int) -> torch.Tensor:
    """Minibatch indices (rows, batch), uniform over {0 … n−1} with replacement."""
    return torch.randint(n, (rows, batch), generator=generator)


@dataclass(frozen=True)
class LeastSquares:
    """Least squares from n noisy measurements: F(w) = (1/2n) Σ_i ‖C w − y_i‖².

    The measurements are y_i = C w° + σ ε_i with ε_i ~ N(0, I_d) and a fixed design C whose
    Gram matrix H = CᵀC has its eigenvalues evenly spread over [μ, L] in a random basis. Then
    ∇f_i(w) = H w − z_i with z_i = Cᵀ y_i, so

    - w* = H⁻¹ z̄ (z̄ the mean of the z_i) and F(w) − F* = ½ (w − w*)ᵀ H (w − w*) exactly;
    - the minibatch noise is additive: ∇f̃(w) = H(w − w*) − (z̄_B − z̄), with
      E‖z̄_B − z̄‖² = v/B, v = (1/n) Σ_i ‖z_i − z̄‖²;
    - μ = λ_min(H), L₂ = 0 (the Hessian is constant), and over ‖w − w*‖ ≤ D
      sup E‖∇f̃(w)‖² = L² D² + v/B with L = λ_max(H).
    """

    H: torch.Tensor  # (d, d)
    z: torch.Tensor  # (n, d) the per-sample vectors Cᵀ y_i
    w_star: torch.Tensor  # (d,)
    batch: int
    mu: float
    L: float
    noise_second_moment: float  # v/B = E‖z̄_B − z̄‖²
    L2: float = 0.0
    name: str = "least squares"

    @property
    def d(self) -> int:
        return self.H.shape[0]

    def stochastic_gradient(self, w: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """∇f̃(w) = H w − z̄_B for each row of w (R, d)."""
        idx = _rows(self.z.shape[0], self.batch, generator, w.shape[0])
        return w @ self.H - self.z[idx].mean(dim=1)

    def suboptimality(self, w: torch.Tensor) -> torch.Tensor:
        """F(w) − F* = ½ (w − w*)ᵀ H (w − w*) per row, shape (R,)."""
        e = w - self.w_star
        return 0.5 * ((e @ self.H) * e).sum(dim=1)

    def gradient_bound(self, D: float) -> float:
        """G = √(L² D² + v/B), the exact sup of √E‖∇f̃‖² over ‖w − w*‖ ≤ D."""
        return math.sqrt(self.L**2 * D**2 + self.noise_second_moment)


def least_squares(
    d: int,
    n: int = 512,
    batch: int = 1,
    mu: float = 1.0,
    L: float = 2.0,
    noise: float = 1.0,
    seed: int = 0,
) -> LeastSquares:
    """A generated `LeastSquares` problem with spectrum [μ, L] and measurement noise σ = noise."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    spectrum = torch.linspace(mu, L, d, dtype=torch.float64) if d > 1 else torch.tensor([mu])
    C = torch.diag(spectrum.sqrt()) @ basis.T  # CᵀC = basis·diag(spectrum)·basisᵀ
    w_true = torch.randn(d, generator=g, dtype=torch.float64)
    y = w_true @ C.T + noise * torch.randn(n, d, generator=g, dtype=torch.float64)
    H = C.T @ C
    z = y @ C  # row i is Cᵀ y_i
    z_bar = z.mean(dim=0)
    v = ((z - z_bar) ** 2).sum(dim=1).mean().item()
    return LeastSquares(
        H=H,
        z=z,
        w_star=torch.linalg.solve(H, z_bar),
        batch=batch,
        mu=float(spectrum.min()),
        L=float(spectrum.max()),
        noise_second_moment=v / batch,
    )


@dataclass(frozen=True)
class Logistic:
    """ℓ2-regularised logistic regression: F(w) = (1/n) Σ_i log(1 + e^{−y_i x_iᵀw}) + (λ/2)‖w‖².

    Labels y_i ∈ {±1}. ∇f_i(w) = −y_i s(−y_i x_iᵀw) x_i + λ w with s the sigmoid, so
    ‖∇f_i(w)‖ ≤ ‖x_i‖ + λ‖w‖. The constants:

    - μ = λ (the data term is convex with curvature that vanishes far from the data);
    - L₂ = max|ℓ'''| · sup_{‖u‖=1} (1/n) Σ_i |x_iᵀu| ‖x_i‖²
      ≤ (1/(6√3)) · √λ_max(XᵀX/n) · √((1/n) Σ_i ‖x_i‖⁴) (Cauchy–Schwarz);
    - over ‖w − w*‖ ≤ D, E‖∇f̃(w)‖² ≤ (max_i ‖x_i‖ + λ(‖w*‖ + D))².

    w* is found by Newton's method to machine precision; F* = F(w*).
    """

    X: torch.Tensor  # (n, d)
    y: torch.Tensor  # (n,) in {±1}
    lam: float
    w_star: torch.Tensor
    f_star: float
    batch: int
    L2: float
    name: str = "logistic"

    @property
    def d(self) -> int:
        return self.X.shape[1]

    @property
    def mu(self) -> float:
        return self.lam

    def loss(self, w: torch.Tensor) -> torch.Tensor:
        """F(w) per row of w (R, d), shape (R,)."""
        return _logistic_loss(self.X, self.y, self.lam, w)

    def stochastic_gradient(self, w: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(1/B) Σ_{i∈B} −y_i s(−y_i x_iᵀw) x_i + λ w for each row of w (R, d)."""
        idx = _rows(self.X.shape[0], self.batch, generator, w.shape[0])
        x = self.X[idx]  # (R, B, d)
        y = self.y[idx]  # (R, B)
        margins = torch.einsum("rbd,rd->rb", x, w) * y
        coef = -y * torch.sigmoid(-margins)
        return torch.einsum("rb,rbd->rd", coef, x) / self.batch + self.lam * w

    def suboptimality(self, w: torch.Tensor) -> torch.Tensor:
        """F(w) − F* per row, shape (R,)."""
        return self.loss(w) - self.f_star

    def gradient_bound(self, D: float) -> float:
        """G = max_i ‖x_i‖ + λ(‖w*‖ + D), a bound on ‖∇f̃‖ over ‖w − w*‖ ≤ D."""
        x_max = self.X.norm(dim=1).max().item()
        return x_max + self.lam * (self.w_star.norm().item() + D)


def _logistic_loss(X: torch.Tensor, y: torch.Tensor, lam: float, w: torch.Tensor) -> torch.Tensor:
    margins = (w @ X.T) * y  # (R, n)
    return torch.nn.functional.softplus(-margins).mean(dim=1) + 0.5 * lam * (w * w).sum(dim=1)


def _newton_optimum(X: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
    """Minimiser of the regularised logistic loss; Newton converges quadratically from 0."""
    n, d = X.shape
    w = torch.zeros(d, dtype=X.dtype)
    for _ in range(100):
        m = y * (X @ w)
        s = torch.sigmoid(-m)
        grad = -(X.T @ (y * s)) / n + lam * w
        hess = (X.T * (s * (1 - s))) @ X / n + lam * torch.eye(d, dtype=X.dtype)
        step = torch.linalg.solve(hess, grad)
        w = w - step
        if step.norm() < 1e-14 * (1 + w.norm()):
            break
    return w


def logistic(
    d: int,
    n: int = 512,
    batch: int = 1,
    lam: float = 0.1,
    teacher_norm: float = 2.0,
    seed: int = 0,
) -> Logistic:
    """A generated `Logistic` problem.

    Features lie on the sphere of radius √d (coordinates of unit scale, ‖x_i‖ = √d exactly);
    labels follow a logistic teacher: P(y_i = 1) = s(x_iᵀw°) with ‖w°‖ = teacher_norm.
    """
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    X = X / X.norm(dim=1, keepdim=True) * math.sqrt(d)
    teacher = torch.randn(d, generator=g, dtype=torch.float64)
    teacher = teacher / teacher.norm() * teacher_norm
    p = torch.sigmoid(X @ teacher)
    y = torch.where(torch.rand(n, generator=g, dtype=torch.float64) < p, 1.0, -1.0)
    y = y.to(torch.float64)
    w_star = _newton_optimum(X, y, lam)
    gram_max = torch.linalg.eigvalsh(X.T @ X / n).max().item()
    fourth = (X.norm(dim=1) ** 4).mean().item()
    return Logistic(
        X=X,
        y=y,
        lam=lam,
        w_star=w_star,
        f_star=_logistic_loss(X, y, lam, w_star[None])[0].item(),
        batch=batch,
        L2=_LOGISTIC_THIRD_DERIVATIVE * math.sqrt(gram_max * fourth),
    )


def make_problem(name: str, d: int, seed: int = 0) -> LeastSquares | Logistic:
    """The experiment's problems by name: 'least_squares' or 'logistic'."""
    if name == "least_squares":
        return least_squares(d, seed=seed)
    if name == "logistic":
        return logistic(d, seed=seed)
    raise UserError(f"unknown problem {name!r}; use 'least_squares' or 'logistic'")
