"""Batched solvers against independent references (scipy, closed forms), per-problem masks,
status codes and gradient modes."""

import numpy as np
import pytest
import scipy.optimize
import torch

import amortized as am
from amortized import solvers

F64 = torch.float64


def logistic_problem(B=6, m=40, n=5, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(B, m, n, generator=g, dtype=F64).to(dtype)
    t = (torch.rand(B, m, generator=g, dtype=F64) < 0.5).to(dtype)
    lam = (torch.rand(B, generator=g, dtype=F64) + 0.1).to(dtype)
    return X, t, lam


def logistic_f(w, X, t, lam):
    z = (X @ w.unsqueeze(-1)).squeeze(-1)
    return torch.nn.functional.binary_cross_entropy_with_logits(z, t, reduction="none").sum(
        -1
    ) + 0.5 * lam * w.square().sum(-1)


def scipy_reference(X, t, lam):
    out = []
    data = zip(X.double().numpy(), t.double().numpy(), lam.double().numpy(), strict=True)
    for Xb, tb, lb in data:

        def fun(w, Xb=Xb, tb=tb, lb=lb):
            z = Xb @ w
            return np.logaddexp(0, z).sum() - tb @ z + 0.5 * lb * w @ w, Xb.T @ (
                1 / (1 + np.exp(-z)) - tb
            ) + lb * w

        r = scipy.optimize.minimize(
            fun,
            np.zeros(Xb.shape[1]),
            jac=True,
            method="L-BFGS-B",
            options={"gtol": 1e-12, "ftol": 1e-15, "maxiter": 10000},
        )
        out.append(r.x)
    return torch.tensor(np.stack(out))


@pytest.mark.parametrize(
    "name,opts,tol",
    [
        ("lbfgs", {}, 1e-7),
        ("newton", {}, 1e-7),
        ("gd", {"lr": 0.02, "max_iter": 5000}, 1e-7),
        ("adam", {"lr": 0.01, "max_iter": 5000, "tol": 1e-6}, 1e-5),
    ],
)
def test_minimizers_match_scipy(name, opts, tol):
    X, t, lam = logistic_problem()
    sol = am.argmin(logistic_f, torch.zeros(6, 5, dtype=F64), X, t, lam, solver=name, **opts)
    assert sol.solved.all(), sol.status
    torch.testing.assert_close(sol.y, scipy_reference(X, t, lam), rtol=tol, atol=tol)
    assert sol.history.shape[1] == 6 and (sol.iters <= sol.history.shape[0]).all()


@pytest.mark.parametrize("name", ["lbfgs", "newton"])
def test_float32_minimizers_accurate(name):
    X, t, lam = logistic_problem(dtype=torch.float32)
    sol = am.argmin(logistic_f, torch.zeros(6, 5), X, t, lam, solver=name)
    assert sol.y.dtype == torch.float32 and sol.solved.all()
    torch.testing.assert_close(sol.y.double(), scipy_reference(X, t, lam), rtol=1e-4, atol=1e-4)


def test_per_problem_masks_and_numerical_status():
    """A problem with NaN data is reported NUMERICAL and keeps a finite iterate; the others
    solve exactly as they would alone; a converged problem stops counting iterations."""
    X, t, lam = logistic_problem()
    Xbad = X.clone()
    Xbad[2, 0, 0] = float("nan")
    sol = am.argmin(logistic_f, torch.zeros(6, 5, dtype=F64), Xbad, t, lam, solver="newton")
    assert sol.status[2] == am.SolverStatus.NUMERICAL
    good = [0, 1, 3, 4, 5]
    assert (sol.status[good] == am.SolverStatus.SOLVED).all()
    alone = am.argmin(logistic_f, torch.zeros(5, 5, dtype=F64), X[good], t[good], lam[good], solver="newton")
    torch.testing.assert_close(sol.y[good], alone.y)
    torch.testing.assert_close(sol.iters[good], alone.iters)


def test_max_iter_status_and_message():
    X, t, lam = logistic_problem()
    sol = solvers.gradient_descent(logistic_f, torch.zeros(6, 5, dtype=F64), X, t, lam, lr=1e-3, max_iter=3)
    assert (sol.status == am.SolverStatus.MAX_ITER).all() and (sol.iters == 3).all()
    assert "max_iter" in am.SolverStatus.MAX_ITER.message


def test_newton_handles_nonconvex_start():
    """Rosenbrock (non-convex): the damped Newton step and line search still reach (1, 1)."""
    f = lambda y, a: (a - y[:, 0]) ** 2 + 100 * (y[:, 1] - y[:, 0] ** 2) ** 2
    y0 = torch.tensor([[-1.2, 1.0], [0.0, 0.0], [2.0, -1.0]], dtype=F64)
    sol = solvers.newton(f, y0, torch.tensor(1.0, dtype=F64), max_iter=200)
    assert sol.solved.all()
    torch.testing.assert_close(sol.y, torch.ones(3, 2, dtype=F64), rtol=1e-7, atol=1e-7)


def linear_fixed_point(B=5, n=7, seed=1, rho=0.7):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(B, n, n, generator=g, dtype=F64)
    M = rho * M / torch.linalg.matrix_norm(M, ord=2)[:, None, None]
    c = torch.randn(B, n, generator=g, dtype=F64)
    return M, c


@pytest.mark.parametrize("name", ["anderson", "broyden", "iteration"])
def test_fixed_point_solvers_match_closed_form(name):
    M, c = linear_fixed_point()
    T = lambda y, M, c: (M @ y.unsqueeze(-1)).squeeze(-1) + c
    sol = am.fixed_point(T, torch.zeros_like(c), M, c, solver=name, max_iter=500, tol=1e-13)
    assert sol.solved.all()
    ref = torch.linalg.solve(torch.eye(7, dtype=F64) - M, c.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(sol.y, ref, rtol=1e-10, atol=1e-11)
    # gradient w.r.t. M and c three ways is in test_implicit; here: the closed form.
    Mi, ci = M.clone().requires_grad_(), c.clone().requires_grad_()
    y = am.fixed_point(T, torch.zeros_like(c), Mi, ci, solver=name, max_iter=500, tol=1e-13).y
    gM, gc = torch.autograd.grad(y.sum(), (Mi, ci))
    Mr, cr = M.clone().requires_grad_(), c.clone().requires_grad_()
    yr = torch.linalg.solve(torch.eye(7, dtype=F64) - Mr, cr.unsqueeze(-1)).squeeze(-1)
    gMr, gcr = torch.autograd.grad(yr.sum(), (Mr, cr))
    torch.testing.assert_close(gM, gMr, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(gc, gcr, rtol=1e-9, atol=1e-10)


def test_anderson_faster_than_plain_iteration():
    M, c = linear_fixed_point(rho=0.95)
    M = 0.5 * (M + M.mT)  # symmetric: spectral radius = norm, so plain iteration is slow
    M = 0.95 * M / torch.linalg.matrix_norm(M, ord=2)[:, None, None]
    T = lambda y, M, c: (M @ y.unsqueeze(-1)).squeeze(-1) + c
    a = am.fixed_point(T, torch.zeros_like(c), M, c, solver="anderson", max_iter=1000)
    p = am.fixed_point(T, torch.zeros_like(c), M, c, solver="iteration", max_iter=2000)
    assert a.solved.all() and p.solved.all()
    assert a.iters.max() * 3 < p.iters.max()


def test_truncated_mode_differs_from_implicit_and_approaches_it():
    """Truncated backprop through K plain iterations of a contraction with rate ρ has error
    O(ρ^K) (K = 1: Jacobian-free backprop)."""
    M, c = linear_fixed_point(rho=0.5)
    T = lambda y, M, c: (M @ y.unsqueeze(-1)).squeeze(-1) + c
    ci = c.clone().requires_grad_()
    (g_imp,) = torch.autograd.grad(am.fixed_point(T, torch.zeros_like(c), M, ci).y.sum(), ci)
    errs = []
    for K in (1, 5, 20):
        ck = c.clone().requires_grad_()
        y = am.fixed_point(T, torch.zeros_like(c), M, ck, solver="iteration", grad="truncated", truncate=K).y
        (g,) = torch.autograd.grad(y.sum(), ck)
        errs.append(float((g - g_imp).abs().max()))
    assert errs[0] > errs[1] > errs[2]
    assert errs[0] > 1e-2 and errs[2] < 1e-5 * errs[0]


def test_unroll_tracks_every_iteration():
    X, t, lam = logistic_problem()
    lam_u = lam.clone().requires_grad_()
    sol = solvers.gradient_descent(
        logistic_f,
        torch.zeros(6, 5, dtype=F64),
        X,
        t,
        lam_u,
        lr=0.02,
        max_iter=5,
        tol=0.0,
        grad="unroll",
    )
    # Five explicit steps: compare with a hand-written unrolled loop.
    lam_r = lam.clone().requires_grad_()
    w = torch.zeros(6, 5, dtype=F64, requires_grad=True)
    for _ in range(5):
        (gw,) = torch.autograd.grad(logistic_f(w, X, t, lam_r).sum(), w, create_graph=True)
        w = w - 0.02 * gw
    torch.testing.assert_close(sol.y, w)
    torch.testing.assert_close(
        torch.autograd.grad(sol.y.sum(), lam_u)[0], torch.autograd.grad(w.sum(), lam_r)[0]
    )


def test_solver_bad_options():
    X, t, lam = logistic_problem()
    y0 = torch.zeros(6, 5, dtype=F64)
    with pytest.raises(ValueError, match="lr must be positive"):
        solvers.gradient_descent(logistic_f, y0, X, t, lam, lr=0)
    with pytest.raises(ValueError, match="max_iter"):
        solvers.lbfgs(logistic_f, y0, X, t, lam, max_iter=0)
    with pytest.raises(TypeError, match="floating point"):
        solvers.lbfgs(logistic_f, y0.long(), X, t, lam)
    with pytest.raises(ValueError, match="beta"):
        solvers.anderson(lambda y: y, y0, beta=0.0)


def test_callback_sees_every_iteration():
    X, t, lam = logistic_problem()
    seen = []
    sol = solvers.newton(
        logistic_f,
        torch.zeros(6, 5, dtype=F64),
        X,
        t,
        lam,
        callback=lambda k, y, res: seen.append((k, float(res.max()))),
    )
    assert [k for k, _ in seen] == list(range(len(seen))) and len(seen) == sol.history.shape[0]
    assert seen[-1][1] == float(sol.residual.max())


def test_truncated_gradient_descent_matches_its_closed_form():
    """grad="truncated" on ridge regression: K steps w ← w − η(A w − Xᵀt) (A = XᵀX + λI) from
    the detached solution w* give dw_K/dλ = −(I − (I − ηA)^K) A⁻¹ w*, which tends to the
    implicit −A⁻¹ w* as K grows."""
    g = torch.Generator().manual_seed(23)
    B, m, n = 3, 10, 4
    X = torch.randn(B, m, n, generator=g, dtype=F64)
    t = torch.randn(B, m, generator=g, dtype=F64)
    lam = torch.rand(B, generator=g, dtype=F64) + 0.5
    f = lambda w, X, t, lam: (
        0.5 * ((X @ w.unsqueeze(-1)).squeeze(-1) - t).square().sum(-1) + (0.5 * lam * w.square().sum(-1))
    )
    A = X.mT @ X + lam[:, None, None] * torch.eye(n, dtype=F64)
    w = torch.linalg.solve(A, (X.mT @ t.unsqueeze(-1)).squeeze(-1))
    lr = float(1 / torch.linalg.eigvalsh(A).amax())
    c = torch.randn(B, n, generator=g, dtype=F64)
    for K in (1, 3, 10):
        lam_k = lam.clone().requires_grad_()
        sol = solvers.gradient_descent(
            f, torch.zeros(B, n, dtype=F64), X, t, lam_k, lr=lr, max_iter=20000, grad="truncated", truncate=K
        )
        assert sol.solved.all()
        (g_trunc,) = torch.autograd.grad((sol.y * c).sum(), lam_k)
        P = torch.linalg.matrix_power(torch.eye(n, dtype=F64) - lr * A, K)
        dw = -((torch.eye(n, dtype=F64) - P) @ torch.linalg.solve(A, w.unsqueeze(-1))).squeeze(-1)
        torch.testing.assert_close(g_trunc, (dw * c).sum(-1), rtol=1e-7, atol=1e-9)


def test_newton_hands_its_last_factor_to_the_implicit_backward():
    """Newton keeps the Cholesky factor of its last step as sol.precond; the implicit CG
    preconditioned by it needs at most two matvecs instead of about n, and the gradient is
    the same as without it and as unrolled Newton's."""
    X, t, lam = logistic_problem(n=12, seed=11)
    y0 = torch.zeros(6, 12, dtype=F64)
    c = torch.randn(6, 12, generator=torch.Generator().manual_seed(12), dtype=F64)

    def grad_and_matvecs(**opts):
        calls = []

        def counting_cg(matvec, r, precond=None):
            return am.implicit.linear_solve.cg(lambda v: calls.append(1) or matvec(v), r, precond=precond)

        lam_r = lam.clone().requires_grad_()
        sol = solvers.newton(logistic_f, y0, X, t, lam_r, tol=1e-12, solve=counting_cg, **opts)
        (g,) = torch.autograd.grad((sol.y * c).sum(), lam_r)
        return sol, g, len(calls)

    sol, g_pc, n_pc = grad_and_matvecs()
    sol_plain, g_plain, n_plain = grad_and_matvecs(precondition=False)
    assert sol.precond is not None and sol_plain.precond is None
    assert sol.precond.tensors[0].shape == (6, 12, 12)
    assert n_pc <= 2 < 8 <= n_plain
    lam_u = lam.clone().requires_grad_()
    sol_u = solvers.newton(logistic_f, y0, X, t, lam_u, tol=1e-13, grad="unroll")
    (g_unroll,) = torch.autograd.grad((sol_u.y * c).sum(), lam_u)
    torch.testing.assert_close(g_pc, g_plain, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(g_pc, g_unroll, rtol=1e-8, atol=1e-10)


def test_newton_started_at_the_solution_hands_over_the_exact_hessian():
    """No iteration counts, but the driver's one (frozen) step factors the Hessian at y* itself:
    sol.precond is exact, the backward takes one matvec, and the gradient is unrolled Newton's."""
    X, t, lam = logistic_problem(seed=13)
    y_star = solvers.newton(logistic_f, torch.zeros(6, 5, dtype=F64), X, t, lam, tol=1e-13).y.detach()
    lam_r = lam.clone().requires_grad_()
    calls = []

    def counting_cg(matvec, r, precond=None):
        return am.implicit.linear_solve.cg(lambda v: calls.append(1) or matvec(v), r, precond=precond)

    sol = solvers.newton(logistic_f, y_star, X, t, lam_r, tol=1e-6, solve=counting_cg)
    assert sol.iters.max() == 0
    (L,) = sol.precond.tensors
    H = solvers.hessian(logistic_f, (X, t, lam), y_star)
    torch.testing.assert_close(L @ L.mT, H, rtol=1e-12, atol=1e-12)
    (g,) = torch.autograd.grad(sol.y.sum(), lam_r)
    assert len(calls) == 1
    lam_u = lam.clone().requires_grad_()
    sol_u = solvers.newton(logistic_f, torch.zeros(6, 5, dtype=F64), X, t, lam_u, tol=1e-13, grad="unroll")
    (g_u,) = torch.autograd.grad(sol_u.y.sum(), lam_u)
    torch.testing.assert_close(g, g_u, rtol=1e-8, atol=1e-10)
