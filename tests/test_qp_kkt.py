"""The QP's KKT conditions and the linear algebra under them, against plain references."""

import pytest
import torch

from amortized.linalg import cholesky, col_major, complete_qr
from amortized.problems.random_qp import random_qp
from amortized.qp import solve_qp
from amortized.qp.kkt import kkt_conditions, kkt_parameter_vjp, kkt_transpose_product
from amortized.qp.kkt_system import KKT, regularization
from amortized.qp.nullspace import nullspace
from amortized.qp.pdipm import kkt_form, pdipm, scaled
from amortized.qp.problem import QPData, qp_data


def _reference_kkt(z, lam, nu, Q, p, G, h, A, b):
    """F written with a symmetrized Q and plain products: autograd differentiates it."""
    Qs = 0.5 * (Q + Q.mT)
    mv = lambda M, x: (M @ x.unsqueeze(-1)).squeeze(-1)
    return (
        mv(Qs, z) + p + mv(G.mT, lam) + mv(A.mT, nu),
        lam * (mv(G, z) - h),
        mv(A, z) - b,
    )


@pytest.mark.parametrize("batch", ["per-problem", "shared", "batch-of-one"])
def test_kkt_conditions_and_parameter_vjp_match_the_plain_formula(batch):
    """F's value, and the closed-form parameter cotangents the implicit backward uses,
    against autograd through F written plainly (broadcast parameters: summed gradients)."""
    g = torch.Generator().manual_seed(0)
    B, n, m, q = 4, 6, 5, 2
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    lead = {"per-problem": (B,), "shared": (), "batch-of-one": (1,)}[batch]
    params = [r(*lead, n, n), r(B, n), r(*lead, m, n), r(B, m), r(*lead, q, n), r(B, q)]
    if batch == "shared":
        params[1], params[3] = r(n), r(m)  # vectors shared too
    ys = [r(B, n), r(B, m), r(B, q)]
    cot = (r(B, n), r(B, m), r(B, q))

    leaves = [x.clone().requires_grad_() for x in params]
    ref_out = _reference_kkt(*ys, *leaves)
    want = torch.autograd.grad(ref_out, leaves, cot)
    for a, b in zip(kkt_conditions(*ys, *params), ref_out):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    got = kkt_parameter_vjp(*ys, params, cot, [0, 1, 2, 3, 4, 5])
    for a, b in zip(got, want):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # F reads only Q's symmetric part (its cotangent is one product, symmetric to rounding)
    torch.testing.assert_close(got[0], got[0].mT, rtol=0, atol=1e-15 * float(got[0].abs().max()))
    some = kkt_parameter_vjp(*ys, params, cot, [3, 0])  # only those asked for, in that order
    assert [x.shape for x in some] == [params[3].shape, params[0].shape]


@pytest.mark.parametrize("batch", ["per-problem", "shared"])
def test_kkt_transpose_product_is_the_vjp_of_the_kkt_conditions(batch):
    """The closed form the implicit backward refines with, against torch.func.vjp of F in
    (z, λ, ν) (also with an absent constraint block)."""
    g = torch.Generator().manual_seed(1)
    B, n, m, q = 4, 6, 5, 2
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    lead = (B,) if batch == "per-problem" else ()
    for m_, q_ in ((m, q), (m, 0), (0, q)):
        params = [r(*lead, n, n), r(B, n), r(*lead, m_, n), r(B, m_), r(*lead, q_, n), r(B, q_)]
        ys, u = (r(B, n), r(B, m_), r(B, q_)), (r(B, n), r(B, m_), r(B, q_))
        _, vjp = torch.func.vjp(lambda *y, ps=params: kkt_conditions(*y, *ps), *ys)
        for got, want in zip(kkt_transpose_product(*ys, *params, u), vjp(u)):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_cholesky_overwrite_factors_in_place_and_bitwise_the_same():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(3, 40, 40, generator=g, dtype=torch.float64)
    M = X @ X.mT + torch.eye(40, dtype=torch.float64)
    M = (M + M.mT) / 2  # exactly symmetric: col_major may lay out its transpose
    L, ok = cholesky(M)
    S = col_major(M)
    assert torch.equal(S, M) and S.mT.is_contiguous() and S.data_ptr() != M.data_ptr()
    assert col_major(M, copy=False).data_ptr() == M.data_ptr()  # a view of the transpose
    shared = col_major(M[0].expand(3, 40, 40), copy=False)  # neither layout: copied
    assert torch.equal(shared, M[0].expand(3, 40, 40)) and shared.mT.is_contiguous()
    L_in, ok_in = cholesky(S, overwrite=True)
    assert L_in.data_ptr() == S.data_ptr()
    assert torch.equal(L_in, L) and ok_in.all() and ok.all()
    # only one triangle is read: M's upper one, through the transpose
    M[0, 7, 5] += 1e-3
    assert torch.equal(cholesky(col_major(M), overwrite=True)[0][0], L[0])
    # a failure is still reported per matrix, with the identity in its place
    bad = col_major(M)
    bad[1] = -torch.eye(40, dtype=torch.float64)
    L_bad, ok_bad = cholesky(bad, overwrite=True)
    assert ok_bad.tolist() == [True, False, True]
    assert torch.equal(L_bad[1], torch.eye(40, dtype=torch.float64)) and torch.equal(L_bad[2], L[2])
    with pytest.raises(ValueError, match="column-major"):
        cholesky(M.clone(), overwrite=True)


@pytest.mark.parametrize("case", ["random", "reduced columns", "rank deficient", "float32"])
def test_complete_qr_matches_lapack(case):
    """The compact WY form of U against torch's orgqr, including reflectors geqrf skips
    (τ = 0: columns already reduced, zero columns)."""
    g = torch.Generator().manual_seed(1)
    dtype = torch.float32 if case == "float32" else torch.float64
    M = torch.randn(4, 12, 5, generator=g, dtype=dtype)
    if case == "reduced columns":
        M[:, :, :2] = torch.eye(12, 2, dtype=dtype)  # equality rows fixing variables
    if case == "rank deficient":
        M[:, :, 3] = 0.0
    U, R = complete_qr(M)
    U_ref, R_ref = torch.linalg.qr(M, mode="complete")
    tol = 1e-5 if dtype == torch.float32 else 1e-13
    torch.testing.assert_close(U, U_ref, rtol=0, atol=tol)
    torch.testing.assert_close(R, R_ref[..., :5, :], rtol=0, atol=tol)
    torch.testing.assert_close(U.mT @ U, torch.eye(12, dtype=dtype).expand(4, 12, 12), rtol=0, atol=tol)


def test_factor_of_Q_is_kept_for_the_data_and_their_subsets():
    g = torch.Generator().manual_seed(2)
    Q, p, G, h, A, b = random_qp(4, 6, 5, 0, generator=g)
    d = qp_data(Q, p, G, h)[0]
    L = d.factor_Q(1e-10)
    torch.testing.assert_close(L @ L.mT, d.Q + 1e-10 * torch.eye(6, dtype=Q.dtype), rtol=0, atol=1e-13)
    assert d.factor_Q(1e-10) is L  # computed once
    idx = torch.tensor([2, 0])
    assert torch.equal(d.index(idx).factor_Q(1e-10), L[idx])  # a subset keeps its rows
    Q_bad = Q.clone()
    Q_bad[1] = -Q_bad[1]
    bad = qp_data(Q_bad, p, G, h)[0]
    assert bad.factor_Q(1e-10) is None
    assert bad.comfortable(1e-10).tolist() == [True, False, True, True]  # problem by problem
    # a subset keeps its batch's answer (the same KKT form), even without the bad problem
    assert bad.index(torch.tensor([0, 2])).factor_Q(1e-10) is None
    assert bad.index(torch.tensor([1, 2])).comfortable(1e-10).tolist() == [False, True]


def _dual_form_kkt(A_rows=None, seed=3):
    g = torch.Generator().manual_seed(seed)
    B, n, m, q = 3, 8, 6, 3
    Q, p, G, h, A, b = random_qp(B, n, m, q, generator=g)
    if A_rows is not None:
        A = A[:, A_rows]
        b = b[:, A_rows]
    d = scaled(qp_data(Q, p, G, h, A, b)[0], scale=False)[0]
    args = kkt_form(d)
    assert args["base"] is not None and args["base"].fixed is not None  # the dual form, rows fixed
    return d, args, g


@pytest.mark.parametrize("active_set", [False, True])
def test_dual_form_with_equality_rows_solves_the_kkt_system(active_set):
    """The dual form eliminates the equality rows once (`FixedRows`) and factors only the
    inequality rows for each D: its refined solution against a dense solve of

        [Q  Gᵀ  Aᵀ] [x  ]   [r1 ]
        [G  −D  0 ] [y_i] = [r_i]    (rows with D = ∞ dropped: y_i = 0 there)
        [A  0   0 ] [y_e]   [r_e]
    """
    d, args, g = _dual_form_kkt()
    B, n, m, q = d.shape
    D = torch.rand(B, m, generator=g, dtype=torch.float64) + 0.1
    if active_set:
        D[:, 0], D[:, 1], D[1, 2] = 0.0, torch.inf, torch.inf
    r = [torch.randn(B, k, generator=g, dtype=torch.float64) for k in (n, m, q)]
    kkt = KKT(d, D, active_set=active_set, **args)
    assert kkt.ok.all()
    got = torch.cat(kkt.solve(*r, refine=0), -1)  # unrefined: the factors alone

    torch.testing.assert_close(got, _dense_solve(d, D, r), rtol=1e-9, atol=1e-9)


def _dense_solve(d: QPData, D: torch.Tensor, r: list[torch.Tensor]) -> torch.Tensor:
    """The system of `KKT` solved densely (rows with D = ∞ dropped: y_i = 0 there)."""
    B, n, m, q = d.shape
    absent = torch.isinf(D)
    K = torch.zeros(B, n + m + q, n + m + q, dtype=torch.float64)
    K[:, :n, :n], K[:, :n, n : n + m], K[:, :n, n + m :] = d.Q, d.G.mT, d.A.mT
    K[:, n : n + m, :n], K[:, n + m :, :n] = d.G, d.A
    K[:, n : n + m, n : n + m] = -torch.diag_embed(torch.where(absent, 0.0, D))
    rows = torch.arange(n, n + m)
    for k in range(B):  # a dropped row reads y_i = 0
        for i in rows[absent[k]]:
            K[k, i], K[k, :, i], K[k, i, i] = 0.0, 0.0, 1.0
    rhs = torch.cat([r[0], torch.where(absent, 0.0, r[1]), r[2]], -1)
    return torch.linalg.solve(K, rhs)


@pytest.mark.parametrize("active_set", [False, True])
def test_nullspace_form_solves_the_kkt_system(active_set):
    """The null-space elimination of the equality rows (`Nullspace` in `KKT`): its
    unrefined solution against the dense solve, for interior D and for an active set."""
    g = torch.Generator().manual_seed(7)
    B, n, m, q = 3, 8, 6, 3
    d = qp_data(*random_qp(B, n, m, q, generator=g))[0]
    rho = regularization(torch.float64)
    ns = nullspace(d, torch.ones(B, dtype=torch.bool), rho)
    assert ns is not None and ns.d.shape == (B, n - q, m, 0)
    D = torch.rand(B, m, generator=g, dtype=torch.float64) + 0.1
    if active_set:
        D[:, 0], D[:, 1], D[1, 2] = 0.0, torch.inf, torch.inf
    r = [torch.randn(B, k, generator=g, dtype=torch.float64) for k in (n, m, q)]
    kkt = KKT(d, D, rho=rho, delta=rho, nullspace=ns, active_set=active_set)
    assert kkt.ok.all() and kkt.form == "nullspace"
    got = torch.cat(kkt.solve(*r, refine=0), -1)
    torch.testing.assert_close(got, _dense_solve(d, D, r), rtol=1e-9, atol=1e-9)


def test_nullspace_reduced_qp_lifts_to_the_full_solution():
    """The reduced QP (Q̃ = NᵀQN, p̃, G̃ = GN, h̃) solved, then lifted: the same z, λ, ν as
    the full problem's solve without the reduction."""
    g = torch.Generator().manual_seed(8)
    d, active = qp_data(*random_qp(4, 12, 10, 5, generator=g))
    ns = nullspace(d, active, regularization(torch.float64))
    red = solve_qp(ns.d.Q, ns.d.p, ns.d.G, ns.d.h)
    z, nu = ns.lift(red.z, red.lam)
    full = pdipm(d, active, eps=1e-12, max_iter=100, reduce=False)
    torch.testing.assert_close(z, full.it.z, rtol=0, atol=1e-9)
    torch.testing.assert_close(red.lam, full.it.lam, rtol=0, atol=1e-9)
    torch.testing.assert_close(nu, full.it.nu, rtol=0, atol=1e-9)


def test_nullspace_declines_what_it_cannot_eliminate():
    """None (the solver then keeps its other forms) for a repeated row of A or a Q singular
    on A's null space (an LP), unless only in a problem marked inactive."""
    g = torch.Generator().manual_seed(9)
    Q, p, G, h, A, b = random_qp(3, 8, 6, 3, generator=g)
    rho = regularization(torch.float64)
    every = torch.ones(3, dtype=torch.bool)
    repeated = A.clone()
    repeated[1, 2] = repeated[1, 0]
    assert nullspace(qp_data(Q, p, G, h, repeated, b)[0], every, rho) is None
    lp = Q.clone()
    lp[2] = 0.0
    assert nullspace(qp_data(lp, p, G, h, A, b)[0], every, rho) is None
    only_first = torch.tensor([True, False, False])
    assert nullspace(qp_data(lp, p, G, h, repeated, b)[0], only_first, rho) is not None


def test_dual_form_factors_dependent_equality_rows():
    """A repeated row of A makes the fixed block singular: its regularization still
    factors, and refinement solves a consistent system (r_e in the range of A)."""
    d, args, g = _dual_form_kkt(A_rows=[0, 1, 2, 1])
    B, n, m, q = d.shape
    D = torch.rand(B, m, generator=g, dtype=torch.float64) + 0.1
    kkt = KKT(d, D, **args)
    assert kkt.ok.all()
    r1, r_i = (
        torch.randn(B, n, generator=g, dtype=torch.float64),
        torch.randn(B, m, generator=g, dtype=torch.float64),
    )
    r_e = (d.A @ torch.randn(B, n, 1, generator=g, dtype=torch.float64)).squeeze(-1)
    sol = kkt.solve(r1, r_i, r_e, refine=5)
    for a, want in zip(kkt.apply(*sol), (r1, r_i, r_e)):
        torch.testing.assert_close(a, want, rtol=0, atol=1e-7)


def test_refinement_until_noise_skips_the_step_that_would_only_confirm(monkeypatch):
    """float64, the polish's active set: the factor's ρ = δ ≈ 1e-10 leaves a first
    correction of about 1e-10 relative, so the next one is predicted below the noise floor
    and not taken; the answer is the fully refined one to rounding."""
    g = torch.Generator().manual_seed(4)
    B, n, m, q = 8, 12, 10, 3
    d = scaled(qp_data(*random_qp(B, n, m, q, generator=g))[0])[0]
    D = torch.full((B, m), torch.inf, dtype=torch.float64)
    D[:, :4] = 0.0
    r = [torch.randn(B, k, generator=g, dtype=torch.float64) for k in (n, m, q)]
    kkt = KKT(d, D, active_set=True, **kkt_form(d))
    want = torch.cat(kkt.solve(*r, refine=10), -1)
    applied = []
    apply = KKT.apply
    monkeypatch.setattr(KKT, "apply", lambda self, *a: applied.append(1) or apply(self, *a))
    got = torch.cat(kkt.solve(*r, refine=10, until_noise=True), -1)
    assert len(applied) == 1
    torch.testing.assert_close(got, want, rtol=0, atol=1e-13 * float(want.abs().max()))


def test_wide_refinement_makes_a_float32_factor_accurate_to_float32():
    """Mixed-precision refinement (`wide=True`, the float32 polish): residuals in float64
    take a float32 solve of an ill-conditioned system (Q's eigenvalues 10^-2.5 … 1) to
    float32's resolution, where float32 residuals stop at about cond·ε₃₂."""
    g = torch.Generator().manual_seed(5)
    B, n, m = 4, 10, 10
    _, p, G, h, A, b = random_qp(B, n, m, 0, generator=g)
    U = torch.linalg.qr(torch.randn(B, n, n, generator=g, dtype=torch.float64)).Q
    Q = U @ torch.diag_embed(torch.logspace(-2.5, 0, n, dtype=torch.float64)) @ U.mT
    data32 = [x.float() for x in (Q, p, G, h, A, b)]
    D = torch.full((B, m), torch.inf)
    D[:, :3] = 0.0  # an active set, as in the polish
    r = [torch.randn(B, k, generator=g, dtype=torch.float64) for k in (n, m, 0)]

    d64 = scaled(qp_data(*(x.double() for x in data32))[0], scale=False)[0]
    want = torch.cat(KKT(d64, D.double(), active_set=True, **kkt_form(d64)).solve(*r, refine=10), -1)
    d32 = scaled(qp_data(*data32)[0], scale=False)[0]
    args = kkt_form(d32)
    assert args["base"] is not None  # the dual form, as float32 uses when Q allows
    err = {}
    for wide in (False, True):
        kkt = KKT(d32, D, active_set=True, **args)
        got = torch.cat(kkt.solve(*(t.float() for t in r), refine=10, until_noise=True, wide=wide), -1)
        assert got.dtype == torch.float32
        err[wide] = ((got.double() - want).abs().amax(-1) / want.abs().amax(-1)).max().item()
    assert err[True] <= 3e-7 and err[True] < err[False] / 5


def test_dual_form_factors_inequality_rows_that_repeat_equality_rows():
    """Rows of G equal to rows of A leave the eliminated inequality block with a tiny
    diagonal but rounding of the size of C H⁻¹ Cᵀ's: its δ floor must be scaled by the
    latter (`DualBase.M_max`), or the float32 factorization fails."""
    g = torch.Generator().manual_seed(0)
    B, n, m, q = 200, 10, 4, 4
    A = 100 * torch.randn(B, q, n, generator=g)
    data = QPData(
        torch.eye(n).expand(B, n, n),
        torch.randn(B, n, generator=g),
        A.clone(),
        torch.zeros(B, m),
        A,
        torch.zeros(B, q),
    )
    args = kkt_form(data)
    assert args["base"] is not None and args["base"].fixed is not None
    for D in (1e-2, 1e-5, 1e-8):
        assert KKT(data, torch.full((B, m), D), **args).ok.all()
