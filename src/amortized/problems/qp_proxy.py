"""QP proxies on DC3's "simple" family (Donti, Rolnick, Kolter, ICLR 2021), regenerated.

    minimize_y ½ yᵀQy + pᵀy   subject to   A y = x,   G y ≤ h,

with n = 100 variables, q = 50 equalities whose right-hand side is the context
x ~ U[−1, 1]^q, m = 50 inequalities; Q = diag(U[0, 1]), p ~ U[0, 1]^n, A, G ~ N(0, 1) and
h_i = Σ_j |(G A⁺)_ij| (which keeps every instance feasible). The data come from numpy's
legacy RandomState(seed) in DC3's order (Q, p, A, X, G, h); with seed 17 this reproduces
DC3's instances, whose test split (the last 833 of 10,000) has mean optimum −15.047.

Besides the problem this module holds the pieces of the proxies compared in
`amortized amortize qp-proxy`: DC3's gradient correction of the inequalities (a refiner on
the partial variables behind `EqualityCompletion`), and `ActiveSetRefiner`, which runs the
primal-dual active-set method of `amortized.qp.ActiveSetQP` from the active set the model's
prediction implies; its fixed point satisfies the KKT conditions exactly.
"""

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

import amortized as am
from amortized.qp import ActiveSetQP


@dataclass
class QPProxyProblem:
    """A parametric QP family with fixed Q (n, n), p (n,), A (q, n), G (m, n), h (m,) and
    context x = b (B, q); X (N, q) the generated instances (train | valid | test in order).
    """

    Q: Tensor
    p: Tensor
    A: Tensor
    G: Tensor
    h: Tensor
    X: Tensor
    eps: float | None = None  # solve_qp tolerance (default from the dtype)

    def __post_init__(self):
        self.context_dim, self.solution_dim = self.A.shape
        if int(torch.linalg.cholesky_ex(self.Q).info):
            raise ValueError("QPProxyProblem needs Q positive definite")

    # ---- the Problem protocol
    def objective(self, y: Tensor, x: Tensor) -> Tensor:
        """(B,) ½ yᵀQy + pᵀy for y (B, n)."""
        return 0.5 * ((y @ self.Q) * y).sum(-1) + y @ self.p

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n fresh contexts x ~ U[−1, 1]^q."""
        return torch.rand(n, self.context_dim, generator=generator, dtype=self.A.dtype) * 2 - 1

    def constraint_violation(self, y: Tensor, x: Tensor) -> dict[str, Tensor]:
        """{"eq": |A y − x| (B, q), "ineq": max(G y − h, 0) (B, m)}."""
        return {"eq": (y @ self.A.T - x).abs(), "ineq": (y @ self.G.T - self.h).clamp_min(0)}

    def solve(self, x: Tensor, warm_start: Tensor | None = None) -> Tensor:
        """Exact batched solve with `am.solve_qp` (primal-dual interior point)."""
        return self.solve_full(x, warm_start=warm_start).z

    def solve_full(self, x: Tensor, **kw) -> "am.QPSolution":
        return am.solve_qp(self.Q, self.p, self.G, self.h, self.A, x, eps=self.eps, **kw)

    # ---- data
    def split(self, valid_frac: float = 0.0833, test_frac: float = 0.0833) -> tuple[Tensor, Tensor, Tensor]:
        """DC3's split of X in order: train, valid, test (the last int(N·test_frac))."""
        N = self.X.shape[0]
        n_test, n_valid = int(N * test_frac), int(N * valid_frac)
        n_train = N - n_test - n_valid
        return self.X[:n_train], self.X[n_train : n_train + n_valid], self.X[n_train + n_valid :]

    def clarabel(self, x: Tensor) -> Tensor:
        """Reference solutions with cvxpy + Clarabel at tight tolerances, one at a time."""
        import cvxpy as cp

        Q, p, A, G, h = (t.detach().cpu().double().numpy() for t in (self.Q, self.p, self.A, self.G, self.h))
        out = []
        for b in x.detach().cpu().double().numpy():
            y = cp.Variable(Q.shape[0])
            cp.Problem(
                cp.Minimize(0.5 * cp.quad_form(y, cp.psd_wrap(Q)) + p @ y), [A @ y == b, G @ y <= h]
            ).solve(solver="CLARABEL", tol_feas=1e-10, tol_gap_abs=1e-10, tol_gap_rel=1e-10)
            out.append(y.value)
        return torch.tensor(np.stack(out), dtype=x.dtype, device=x.device)


def dc3_simple(
    seed: int = 17,
    n: int = 100,
    n_eq: int = 50,
    n_ineq: int = 50,
    n_examples: int = 10_000,
    dtype: torch.dtype = torch.float64,
) -> QPProxyProblem:
    """DC3's "simple" family, generated in DC3's order (see the module docstring)."""
    if min(n, n_eq, n_ineq, n_examples) < 1 or n_eq >= n:
        raise ValueError("need positive sizes and fewer equalities than variables")
    rng = np.random.RandomState(seed)
    Q = np.diag(rng.random_sample(n))
    p = rng.random_sample(n)
    A = rng.normal(0.0, 1.0, size=(n_eq, n))
    X = rng.uniform(-1, 1, size=(n_examples, n_eq))
    G = rng.normal(0.0, 1.0, size=(n_ineq, n))
    h = np.abs(G @ np.linalg.pinv(A)).sum(axis=1)
    t = lambda a: torch.tensor(a, dtype=dtype)
    return QPProxyProblem(t(Q), t(p), t(A), t(G), t(h), t(X))


class DC3Correction:
    """DC3's correction: gradient steps with momentum on the partial variables y_p,

        y_p ← y_p − lr · ∇_{y_p} ‖max(G y(y_p) − h, 0)‖²,   y(y_p) = completion(y_p, x),

    so the equalities stay exact while the inequality violation shrinks. A refiner
    (see `amortize.refine`); the objective argument is ignored, as in DC3.
    """

    def __init__(self, problem: QPProxyProblem, completion, lr: float = 1e-7, momentum: float = 0.5):
        self.problem, self.completion, self.lr, self.momentum = problem, completion, lr, momentum

    def __call__(
        self, objective, y0: Tensor, x: Tensor, steps: int, *, create_graph: bool = True
    ) -> list[Tensor]:
        G, h, comp = self.problem.G, self.problem.h, self.completion
        y = y0 if create_graph else y0.detach()
        ys = [y]
        y_p = y[:, comp.partial]
        velocity = torch.zeros_like(y_p)
        for _ in range(steps):
            with torch.enable_grad():
                yp = y_p if y_p.requires_grad else y_p.detach().requires_grad_()
                viol = (comp.complete(yp, x) @ G.T - h).clamp_min(0).square().sum()
                (g,) = torch.autograd.grad(viol, yp, create_graph=create_graph)
            velocity = self.momentum * velocity + g
            y_p = y_p - self.lr * velocity
            y = comp.complete(y_p, x)
            ys.append(y if create_graph else y.detach())
        return ys


class ActiveSetRefiner:
    """Refiner: primal-dual active-set steps (`amortized.qp.ActiveSetQP`) from the prediction.

    The start is the active set the predicted y implies, {i : G_i y − h_i > −tol_active}; the
    family's shared Q, p, G, h, A are factored once, the context x is the right side b.
    `last_status` holds a (B,) bool mask of the problems whose final point passed the KKT
    check, `last_steps` (B,) the steps each used. The steps are differentiable w.r.t. x for
    a fixed active set, so they can be unrolled in training (create_graph=True).
    """

    def __init__(
        self,
        problem: QPProxyProblem,
        *,
        c: float = 1.0,
        tol_active: float = 0.0,
        tol: float | None = None,
    ):
        P = problem
        self.problem, self.tol_active = problem, tol_active
        self.qp = ActiveSetQP(P.Q, P.p, P.G, P.h, P.A, c=c, tol=tol)
        self.last_status: Tensor | None = None
        self.last_steps: Tensor | None = None

    def __call__(
        self, objective, y0: Tensor, x: Tensor, steps: int, *, create_graph: bool = True
    ) -> list[Tensor]:
        with torch.set_grad_enabled(create_graph and torch.is_grad_enabled()):
            y0 = y0 if create_graph else y0.detach()
            res = self.qp.solve(x, y0, max_steps=steps, tol_active=self.tol_active)
        self.last_status, self.last_steps = res.solved, res.steps
        return res.iterates


def solve_with_fallback(
    problem: QPProxyProblem, refiner: ActiveSetRefiner, y_pred: Tensor, x: Tensor, steps: int
) -> tuple[Tensor, Tensor]:
    """Active-set steps from y_pred, then the exact solver, warm-started from the prediction,
    on the problems whose KKT check failed. Returns y (B, n) and the (B,) fallback mask.
    """
    y = refiner(problem.objective, y_pred, x, steps, create_graph=False)[-1]
    bad = ~refiner.last_status
    if bool(bad.any()):
        idx = bad.nonzero().flatten()
        y = y.clone()
        y[idx] = problem.solve(x[idx], warm_start=y_pred[idx])
    return y, bad


class ActiveSetWithFallback:
    """Refiner "ours": active-set steps from the prediction, then the exact solver warm-started
    from the prediction on any problem whose KKT check failed. Returns [y0, y]; the (B,)
    fallback mask of the last call is in `last_fallback`.
    """

    def __init__(self, problem: QPProxyProblem, **kw):
        self.problem, self.active_set = problem, ActiveSetRefiner(problem, **kw)
        self.last_fallback: Tensor | None = None

    def __call__(
        self, objective, y0: Tensor, x: Tensor, steps: int, *, create_graph: bool = False
    ) -> list[Tensor]:
        y, self.last_fallback = solve_with_fallback(self.problem, self.active_set, y0.detach(), x, steps)
        return [y0, y]


class WarmStartedSolve:
    """Refiner: the exact batched solve (`am.solve_qp`) warm-started at the prediction.

    Returns [y0, y*]; `steps` only switches it on (any steps ≥ 1 run one full solve).
    """

    def __init__(self, problem: QPProxyProblem):
        self.problem = problem

    def __call__(
        self, objective, y0: Tensor, x: Tensor, steps: int, *, create_graph: bool = False
    ) -> list[Tensor]:
        return [y0, self.problem.solve(x, warm_start=y0.detach())]
