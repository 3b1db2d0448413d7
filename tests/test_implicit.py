"""Implicit differentiation: each gradient three ways (implicit, unrolled, central finite
differences along a random direction) plus closed forms, gradcheck and torch.func."""

import numpy as np
import pytest
import torch

import amortized as am
from amortized.implicit import custom_fixed_point, custom_root
from amortized.linalg import linear_solve
from amortized.solvers import gradient_descent

F64 = torch.float64


def ridge_data(B=4, m=12, n=5, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(B, m, n, generator=g, dtype=F64)
    t = torch.randn(B, m, generator=g, dtype=F64)
    lam = torch.rand(B, generator=g, dtype=F64) + 0.5
    return X.to(dtype), t.to(dtype), lam.to(dtype)


def ridge_f(w, X, t, lam):
    """½‖Xw − t‖² + ½λ‖w‖², per problem."""
    return 0.5 * ((X @ w.unsqueeze(-1)).squeeze(-1) - t).square().sum(-1) + 0.5 * lam * w.square().sum(-1)


def _ridge_unrolled_grad(X, t, lam, outer):
    """d outer(y*)/dλ by unrolling 4,000 gradient-descent steps (step 1/L) on ridge_f."""
    lam_u = lam.clone().requires_grad_()
    L = torch.linalg.matrix_norm(X, ord=2).amax() ** 2 + 2
    sol_u = gradient_descent(
        ridge_f,
        torch.zeros(4, 5, dtype=F64),
        X,
        t,
        lam_u,
        lr=float(1 / L),
        max_iter=4000,
        tol=1e-13,
        grad="unroll",
    )
    return torch.autograd.grad(outer(sol_u.y), lam_u)[0]


def ridge_closed_form(X, t, lam):
    n = X.shape[-1]
    A = X.mT @ X + lam[:, None, None] * torch.eye(n, dtype=X.dtype)
    return torch.linalg.solve(A, (X.mT @ t.unsqueeze(-1)).squeeze(-1)), A


def central_fd(fun, x, direction, h=1e-5):
    return (fun(x + h * direction) - fun(x - h * direction)) / (2 * h)


def test_ridge_hypergradient_three_ways_and_closed_form():
    X, t, lam = ridge_data()
    target = torch.randn(4, 5, generator=torch.Generator().manual_seed(1), dtype=F64)
    outer = lambda w: (w - target).square().sum()

    # Closed form: dw/dλ = −A⁻¹ w per problem.
    w, A = ridge_closed_form(X, t, lam)
    dw = -torch.linalg.solve(A, w)
    g_closed = (2 * (w - target) * dw).sum(-1)

    lam_i = lam.clone().requires_grad_()
    sol = am.argmin(ridge_f, torch.zeros(4, 5, dtype=F64), X, t, lam_i, solver="newton")
    assert sol.solved.all()
    (g_impl,) = torch.autograd.grad(outer(sol.y), lam_i)

    g_unroll = _ridge_unrolled_grad(X, t, lam, outer)

    d = torch.randn(4, generator=torch.Generator().manual_seed(2), dtype=F64)
    fd = central_fd(lambda l: outer(ridge_closed_form(X, t, l)[0]), lam, d)

    torch.testing.assert_close(g_impl, g_closed, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(g_unroll, g_closed, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close((g_impl * d).sum(), fd, rtol=1e-7, atol=1e-9)


def logistic_f(w, X, t, log_lam):
    z = (X @ w.unsqueeze(-1)).squeeze(-1)
    nll = torch.nn.functional.binary_cross_entropy_with_logits(z, t, reduction="none").sum(-1)
    return nll + 0.5 * log_lam.exp() * w.square().sum(-1)


@pytest.mark.parametrize("solver", ["newton", "lbfgs"])
def test_logistic_regression_hypergradient_three_ways(solver):
    g = torch.Generator().manual_seed(3)
    B, m, n = 5, 40, 6
    X = torch.randn(B, m, n, generator=g, dtype=F64)
    t = (torch.rand(B, m, generator=g, dtype=F64) < 0.5).to(F64)
    Xv = torch.randn(B, m, n, generator=g, dtype=F64)
    tv = (torch.rand(B, m, generator=g, dtype=F64) < 0.5).to(F64)
    log_lam = torch.randn(B, generator=g, dtype=F64) * 0.3

    def val_loss(w):  # validation loss of the trained weights: the hyperparameter objective
        z = (Xv @ w.unsqueeze(-1)).squeeze(-1)
        return torch.nn.functional.binary_cross_entropy_with_logits(z, tv, reduction="sum")

    y0 = torch.zeros(B, n, dtype=F64)
    ll = log_lam.clone().requires_grad_()
    sol = am.argmin(logistic_f, y0, X, t, ll, solver=solver)
    assert sol.solved.all()
    (g_impl,) = torch.autograd.grad(val_loss(sol.y), ll)

    ll_u = log_lam.clone().requires_grad_()
    sol_u = am.argmin(logistic_f, y0, X, t, ll_u, solver="newton", grad="unroll", tol=1e-13)
    (g_unroll,) = torch.autograd.grad(val_loss(sol_u.y), ll_u)

    def solve_tight(l):
        return am.argmin(logistic_f, y0, X, t, l, solver="newton", tol=1e-13).y

    d = torch.randn(B, generator=g, dtype=F64)
    fd = central_fd(lambda l: val_loss(solve_tight(l)), log_lam, d, h=1e-5)
    torch.testing.assert_close(g_impl, g_unroll, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close((g_impl * d).sum(), fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("solve", ["gmres", "neumann", "bicgstab", "direct"])
def test_contractive_fixed_point_three_ways(solve):
    g = torch.Generator().manual_seed(4)
    B, n = 6, 8
    W = torch.randn(n, n, generator=g, dtype=F64)
    W = 0.6 * W / torch.linalg.matrix_norm(W, ord=2)  # tanh(W·) is a 0.6-contraction
    x = torch.randn(B, n, generator=g, dtype=F64)
    T = lambda y, W, x: torch.tanh(y @ W.T + x)
    outer = lambda y: (y * torch.linspace(-1, 1, n, dtype=F64)).sum()

    Wi, xi = W.clone().requires_grad_(), x.clone().requires_grad_()
    sol = am.fixed_point(T, torch.zeros(B, n, dtype=F64), Wi, xi, solve=solve, tol=1e-14, max_iter=200)
    assert sol.solved.all()
    gW, gx = torch.autograd.grad(outer(sol.y), (Wi, xi))

    Wu, xu = W.clone().requires_grad_(), x.clone().requires_grad_()
    sol_u = am.fixed_point(
        T,
        torch.zeros(B, n, dtype=F64),
        Wu,
        xu,
        solver="iteration",
        grad="unroll",
        tol=1e-15,
        max_iter=200,
    )
    gWu, gxu = torch.autograd.grad(outer(sol_u.y), (Wu, xu))

    dW = torch.randn(n, n, generator=g, dtype=F64)
    solve_fp = lambda W_: am.fixed_point(T, torch.zeros(B, n, dtype=F64), W_, x, tol=1e-15, max_iter=300).y
    fd = central_fd(lambda W_: outer(solve_fp(W_)), W, dW)
    torch.testing.assert_close(gW, gWu, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(gx, gxu, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close((gW * dW).sum(), fd, rtol=1e-7, atol=1e-9)


def _np_ridge_solver(init, X, t, lam):
    """A non-differentiable forward: numpy does the solve (autograd cannot see it)."""
    Xn, tn, ln = X.detach().numpy(), t.detach().numpy(), lam.detach().numpy()
    A = np.einsum("bmi,bmj->bij", Xn, Xn) + ln[:, None, None] * np.eye(Xn.shape[-1])
    w = np.linalg.solve(A, np.einsum("bmi,bm->bi", Xn, tn)[..., None])[..., 0]
    return torch.from_numpy(w)


def _ridge_grad(w, X, t, lam):
    return (X.mT @ ((X @ w.unsqueeze(-1)).squeeze(-1) - t).unsqueeze(-1)).squeeze(-1) + lam.unsqueeze(-1) * w


@pytest.mark.parametrize("solve", ["cg", "gmres", "bicgstab", "direct"])
def test_non_differentiable_forward_gets_exact_gradients(solve):
    X, t, lam = ridge_data(seed=5)
    solver = custom_root(_ridge_grad, solve=solve, symmetric=True)(_np_ridge_solver)
    args = [a.clone().requires_grad_() for a in (X, t, lam)]
    w = solver(None, *args)
    c = torch.randn_like(w)
    grads = torch.autograd.grad((w * c).sum(), args)
    ref_args = [a.clone().requires_grad_() for a in (X, t, lam)]
    ref = torch.autograd.grad((ridge_closed_form(*ref_args)[0] * c).sum(), ref_args)
    for a, b in zip(grads, ref, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("solve", ["cg", "gmres", "direct"])
def test_gradcheck_custom_root(solve):
    X, t, lam = ridge_data(B=2, m=6, n=3, seed=6)
    solver = custom_root(_ridge_grad, solve=solve, symmetric=True)(_np_ridge_solver)
    args = tuple(a.clone().requires_grad_() for a in (X, t, lam))
    assert torch.autograd.gradcheck(lambda *a: solver(None, *a), args)


def test_second_derivatives_through_custom_root_match_the_closed_form():
    """create_graph=True through a non-differentiable (numpy) forward: the Hessian-vector
    products of an outer loss w.r.t. (X, t, λ) match those of the closed form, and
    gradgradcheck passes (torch.func path: no closed-form products given)."""
    X, t, lam = ridge_data(B=2, m=6, n=3, seed=7)
    solver = custom_root(_ridge_grad, solve="gmres")(_np_ridge_solver)

    def hvp(fn, args, c, r):
        g = torch.autograd.grad((fn(*args) ** 3 * c).sum(), args, create_graph=True)
        return torch.autograd.grad(sum((gi * ri).sum() for gi, ri in zip(g, r, strict=True)), args)

    c = torch.randn(2, 3, dtype=F64)
    r = [torch.randn_like(a) for a in (X, t, lam)]
    ours = hvp(lambda *a: solver(None, *a), [a.clone().requires_grad_() for a in (X, t, lam)], c, r)
    ref = hvp(lambda *a: ridge_closed_form(*a)[0], [a.clone().requires_grad_() for a in (X, t, lam)], c, r)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)
    args = tuple(a.clone().requires_grad_() for a in (X, t, lam))
    assert torch.autograd.gradgradcheck(lambda *a: solver(None, *a), args)


def test_second_derivatives_with_an_integer_tensor_parameter():
    """An index tensor among the parameters (no gradient of its own) does not stop the
    second-order pass; the Hessian-vector product matches the closed form."""
    X, t, lam = ridge_data(B=2, m=6, n=3, seed=8)
    keep = torch.tensor([0, 2, 4, 5])  # the rows of X and t that enter the fit

    def grad_f(w, X, t, lam, rows):
        return _ridge_grad(w, X[:, rows], t[:, rows], lam)

    def np_solver(init, X, t, lam, rows):
        return _np_ridge_solver(init, X[:, rows], t[:, rows], lam)

    solver = custom_root(grad_f, solve="gmres")(np_solver)
    lam_ = lam.clone().requires_grad_()
    (g,) = torch.autograd.grad((solver(None, X, t, lam_, keep) ** 3).sum(), lam_, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), lam_)
    lam_r = lam.clone().requires_grad_()
    (g_r,) = torch.autograd.grad(
        (ridge_closed_form(X[:, keep], t[:, keep], lam_r)[0] ** 3).sum(), lam_r, create_graph=True
    )
    (h_r,) = torch.autograd.grad(g_r.sum(), lam_r)
    torch.testing.assert_close(h, h_r, rtol=1e-7, atol=1e-9)


def test_gradcheck_custom_fixed_point_neumann():
    g = torch.Generator().manual_seed(7)
    W = 0.5 * torch.randn(3, 3, generator=g, dtype=F64) / 3
    x = torch.randn(2, 3, generator=g, dtype=F64)
    T = lambda y, W, x: torch.tanh(y @ W.T + x)

    @custom_fixed_point(T, solve="neumann")
    def solver(y0, W, x):
        y = y0
        for _ in range(200):
            y = T(y, W, x)
        return y

    args = (W.requires_grad_(), x.requires_grad_())
    assert torch.autograd.gradcheck(lambda *a: solver(torch.zeros(2, 3, dtype=F64), *a), args)


def test_torch_func_grad_vmap_jacrev_through_decorated_solver():
    X, t, lam = ridge_data(seed=8)
    solver = custom_root(_ridge_grad, solve="cg")(_np_ridge_solver)
    loss = lambda l: solver(None, X, t, l).square().sum()
    ref_loss = lambda l: ridge_closed_form(X, t, l)[0].square().sum()

    torch.testing.assert_close(torch.func.grad(loss)(lam), torch.func.grad(ref_loss)(lam))
    lams = lam + torch.rand(3, 4, generator=torch.Generator().manual_seed(9), dtype=F64)
    torch.testing.assert_close(torch.func.vmap(loss)(lams), torch.stack([ref_loss(l) for l in lams]))
    torch.testing.assert_close(
        torch.func.vmap(torch.func.grad(loss))(lams),
        torch.stack([torch.func.grad(ref_loss)(l) for l in lams]),
    )
    jac = torch.func.jacrev(lambda l: solver(None, X, t, l))(lam)
    jac_ref = torch.func.jacrev(lambda l: ridge_closed_form(X, t, l)[0])(lam)
    torch.testing.assert_close(jac, jac_ref)


def test_torch_func_grad_through_argmin():
    X, t, lam = ridge_data(seed=10)
    loss = lambda l: am.argmin(ridge_f, torch.zeros(4, 5, dtype=F64), X, t, l, solver="newton").y.sum()
    ref = lambda l: ridge_closed_form(X, t, l)[0].sum()
    torch.testing.assert_close(torch.func.grad(loss)(lam), torch.func.grad(ref)(lam), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float32_and_float64_accuracy(dtype):
    X, t, lam = ridge_data(seed=11, dtype=dtype)
    lam = lam.clone().requires_grad_()
    sol = am.argmin(ridge_f, torch.zeros(4, 5, dtype=dtype), X, t, lam, solver="lbfgs")
    assert sol.y.dtype == dtype and sol.solved.all()
    (g,) = torch.autograd.grad(sol.y.sum(), lam)
    X64, t64, l64 = (a.detach().double() for a in (X, t, lam))
    l64.requires_grad_()
    (g_ref,) = torch.autograd.grad(ridge_closed_form(X64, t64, l64)[0].sum(), l64)
    tol = 1e-3 if dtype == torch.float32 else 1e-8
    torch.testing.assert_close(g.double(), g_ref, rtol=tol, atol=tol)


def test_implicit_root_with_refinement_matches_exact_solve():
    """implicit_root with an approximate structured solve (the QP pattern) is corrected by
    iterative refinement against the exact Jacobian."""
    X, t, lam = ridge_data(seed=12)
    w = ridge_closed_form(X, t, lam)[0]
    _, A = ridge_closed_form(X, t, lam)
    approx = torch.linalg.inv(A) * (1 + 1e-3)  # a slightly wrong factorization

    lam_r = lam.clone().requires_grad_()
    F = lambda w_, X_, t_, l_: (_ridge_grad(w_, X_, t_, l_),)
    solve_T = lambda v: ((approx @ v[0].unsqueeze(-1)).squeeze(-1),)
    (wr,) = am.implicit.implicit_root(F, solve_T, (w,), (X, t, lam_r), refine=3)
    (g,) = torch.autograd.grad(wr.sum(), lam_r)
    lam_c = lam.clone().requires_grad_()
    (g_ref,) = torch.autograd.grad(ridge_closed_form(X, t, lam_c)[0].sum(), lam_c)
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12)


def test_implicit_root_refinement_stops_at_refine_tol():
    """With refine_tol, refinement stops once a correction is that small relative to u:
    with a solve 1e-3 off, each step gains 1e3, so a tolerance of 1e-7 takes three of the
    ten steps allowed, and the gradient is as accurate as with all ten."""
    X, t, lam = ridge_data(seed=12)
    w = ridge_closed_form(X, t, lam)[0]
    _, A = ridge_closed_form(X, t, lam)
    approx = torch.linalg.inv(A) * (1 + 1e-3)
    calls = []

    def solve_T(v):
        calls.append(1)
        return ((approx @ v[0].unsqueeze(-1)).squeeze(-1),)

    F = lambda w_, X_, t_, l_: (_ridge_grad(w_, X_, t_, l_),)
    lam_c = lam.clone().requires_grad_()
    (g_ref,) = torch.autograd.grad(ridge_closed_form(X, t, lam_c)[0].sum(), lam_c)
    for refine_tol, n_solves in ((0.0, 11), (1e-7, 4)):
        calls.clear()
        lam_r = lam.clone().requires_grad_()
        (wr,) = am.implicit.implicit_root(F, solve_T, (w,), (X, t, lam_r), refine=10, refine_tol=refine_tol)
        (g,) = torch.autograd.grad(wr.sum(), lam_r)
        assert len(calls) == n_solves
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12)


def test_implicit_root_refine_tol_holds_for_every_problem():
    """refine_tol is tested problem by problem: a problem with a small u whose solve is
    1e-1 off (ten steps to 1e-7) is not stopped by a large one's fast convergence (1e-3
    off), as it was when the ∞-norms ran over the whole batch (three steps, its gradient 1e-4 off)."""
    X, t, lam = ridge_data(seed=12)
    w = ridge_closed_form(X, t, lam)[0]
    _, A = ridge_closed_form(X, t, lam)
    off = torch.tensor([1e-3, 1e-1, 1e-3, 1e-3], dtype=F64)[:, None, None]
    approx = torch.linalg.inv(A) * (1 + off)
    weight = torch.tensor([1.0, 1e-6, 1.0, 1.0], dtype=F64)[:, None]
    F = lambda w_, X_, t_, l_: (_ridge_grad(w_, X_, t_, l_),)
    solve_T = lambda v: ((approx @ v[0].unsqueeze(-1)).squeeze(-1),)
    lam_c = lam.clone().requires_grad_()
    (g_ref,) = torch.autograd.grad((ridge_closed_form(X, t, lam_c)[0] * weight).sum(), lam_c)
    lam_r = lam.clone().requires_grad_()
    (wr,) = am.implicit.implicit_root(F, solve_T, (w,), (X, t, lam_r), refine=10, refine_tol=1e-7)
    (g,) = torch.autograd.grad((wr * weight).sum(), lam_r)
    assert ((g - g_ref).abs() <= 1e-6 * g_ref.abs()).all()


def test_implicit_root_wide_refines_in_float64():
    """`wide`: for float32 solutions the refinement's residuals are formed in float64 (the
    product sees float64 data), each correction is solved in float32, and the gradients
    come back in float32."""
    X, t, lam = ridge_data(seed=15)
    lam_c = lam.clone().requires_grad_()
    (g_ref,) = torch.autograd.grad(ridge_closed_form(X, t, lam_c)[0].sum(), lam_c)
    X32, t32, lam32 = X.float(), t.float(), lam.float()
    w32, A32 = (x.float() for x in ridge_closed_form(X, t, lam))
    approx = torch.linalg.inv(A32) * (1 + 1e-2)  # a solve 1e-2 off
    seen = []

    def vjp_y(ys, params, u):  # (∂F/∂w)ᵀu = Xᵀ(Xu) + λu, recording the dtype it sees
        (u_w,), (X_, _, l_) = u, params
        seen.append(X_.dtype)
        return ((X_.mT @ (X_ @ u_w.unsqueeze(-1))).squeeze(-1) + l_.unsqueeze(-1) * u_w,)

    for wide in (False, True):
        seen.clear()
        lam_r = lam32.clone().requires_grad_()
        (wr,) = am.implicit.implicit_root(
            lambda w_, X_, t_, l_: (_ridge_grad(w_, X_, t_, l_),),
            lambda v: ((approx @ v[0].unsqueeze(-1)).squeeze(-1),),
            (w32,),
            (X32, t32, lam_r),
            refine=4,
            wide=wide,
            vjp_y=vjp_y,
        )
        (g,) = torch.autograd.grad(wr.sum(), lam_r)
        assert seen == [torch.float64 if wide else torch.float32] * 4
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), g_ref, rtol=1e-4, atol=0)


def test_bad_input_errors():
    X, t, lam = ridge_data()
    with pytest.raises(ValueError, match="unknown linear solve"):
        custom_root(_ridge_grad, solve="lu")
    with pytest.raises(TypeError, match="solve must be"):
        custom_root(_ridge_grad, solve=3)
    with pytest.raises(ValueError, match="unknown solver"):
        am.argmin(ridge_f, torch.zeros(4, 5, dtype=F64), X, t, lam, solver="bfgs")
    with pytest.raises(ValueError, match="grad must be one of"):
        am.argmin(ridge_f, torch.zeros(4, 5, dtype=F64), X, t, lam, grad="backprop")
    with pytest.raises(ValueError, match=r"y0 must be a \(B, n\)"):
        am.argmin(ridge_f, torch.zeros(5, dtype=F64), X, t, lam)
    with pytest.raises(ValueError, match="one value per problem"):
        am.argmin(lambda w, *a: ridge_f(w, *a).sum(), torch.zeros(4, 5, dtype=F64), X, t, lam)


def test_linear_solve_failure_warns_and_zeroes_nonfinite_rows():
    X, t, lam = ridge_data(seed=13)

    def broken(matvec, r):  # a user solve that fails on problem 1
        x = r.clone()
        x[1] = float("nan")
        return x

    solver = custom_root(_ridge_grad, solve=broken)(_np_ridge_solver)
    lam_r = lam.clone().requires_grad_()
    with pytest.warns(RuntimeWarning, match=r"did not converge for problems \[1\]"):
        (g,) = torch.autograd.grad(solver(None, X, t, lam_r).sum(), lam_r)
    assert torch.isfinite(g).all() and g[1] == 0


@pytest.mark.parametrize("name", ["cg", "gmres", "bicgstab", "direct"])
def test_batched_linear_solvers_match_dense_solve(name):
    g = torch.Generator().manual_seed(14)
    B, N = 6, 40
    M = torch.randn(B, N, N, generator=g, dtype=F64)
    A = M @ M.mT / N + torch.eye(N, dtype=F64) if name == "cg" else torch.eye(N, dtype=F64) * 3 + M / N**0.5
    r = torch.randn(B, N, generator=g, dtype=F64)
    kwargs = {"symmetric": False} if name == "direct" else {}
    x, ok = linear_solve.SOLVERS[name](lambda v: (A @ v.unsqueeze(-1)).squeeze(-1), r, **kwargs)
    assert ok.all()
    ref = torch.stack([torch.linalg.solve(A[b], r[b]) for b in range(B)])
    torch.testing.assert_close(x, ref, rtol=1e-8, atol=1e-9)


def test_neumann_matches_dense_solve_for_contraction():
    g = torch.Generator().manual_seed(15)
    B, N = 4, 20
    J = torch.randn(B, N, N, generator=g, dtype=F64)
    J = 0.5 * J / torch.linalg.matrix_norm(J, ord=2)[:, None, None]
    A = torch.eye(N, dtype=F64) - J
    r = torch.randn(B, N, generator=g, dtype=F64)
    x, ok = linear_solve.neumann(lambda v: (A @ v.unsqueeze(-1)).squeeze(-1), r)
    assert ok.all()
    torch.testing.assert_close(x, torch.linalg.solve(A, r.unsqueeze(-1)).squeeze(-1), rtol=1e-8, atol=1e-9)


def test_cg_reports_indefinite_matrix_as_not_converged():
    A = torch.diag_embed(torch.tensor([[1.0, 2.0, 3.0], [1.0, -2.0, 3.0]], dtype=F64))
    r = torch.ones(2, 3, dtype=F64)
    _, ok = linear_solve.cg(lambda v: (A @ v.unsqueeze(-1)).squeeze(-1), r)
    assert ok.tolist() == [True, False]


def test_tuple_solution_and_aux():
    """A solver returning a tuple of blocks and an aux value (here a per-problem status)."""
    X, t, lam = ridge_data(seed=16)

    def optimality(ys, X, t, lam):
        w, r = ys  # r = Xw − t is a second block of unknowns
        return _ridge_grad(w, X, t, lam), r - ((X @ w.unsqueeze(-1)).squeeze(-1) - t)

    @custom_root(optimality, solve="gmres", has_aux=True)
    def solver(init, X, t, lam):
        w = _np_ridge_solver(init, X, t, lam)
        return (w, (X @ w.unsqueeze(-1)).squeeze(-1) - t), torch.zeros(X.shape[0], dtype=torch.long)

    lam_r = lam.clone().requires_grad_()
    (w, r), aux = solver(None, X, t, lam_r)
    assert aux.tolist() == [0, 0, 0, 0]
    (g,) = torch.autograd.grad(w.sum() + r.square().sum(), lam_r)
    lam_c = lam.clone().requires_grad_()
    wc = ridge_closed_form(X, t, lam_c)[0]
    rc = (X @ wc.unsqueeze(-1)).squeeze(-1) - t
    (g_ref,) = torch.autograd.grad(wc.sum() + rc.square().sum(), lam_c)
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-11)


def test_user_callable_solve_returning_only_x():
    """A user's linear solve (here: materialize the Jacobian, dense LU) that returns x alone."""
    X, t, lam = ridge_data(seed=17)

    def dense(matvec, r):
        A = linear_solve.materialize(matvec, r)
        return torch.linalg.solve(A, r.unsqueeze(-1)).squeeze(-1)

    solver = custom_root(_ridge_grad, solve=dense)(_np_ridge_solver)
    args = [a.clone().requires_grad_() for a in (X, t, lam)]
    c = torch.randn(4, 5, generator=torch.Generator().manual_seed(18), dtype=F64)
    grads = torch.autograd.grad((solver(None, *args) * c).sum(), args)
    ref_args = [a.clone().requires_grad_() for a in (X, t, lam)]
    ref = torch.autograd.grad((ridge_closed_form(*ref_args)[0] * c).sum(), ref_args)
    for a, b in zip(grads, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_gradcheck_argmin_logistic():
    """gradcheck of the whole pipeline (Newton forward, implicit CG backward) w.r.t. the data
    and the log-regularization of a logistic regression."""
    g = torch.Generator().manual_seed(19)
    X = torch.randn(2, 8, 3, generator=g, dtype=F64)
    t = (torch.rand(2, 8, generator=g, dtype=F64) < 0.5).to(F64)
    log_lam = torch.randn(2, generator=g, dtype=F64) * 0.3
    y0 = torch.zeros(2, 3, dtype=F64)

    def solve(X_, log_lam_):
        return am.argmin(logistic_f, y0, X_, t, log_lam_, solver="newton", tol=1e-13).y

    assert torch.autograd.gradcheck(solve, (X.requires_grad_(), log_lam.requires_grad_()), fast_mode=True)


def test_vmap_of_grad_through_argmin():
    X, t, lam = ridge_data(seed=20)
    y0 = torch.zeros(4, 5, dtype=F64)
    loss = lambda l: am.argmin(ridge_f, y0, X, t, l, solver="newton").y.square().sum()
    ref = lambda l: ridge_closed_form(X, t, l)[0].square().sum()
    lams = lam + torch.rand(3, 4, generator=torch.Generator().manual_seed(21), dtype=F64)
    torch.testing.assert_close(
        torch.func.vmap(torch.func.grad(loss))(lams),
        torch.stack([torch.func.grad(ref)(l) for l in lams]),
        rtol=1e-8,
        atol=1e-10,
    )


def test_cg_on_cpu_stops_at_the_iteration_that_converges():
    """CG on N distinct eigenvalues converges in N steps; on the CPU the convergence check
    runs every iteration, so no matvec is spent after that."""
    N = 7
    A = torch.diag_embed(torch.linspace(1.0, 4.0, N, dtype=F64)).expand(3, N, N)
    r = torch.randn(3, N, generator=torch.Generator().manual_seed(22), dtype=F64)
    calls = []

    def matvec(v):
        calls.append(1)
        return (A @ v.unsqueeze(-1)).squeeze(-1)

    x, ok = linear_solve.cg(matvec, r)
    assert ok.all() and len(calls) == N
    torch.testing.assert_close(x, torch.linalg.solve(A, r.unsqueeze(-1)).squeeze(-1))


# Preconditioners: curvature handed over by the forward, or built in the backward.


def _counting_cg(calls):
    """A user solve that counts matvecs and passes the preconditioner on to CG."""

    def solve(matvec, r, precond=None):
        def counted(v):
            calls.append(1)
            return matvec(v)

        return linear_solve.cg(counted, r, precond=precond)

    return solve


def _spd_system(B=5, N=30, seed=23):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(B, N, N, generator=g, dtype=F64)
    A = M @ M.mT / N + 0.2 * torch.eye(N, dtype=F64)
    r = torch.randn(B, N, generator=g, dtype=F64)
    return A, r, g


@pytest.mark.parametrize("name,exact_matvecs", [("cg", 1), ("gmres", 2), ("bicgstab", 3), ("neumann", 2)])
def test_preconditioned_linear_solvers_match_dense_solve(name, exact_matvecs):
    """With M = A⁻¹ each solve stops after its first matvec (plus the final residual check
    of GMRES, BiCGStab and Neumann); with an approximate M it still reaches the dense
    solution, in fewer matvecs than without."""
    A, r, g = _spd_system()
    ref = torch.linalg.solve(A, r.unsqueeze(-1)).squeeze(-1)
    L = torch.linalg.cholesky(A)
    A_near = A + 0.05 * torch.diag_embed(torch.rand(A.shape[:2], generator=g, dtype=F64))
    L_near = torch.linalg.cholesky(A_near)

    def run(precond):
        calls = []

        def matvec(v):
            calls.append(1)
            return (A @ v.unsqueeze(-1)).squeeze(-1)

        x, ok = linear_solve.SOLVERS[name](matvec, r, precond=precond)
        assert ok.all()
        torch.testing.assert_close(x, ref, rtol=1e-8, atol=1e-9)
        return len(calls)

    exact = run(lambda v: torch.cholesky_solve(v.unsqueeze(-1), L).squeeze(-1))
    near = run(lambda v: torch.cholesky_solve(v.unsqueeze(-1), L_near).squeeze(-1))
    assert exact == exact_matvecs
    if name != "neumann":  # plain Neumann diverges here (‖I − A‖ > 1)
        assert exact < near < run(None)


def test_cg_reports_preconditioner_not_positive_definite():
    A, r, _ = _spd_system(B=2, N=6)
    sign = torch.tensor([1.0, -1.0], dtype=F64).unsqueeze(-1)  # M = I, M = −I
    _, ok = linear_solve.cg(lambda v: (A @ v.unsqueeze(-1)).squeeze(-1), r, precond=lambda v: sign * v)
    assert ok.tolist() == [True, False]


def _factored_ridge_solver(init, X, t, lam):
    """A no-grad forward that factors the Hessian XᵀX + λI and hands the factor over."""
    with torch.no_grad():
        L = torch.linalg.cholesky(ridge_closed_form(X, t, lam)[1])
        w = torch.cholesky_solve((X.mT @ t.unsqueeze(-1)), L).squeeze(-1)
    return am.implicit.Preconditioned(w, am.implicit.cholesky_preconditioner(L))


def test_forward_factor_preconditions_the_backward_three_ways():
    """Ridge hypergradient with the forward's Cholesky factor reused by the backward: one
    matvec, and the gradient agrees with the closed form, unrolling and central FD."""
    X, t, lam = ridge_data(seed=24)
    target = torch.randn(4, 5, generator=torch.Generator().manual_seed(25), dtype=F64)
    outer = lambda w: (w - target).square().sum()
    calls = []
    solver = custom_root(_ridge_grad, solve=_counting_cg(calls))(_factored_ridge_solver)

    lam_i = lam.clone().requires_grad_()
    w = solver(None, X, t, lam_i)
    assert isinstance(w, torch.Tensor)  # the decorated solver returns y, not the wrapper
    (g_impl,) = torch.autograd.grad(outer(w), lam_i)
    assert len(calls) == 1

    w_c, A = ridge_closed_form(X, t, lam)
    g_closed = (2 * (w_c - target) * -torch.linalg.solve(A, w_c)).sum(-1)
    g_unroll = _ridge_unrolled_grad(X, t, lam, outer)
    d = torch.randn(4, generator=torch.Generator().manual_seed(26), dtype=F64)
    fd = central_fd(lambda l: outer(ridge_closed_form(X, t, l)[0]), lam, d)

    torch.testing.assert_close(g_impl, g_closed, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_impl, g_unroll, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close((g_impl * d).sum(), fd, rtol=1e-7, atol=1e-9)


def _logistic_data(seed, B=5, m=40, n=6):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(B, m, n, generator=g, dtype=F64)
    t = (torch.rand(B, m, generator=g, dtype=F64) < 0.5).to(F64)
    Xv = torch.randn(B, m, n, generator=g, dtype=F64)
    tv = (torch.rand(B, m, generator=g, dtype=F64) < 0.5).to(F64)
    return X, t, Xv, tv, torch.randn(B, generator=g, dtype=F64) * 0.3, g


def _logistic_grad(w, X, t, log_lam):
    z = (X @ w.unsqueeze(-1)).squeeze(-1)
    return (X.mT @ (torch.sigmoid(z) - t).unsqueeze(-1)).squeeze(-1) + log_lam.exp().unsqueeze(-1) * w


def _logistic_hessian_precond(shift):
    """A backward-built preconditioner: the Cholesky factor of the Hessian XᵀDX + λI written
    out in closed form, at w + shift (shift ≠ 0: only approximately the Hessian at w)."""

    def precond(w, X, t, log_lam):
        z = (X @ (w + shift).unsqueeze(-1)).squeeze(-1)
        D = torch.sigmoid(z) * (1 - torch.sigmoid(z))
        H = X.mT @ (D.unsqueeze(-1) * X) + log_lam.exp()[:, None, None] * torch.eye(X.shape[-1], dtype=F64)
        return am.implicit.cholesky_preconditioner(torch.linalg.cholesky(H))

    return precond


def _logistic_forward(init, X, t, log_lam):
    return am.argmin(logistic_f, init, X, t, log_lam, solver="newton", tol=1e-13, grad="unroll").y.detach()


def test_backward_built_preconditioner_three_ways():
    """Logistic regression hypergradient with custom_root(precond=...): the same gradient as
    unrolled Newton and central FD, in fewer matvecs than plain CG (exact Hessian: one)."""
    X, t, Xv, tv, log_lam, g = _logistic_data(seed=27, n=15)
    y0 = torch.zeros(5, 15, dtype=F64)

    def val_loss(w):
        return torch.nn.functional.binary_cross_entropy_with_logits(
            (Xv @ w.unsqueeze(-1)).squeeze(-1), tv, reduction="sum"
        )

    def implicit_grad(shift):
        calls = []
        precond = None if shift is None else _logistic_hessian_precond(shift)
        solver = custom_root(_logistic_grad, solve=_counting_cg(calls), precond=precond)(_logistic_forward)
        ll = log_lam.clone().requires_grad_()
        (gr,) = torch.autograd.grad(val_loss(solver(y0, X, t, ll)), ll)
        return gr, len(calls)

    g_exact, n_exact = implicit_grad(0.0)
    g_near, n_near = implicit_grad(0.02 * torch.randn(5, 15, generator=g, dtype=F64))
    g_plain, n_plain = implicit_grad(None)
    assert n_exact == 1 and n_exact < n_near < n_plain

    ll_u = log_lam.clone().requires_grad_()
    sol_u = am.argmin(logistic_f, y0, X, t, ll_u, solver="newton", grad="unroll", tol=1e-13)
    (g_unroll,) = torch.autograd.grad(val_loss(sol_u.y), ll_u)
    d = torch.randn(5, generator=g, dtype=F64)
    fd = central_fd(lambda l: val_loss(_logistic_forward(y0, X, t, l)), log_lam, d, h=1e-5)
    for gr in (g_exact, g_near, g_plain):
        torch.testing.assert_close(gr, g_unroll, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close((gr * d).sum(), fd, rtol=1e-6, atol=1e-8)


def test_gradcheck_with_preconditioners():
    X, t, lam = ridge_data(B=2, m=6, n=3, seed=28)
    handed = custom_root(_ridge_grad, solve="cg")(_factored_ridge_solver)
    args = tuple(a.clone().requires_grad_() for a in (X, t, lam))
    assert torch.autograd.gradcheck(lambda *a: handed(None, *a), args)

    X, t, _, _, log_lam, _ = _logistic_data(seed=29, B=2, m=8, n=3)
    built = custom_root(_logistic_grad, solve="cg", precond=_logistic_hessian_precond(0.0))(_logistic_forward)
    y0 = torch.zeros(2, 3, dtype=F64)
    args = (X.requires_grad_(), log_lam.requires_grad_())
    assert torch.autograd.gradcheck(lambda X_, l_: built(y0, X_, t, l_), args, fast_mode=True)


def test_preconditioner_tensors_are_saved_for_backward():
    """The handed-over factor is kept as a saved tensor (graph memory, visible to saved-tensor
    hooks), not hidden in a closure."""
    X, t, lam = ridge_data(seed=30)
    factors = []

    def remember(init, X, t, lam):
        out = _factored_ridge_solver(init, X, t, lam)
        factors.append(out.precond.tensors[0])
        return out

    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: packed.append(x) or x, lambda x: x):
        w = custom_root(_ridge_grad, solve="cg")(remember)(None, X, t, lam.clone().requires_grad_())
    assert w.shape == (4, 5)
    assert any(p.data_ptr() == factors[0].data_ptr() and p.shape == (4, 5, 5) for p in packed)


def test_torch_func_through_a_preconditioned_solver():
    X, t, lam = ridge_data(seed=31)
    solver = custom_root(_ridge_grad, solve="cg")(_factored_ridge_solver)
    loss = lambda l: solver(None, X, t, l).square().sum()
    ref_loss = lambda l: ridge_closed_form(X, t, l)[0].square().sum()
    torch.testing.assert_close(torch.func.grad(loss)(lam), torch.func.grad(ref_loss)(lam))
    lams = lam + torch.rand(3, 4, generator=torch.Generator().manual_seed(32), dtype=F64)
    torch.testing.assert_close(
        torch.func.vmap(torch.func.grad(loss))(lams),
        torch.stack([torch.func.grad(ref_loss)(l) for l in lams]),
    )


def test_tuple_solution_with_exact_block_preconditioner():
    """A Preconditioner acting on a tuple solution: for the blocks (w, r) with optimality
    (∇_w, r − (Xw − t)), (∂F/∂y)ᵀ = [[H, −Xᵀ], [0, I]] has the exact inverse
    (a, b) ↦ (H⁻¹(a + Xᵀb), b); GMRES then needs two matvecs."""
    X, t, lam = ridge_data(seed=33)

    def optimality(ys, X, t, lam):
        w, r = ys
        return _ridge_grad(w, X, t, lam), r - ((X @ w.unsqueeze(-1)).squeeze(-1) - t)

    def block_apply(v, L, X):
        a, b = v
        return torch.cholesky_solve((a + (X.mT @ b.unsqueeze(-1)).squeeze(-1)).unsqueeze(-1), L).squeeze(
            -1
        ), b

    calls = []

    def counting_gmres(matvec, r, precond=None):
        return linear_solve.gmres(lambda v: calls.append(1) or matvec(v), r, precond=precond)

    @custom_root(optimality, solve=counting_gmres)
    def solver(init, X, t, lam):
        w = _factored_ridge_solver(init, X, t, lam).y
        L = torch.linalg.cholesky(ridge_closed_form(X, t, lam)[1])
        pc = am.implicit.Preconditioner(block_apply, (L, X))
        return am.implicit.Preconditioned((w, (X @ w.unsqueeze(-1)).squeeze(-1) - t), pc)

    lam_r = lam.clone().requires_grad_()
    w, r = solver(None, X, t, lam_r)
    (g,) = torch.autograd.grad(w.sum() + r.square().sum(), lam_r)
    assert len(calls) == 2
    lam_c = lam.clone().requires_grad_()
    wc = ridge_closed_form(X, t, lam_c)[0]
    rc = (X @ wc.unsqueeze(-1)).squeeze(-1) - t
    (g_ref,) = torch.autograd.grad(wc.sum() + rc.square().sum(), lam_c)
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-11)
