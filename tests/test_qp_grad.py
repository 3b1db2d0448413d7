"""Gradients of solve_qp: gradcheck, finite differences, qpth, broadcasting, float32."""

import pytest
import torch

import amortized as am
from amortized.problems.random_qp import FAMILIES, degenerate_qp, random_qp, separable_qp


def _solve(*args):
    sol = am.solve_qp(*args)
    return sol.z, sol.lam, sol.nu


def test_gradcheck_all_arguments_and_duals():
    data = random_qp(2, 5, 4, 2, generator=torch.Generator().manual_seed(0))
    args = [x.clone().requires_grad_() for x in data]
    assert torch.autograd.gradcheck(_solve, args, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("shape", [(2, 5, 4, 2), (2, 40, 40, 10), (2, 8, 60, 2)])
def test_second_derivatives_match_finite_differences_of_gradients(shape):
    """create_graph=True: d/dθ ⟨∇_θ' L, r⟩ for L = Σ c·z³ + Σ λ², every pair of arguments,
    against central differences of the first-order gradients (which gradcheck checks
    above); at (40, 40, 10) too, where the KKT Jacobian has 90 rows (a restarted GMRES
    stalled there: the second-order solve reuses the KKT factor), and on a tall problem,
    whose dense primal factor carries ρ = δ ≈ 1e-7 until refined."""
    B, n, m, q = shape
    data = random_qp(B, n, m, q, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(4)
    c = torch.randn(B, n, generator=g, dtype=torch.float64)

    def grads(args, create_graph=False):
        sol = am.solve_qp(*args)
        loss = (c * sol.z**3).sum() + (sol.lam**2).sum()
        return torch.autograd.grad(loss, args, create_graph=create_graph)

    args = [x.clone().requires_grad_() for x in data]
    r = [torch.randn(x.shape, generator=g, dtype=torch.float64) for x in data]
    g1 = grads(args, create_graph=True)
    hvp = torch.autograd.grad(sum((gi * ri).sum() for gi, ri in zip(g1, r, strict=True)), args)
    t = 1e-6
    for j in range(6):
        d = torch.randn(data[j].shape, generator=g, dtype=torch.float64)

        def moved(sign, j=j, d=d):
            a = [x.clone().requires_grad_() for x in data]
            with torch.no_grad():
                a[j] += sign * t * d
            return sum((gi * ri).sum() for gi, ri in zip(grads(a), r, strict=True))

        fd = (moved(1) - moved(-1)) / (2 * t)
        assert abs(float((hvp[j] * d).sum()) - float(fd)) <= 1e-6 * (1 + abs(float(fd)))


def test_gradgradcheck_and_torch_func_hessian_agree():
    """gradgradcheck w.r.t. (Q, p, h) with z and the duals as outputs; torch.func's
    jacrev(grad(f)) through solve_qp (which traces the backward itself) gives the same
    Hessian as create_graph=True."""
    Q, p, G, h, A, b = random_qp(2, 5, 4, 2, generator=torch.Generator().manual_seed(3))
    fn = lambda Q, p, h: _solve(Q, p, G, h, A, b)
    assert torch.autograd.gradgradcheck(
        fn, [x.clone().requires_grad_() for x in (Q, p, h)], atol=1e-5, rtol=1e-4
    )
    f = lambda p_: (am.solve_qp(Q, p_, G, h, A, b).z ** 3).sum()
    H_func = torch.func.jacrev(torch.func.grad(f))(p)
    p_ = p.clone().requires_grad_()
    (g,) = torch.autograd.grad(f(p_), p_, create_graph=True)
    H_graph = torch.stack(
        [torch.autograd.grad(g.flatten()[i], p_, retain_graph=True)[0] for i in range(g.numel())]
    )
    H_graph = H_graph.reshape(H_func.shape)
    assert float((H_func - H_graph).abs().max()) <= 1e-7 * float(H_graph.abs().max())


def test_second_derivatives_at_a_degenerate_solution_warn_and_stay_finite():
    """Duplicated constraint rows make the KKT Jacobian singular: the first-order gradients
    are the least-change ones, but second derivatives are not defined there; they warn."""
    data = degenerate_qp(2, 5, 4, 2, generator=torch.Generator().manual_seed(2))
    args = [x.clone().requires_grad_() for x in data]
    g1 = torch.autograd.grad((am.solve_qp(*args).z ** 3).sum(), args, create_graph=True)
    r = [torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=x.dtype) for x in data]
    with pytest.warns(RuntimeWarning, match="singular"):
        hvp = torch.autograd.grad(sum((gi * ri).sum() for gi, ri in zip(g1, r, strict=True)), args)
    assert all(torch.isfinite(x).all() for x in hvp)


def test_gradcheck_box_and_equality_only():
    Q, p, G, h, _, _ = FAMILIES["box"](2, torch.float64, torch.Generator().manual_seed(1))
    n = 4
    Q, p, G, h = (
        Q[:, :n, :n],
        p[:, :n],
        torch.cat([torch.eye(n), -torch.eye(n)]).double().expand(2, -1, -1),
        h[:, : 2 * n],
    )
    args = [x.clone().requires_grad_() for x in (Q, p, G, h)]
    assert torch.autograd.gradcheck(lambda *a: _solve(*a)[0], args, eps=1e-6, atol=1e-5, rtol=1e-4)
    Q, p, _, _, A, b = FAMILIES["equality"](2, torch.float64, torch.Generator().manual_seed(2))
    args = [x.clone().requires_grad_() for x in (Q, p, A, b)]
    fn = lambda Q, p, A, b: _solve(Q, p, None, None, A, b)
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_gradcheck_separable_with_a_fixed_variable():
    """The separable form (diagonal Q, one entry per row of G: H stays diagonal), with
    both bounds of z₀ active (l = u): exact gradients of z. Q enters by its diagonal, G and
    h are constant (perturbations keep the structure; z is not differentiable in h at
    l = u), and Q ≻ 0 here (a gradcheck step would make a zero diagonal entry negative)."""
    Q, p, G, h, A, b = separable_qp(2, 5, 2, fixed=True, generator=torch.Generator().manual_seed(3))
    assert am.solve_qp(Q, p, G, h, A, b).solved.all()
    args = [x.clone().requires_grad_() for x in (Q.diagonal(dim1=-2, dim2=-1) + 0.1, p, A, b)]
    fn = lambda q, p, A, b: am.solve_qp(torch.diag_embed(q), p, G, h, A, b).z
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["optnet", "tall", "lp_box", "degenerate", "separable"])
def test_directional_finite_difference(family):
    """⟨∇L, d⟩ against a central difference of L along a random direction d of all data."""
    g = torch.Generator().manual_seed(7)
    data = FAMILIES[family](3, torch.float64, g)
    args = [x.clone().requires_grad_() for x in data]
    w = torch.randn(data[1].shape, generator=g, dtype=torch.float64)
    loss = lambda *a: (am.solve_qp(*a).z * w).sum()
    loss(*args).backward()
    dirs = [torch.randn(x.shape, generator=g, dtype=torch.float64) * (x != 0) for x in data]
    if family in ("lp_box", "degenerate"):
        # keep the structure along the direction: Q = 0 and identity box rows of the LP,
        # the duplicated (consistent) rows of the degenerate family
        keep = (1, 3) if family == "lp_box" else (1,)
        dirs = [d if k in keep else d * 0 for k, d in enumerate(dirs)]
    analytic = sum((a.grad * d).sum() for a, d in zip(args, dirs) if a.grad is not None)
    t = 1e-6
    with torch.no_grad():
        plus = loss(*(x + t * d for x, d in zip(data, dirs)))
        minus = loss(*(x - t * d for x, d in zip(data, dirs)))
    fd = (plus - minus) / (2 * t)
    assert abs(analytic - fd) <= 1e-5 * (1 + abs(fd))


def test_gradients_match_qpth():
    qpth = pytest.importorskip("qpth.qp")
    data = FAMILIES["optnet"](4, torch.float64, torch.Generator().manual_seed(8))
    w = torch.linspace(-1, 1, data[1].numel(), dtype=torch.float64).reshape(data[1].shape)
    ours = [x.clone().requires_grad_() for x in data]
    (am.solve_qp(*ours).z * w).sum().backward()
    theirs = [x.clone().requires_grad_() for x in data]
    (qpth.QPFunction(verbose=-1)(*theirs) * w).sum().backward()
    # qpth stops at ~1e-4 relative accuracy (its gradients are off by ~3e-4 from central
    # differences on these problems, ours by ~1e-9; see the finite-difference tests)
    for a, b in zip(ours, theirs):
        assert (a.grad - b.grad).abs().max() <= 2e-3 * (1 + b.grad.abs().max())


def test_broadcast_gradients_are_summed():
    Q, p, G, h, A, b = FAMILIES["optnet"](3, torch.float64, torch.Generator().manual_seed(9))
    shared = [x[0].clone().requires_grad_() for x in (Q, G, h, A, b)]
    pb = p.clone().requires_grad_()
    am.solve_qp(shared[0], pb, *shared[1:]).z.sum().backward()
    for k in range(3):
        each = [x[0].clone().requires_grad_() for x in (Q, G, h, A, b)]
        am.solve_qp(each[0], p[k], *each[1:]).z.sum().backward()
        if k == 0:
            total = [e.grad.clone() for e in each]
        else:
            total = [t + e.grad for t, e in zip(total, each)]
    for s, t in zip(shared, total):
        torch.testing.assert_close(s.grad, t, rtol=1e-6, atol=1e-8 * t.abs().max().item())


def test_float32_gradients_close_to_float64():
    data = FAMILIES["optnet"](8, torch.float64, torch.Generator().manual_seed(10))
    grads = {}
    for dtype in (torch.float64, torch.float32):
        args = [x.to(dtype).clone().requires_grad_() for x in data]
        sol = am.solve_qp(*args)
        (sol.z.square().sum() + sol.lam.sum()).backward()
        grads[dtype] = [a.grad.double() for a in args]
    for g32, g64 in zip(grads[torch.float32], grads[torch.float64]):
        assert (g32 - g64).abs().max() <= 1e-3 * g64.abs().max()


def test_float32_gradients_close_to_float64_on_tall_problems():
    """Per problem, on tall problems (60 rows, 20 unknowns): a float32 polish guess with
    more active rows than unknowns has no unique multipliers, and dropping all of its
    negative ones cycled, left one problem at an unpolished interior point and its
    gradient 4.6× off the float64 one."""
    data = random_qp(16, 20, 60, 0, generator=torch.Generator().manual_seed(0))
    grads = {}
    for dtype in (torch.float64, torch.float32):
        args = [x.to(dtype).clone().requires_grad_() for x in data[:4]]
        sol = am.solve_qp(*args)
        assert sol.solved.all()
        (sol.z.square().sum() + sol.lam.sum()).backward()
        grads[dtype] = [a.grad.double().flatten(1) for a in args]
    for g32, g64 in zip(grads[torch.float32], grads[torch.float64]):
        assert ((g32 - g64).abs().amax(-1) <= 1e-3 * g64.abs().amax(-1)).all()


FLOAT32_HARD_GRADIENTS = {
    # cond Q = 2.6e3, |z| = 370: with float32's factor (ρ ≈ 3e-5) each refinement step of
    # the backward gains about tenfold; two steps left 2.8e-3 relative errors (h), four
    # 4.2e-4; the backward refines until a correction is 1e-4 of the answer
    "ill_conditioned": ((10, 10), 128, 1, 21, 1e-3),
    # cond Q = 2.6e3 alone in the dense primal form (Q just short of comfortably positive
    # definite): each step gains only 2.4×, six left 2.5e-3; now up to twelve
    "slow_refinement": ((10, 10), 128, 19, 36, 5e-4),
    # a weakly active row (λ = 1.4e-4) and cond Q = 2e3: float32 residuals of the KKT
    # products left 1.0e-3; the backward's residuals are now float64 (mixed precision)
    "float32_residuals": ((10, 10), 128, 29, 113, 1e-4),
    # a weakly active row (λ = 5.8e-6): float64 residuals resolve the float32 rounding left
    # in its slack and amplify it by 1/λ (9.6e-4), unless the row's slack is taken as zero,
    # as in the active-set system the backward factors (2e-7)
    "weakly_active": ((10, 10), 128, 2, 97, 1e-4),
    # tall (20, 60): at μ ≈ 3e-6 a row with slack 6e-4 (inactive) still has λ > s, and the
    # polish's guess holds it; its first correction dropped that row and another (18 of
    # the 19 active), cycled and failed, and the interior point, accepted at eps, gave the
    # row's gradient (37% off, 4.1 with the float64 residuals); it now drops one row at a
    # time in float32, and the polished point is exact
    "ambiguous_row": ((20, 60), 64, 1, 37, 1e-4),
}


@pytest.mark.parametrize("case", list(FLOAT32_HARD_GRADIENTS))
def test_float32_gradients_close_to_float64_on_hard_problems(case):
    (n, m), B, seed, k, tol = FLOAT32_HARD_GRADIENTS[case]
    data = [x[k : k + 1] for x in random_qp(B, n, m, 0, generator=torch.Generator().manual_seed(seed))]
    w = torch.randn(1, n, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grads = {}
    for dtype in (torch.float64, torch.float32):
        args = [x.to(dtype).clone().requires_grad_() for x in data[:4]]
        sol = am.solve_qp(*args)
        assert sol.solved.all()
        (sol.z * w.to(dtype)).sum().backward()
        grads[dtype] = [a.grad.double() for a in args]
    for g32, g64 in zip(grads[torch.float32], grads[torch.float64]):
        assert (g32 - g64).norm() <= tol * g64.norm()


def test_float32_gradients_in_a_batch_that_needs_the_primal_form():
    """An LP in the batch (Q = 0) puts every problem in the dense primal form, whose ρ =
    10√ε (3.4e-3 in float32) a problem with cond Q ~ 2e3 could not refine away: its float32
    gradients were 15% off float64 and it took 16 iterations (4 alone). The factorizations
    of its active set now keep the dual form's ρ, as Q is comfortably positive definite."""
    Q, p, G, h = (x[21:22] for x in random_qp(64, 10, 10, 0, generator=torch.Generator().manual_seed(27))[:4])
    eye = torch.eye(10, dtype=Q.dtype)
    data = [  # the QP (its G padded with rows 0 ≤ 1) and the LP min pᵀz on the box |z| ≤ 1
        torch.cat([Q, torch.zeros_like(Q)]),
        torch.cat([p, torch.linspace(-1, 1, 10, dtype=Q.dtype)[None]]),
        torch.cat([torch.cat([G, torch.zeros_like(G)], 1), torch.cat([eye, -eye])[None]]),
        torch.cat([torch.cat([h, torch.ones_like(h)], 1), torch.ones(1, 20, dtype=Q.dtype)]),
    ]
    w = torch.randn(2, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = {}
    for dtype in (torch.float64, torch.float32):
        args = [x.to(dtype).clone().requires_grad_() for x in data]
        sol = am.solve_qp(*args)
        assert sol.solved.all()
        assert dtype == torch.float64 or int(sol.iters[0]) <= 8
        (sol.z * w.to(dtype)).sum().backward()
        grads[dtype] = [a.grad[0].double() for a in args]  # the QP's (the LP's are ~0)
    for g32, g64 in zip(grads[torch.float32], grads[torch.float64]):
        assert (g32 - g64).norm() <= 1e-3 * g64.norm()


def test_unsolved_problems_get_zero_gradient_and_a_warning():
    data = FAMILIES["optnet"](3, torch.float64, torch.Generator().manual_seed(11))
    p = data[1].clone().requires_grad_()
    sol = am.solve_qp(data[0], p, *data[2:], max_iter=1)
    assert (sol.status == am.QPStatus.MAX_ITER).all()
    with pytest.warns(RuntimeWarning, match="not SOLVED"):
        sol.z.sum().backward()
    assert torch.equal(p.grad, torch.zeros_like(p))


def test_gradient_at_weakly_active_constraint_is_finite():
    """z* = 0 with the constraint z ≤ 0 weakly active (λ = 0): no NaN in the gradient."""
    Q = torch.eye(2, dtype=torch.float64)
    p = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    G = torch.tensor([[1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    h = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    sol = am.solve_qp(Q, p, G, h)
    assert sol.solved.all()
    (sol.z.sum() + sol.lam.sum()).backward()
    for x in (p, G, h):
        assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("q", [0, 3])
def test_gradient_at_an_overdetermined_vertex_is_finite_and_not_zero(q):
    """Every row of G tight at z0 (30 rows, 12 unknowns) and Q of condition 1e6: the
    backward's Schur complement over the active rows is singular up to rounding, so its
    regularization must grow where the Cholesky fails; before, these SOLVED problems got a
    "did not factor" warning (an error under this suite's filterwarnings) and zero
    gradients. With q = 3 equality rows the null-space form factors it."""
    g = torch.Generator().manual_seed(0)
    B, n, m = 2, 12, 30
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    U = torch.linalg.qr(r(B, n, n)).Q
    Q = U @ torch.diag_embed(torch.logspace(0, -6, n, dtype=torch.float64)) @ U.mT
    p, G, z0, A = 10 * r(B, n), r(B, m, n), r(B, n, 1), r(B, q, n)
    h = (G @ z0).squeeze(-1).requires_grad_()
    sol = am.solve_qp(Q, p, G, h, A, (A @ z0).squeeze(-1))
    assert sol.solved.all()
    (grad,) = torch.autograd.grad(sol.z.sum(), h)
    assert torch.isfinite(grad).all() and (grad.abs().amax(-1) > 1e-3).all()


def test_backward_warns_and_zeroes_gradients_where_the_kkt_system_does_not_factor(monkeypatch):
    """A solved problem whose KKT system at the solution fails to factor in the backward gets
    a zero gradient and a warning, never the garbage of a failed factor."""
    import amortized.qp.pdipm as pdipm

    Q, p, G, h, A, b = random_qp(4, 5, 6, 2, generator=torch.Generator().manual_seed(0))
    p = p.requires_grad_()
    sol = am.solve_qp(Q, p, G, h, A, b)
    assert sol.solved.all()

    class Failing(pdipm.KKT):  # the backward's factorization of problem 1 fails
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.ok = self.ok.clone()
            self.ok[1] = False

    monkeypatch.setattr(pdipm, "KKT", Failing)
    with pytest.warns(RuntimeWarning, match=r"problems \[1\] did not factor"):
        sol.z.sum().backward()
    assert (p.grad[1] == 0).all() and (p.grad[[0, 2, 3]] != 0).any(-1).all()
