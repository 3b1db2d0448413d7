"""`amortized.qp.ActiveSetQP` against `am.solve_qp`, Clarabel and finite differences."""

import pytest
import torch

import amortized as am
from amortized.qp import ActiveSetQP, QPStatus
from reference import clarabel_qp


def family(seed: int, n: int = 12, m: int = 8, q: int = 3, B: int = 16, dtype=torch.float64):
    """Shared Q SPD, p, G, h, A and B right sides b = A y_i of points y_i strictly inside
    G y ≤ h (so every instance is feasible); p is large enough that many rows are active."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    R = rnd(n, n)
    Q = R @ R.T / n + 0.5 * torch.eye(n, dtype=torch.float64)
    p, G, A = 3 * rnd(n), rnd(m, n), rnd(q, n)
    h = 0.1 + 0.4 * torch.rand(m, generator=g, dtype=torch.float64)
    u = torch.nn.functional.normalize(rnd(B, n), dim=-1)
    y_in = 0.09 / G.norm(dim=-1).max() * u  # |G y_in| < 0.1 ≤ h
    b = y_in @ A.T
    return tuple(t.to(dtype) for t in (Q, p, G, h, A, b))


def kkt_residual(Q, p, G, h, A, b, y, lam, nu):
    """(B,) ∞-norm of stationarity, A y − b, complementarity (independent of the solver)."""
    stat = y @ Q + p + lam @ G + nu @ A
    comp = lam * (y @ G.T - h)
    return torch.cat([stat, y @ A.T - b, comp], -1).abs().amax(-1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fixed_point_matches_solve_qp(seed):
    Q, p, G, h, A, b = family(seed)
    res = ActiveSetQP(Q, p, G, h, A).solve(b, max_steps=50)
    ref = am.solve_qp(Q, p, G, h, A, b)
    assert bool(ref.solved.all()) and bool(res.solved.all())
    assert int((ref.lam > 1e-6).sum()) >= b.shape[0]  # not a vacuous test: rows are active
    torch.testing.assert_close(res.y, ref.z, atol=1e-8, rtol=0)
    torch.testing.assert_close(res.lam, ref.lam, atol=1e-8, rtol=0)
    torch.testing.assert_close(res.nu, ref.nu, atol=1e-8, rtol=0)
    assert kkt_residual(Q, p, G, h, A, b, res.y, res.lam, res.nu).max() < 1e-10
    assert bool((res.S == (res.lam > 0)).all()) and int(res.steps.max()) < 50


def test_fixed_point_matches_clarabel():
    pytest.importorskip("cvxpy")
    Q, p, G, h, A, b = family(3, B=6)
    res = ActiveSetQP(Q, p, G, h, A).solve(b, max_steps=50)
    assert bool(res.solved.all())
    for i in range(b.shape[0]):
        z, lam, nu = (torch.as_tensor(t) for t in clarabel_qp(Q, p, G, h, A, b[i]))
        torch.testing.assert_close(res.y[i], z, atol=1e-8, rtol=0)
        torch.testing.assert_close(res.lam[i], lam, atol=1e-8, rtol=0)
        torch.testing.assert_close(res.nu[i], nu, atol=1e-8, rtol=0)


def test_per_instance_h_matches_solve_qp():
    Q, p, G, h, A, b = family(4)
    g = torch.Generator().manual_seed(0)
    hb = h + 0.3 * torch.rand(b.shape[0], h.shape[0], generator=g, dtype=h.dtype)  # still feasible
    res = ActiveSetQP(Q, p, G, h, A).solve(b, h=hb, max_steps=50)
    ref = am.solve_qp(Q, p, G, hb, A, b)
    assert bool(res.solved.all())
    torch.testing.assert_close(res.y, ref.z, atol=1e-8, rtol=0)
    torch.testing.assert_close(res.lam, ref.lam, atol=1e-8, rtol=0)


def test_float32_matches_float64():
    data = family(5)
    y64 = ActiveSetQP(*data[:5]).solve(data[5], max_steps=50).y
    res = ActiveSetQP(*(t.float() for t in data[:5])).solve(data[5].float(), max_steps=50)
    assert bool(res.solved.all())
    torch.testing.assert_close(res.y.double(), y64, atol=1e-4, rtol=0)


def test_start_at_the_solution_stops_after_one_step():
    Q, p, G, h, A, b = family(6)
    qp = ActiveSetQP(Q, p, G, h, A)
    ref = am.solve_qp(Q, p, G, h, A, b)
    # interior-point solutions sit strictly inside; a small tolerance recovers the active set
    from_y = qp.solve(b, ref.z, tol_active=1e-6, max_steps=10)
    from_S = qp.solve(b, S0=ref.lam > 1e-6, max_steps=10)
    for res in (from_y, from_S):
        assert bool(res.solved.all()) and bool((res.steps == 1).all()) and len(res.iterates) == 2
        torch.testing.assert_close(res.y, ref.z, atol=1e-8, rtol=0)


def test_unfinished_or_infeasible_is_never_labelled_solved():
    Q, p, G, h, A, b = family(7)
    qp = ActiveSetQP(Q, p, G, h, A)
    one = qp.solve(b, max_steps=1)  # one step from S = ∅: the equality-only minimizer
    viol = (one.y @ G.T - h).amax(-1)
    assert bool((viol > 1e-3).any())  # some of them violate G y ≤ h …
    assert bool((one.solved == (viol <= qp.tol)).all())  # … and exactly those are not solved
    assert bool((one.status[~one.solved] == int(QPStatus.MAX_ITER)).all())
    none = qp.solve(b, torch.zeros_like(one.y), max_steps=0)
    assert not bool(none.solved.any()) and bool((none.steps == 0).all())

    # g y ≤ 0.1 and −g y ≤ −0.5 cannot both hold: no instance is feasible
    g = G[:1]
    bad = ActiveSetQP(Q, p, torch.cat([G, g, -g]), torch.cat([h, h.new_tensor([0.1, -0.5])]), A)
    res = bad.solve(b, max_steps=30)
    assert not bool(res.solved.any())
    assert set(res.status.tolist()) <= {int(QPStatus.MAX_ITER), int(QPStatus.NUMERICAL)}
    assert bool(torch.isfinite(res.y).all())


def test_gradient_for_a_fixed_active_set():
    Q, p, G, h, A, b = family(8, B=4)
    qp = ActiveSetQP(Q, p, G, h, A)
    res = qp.solve(b, max_steps=50)
    assert bool(res.solved.all())
    S = res.S
    assert torch.autograd.gradcheck(
        lambda bb, hh: qp.solve_active(S, bb, hh).y,
        (b.clone().requires_grad_(), h.expand(4, -1).clone().requires_grad_()),
    )
    # the unrolled iteration's gradient at its fixed point is the implicit one of solve_qp
    w = torch.randn_like(res.y)
    b1, b2 = b.clone().requires_grad_(), b.clone().requires_grad_()
    (g_as,) = torch.autograd.grad((qp.solve(b1, max_steps=50).y * w).sum(), b1)
    (g_qp,) = torch.autograd.grad((am.solve_qp(Q, p, G, h, A, b2).z * w).sum(), b2)
    torch.testing.assert_close(g_as, g_qp, atol=1e-7, rtol=1e-6)


def test_bad_data_is_refused():
    Q, p, G, h, A, _ = family(9)
    with pytest.raises(ValueError, match="positive definite"):
        ActiveSetQP(-Q, p, G, h, A)
    with pytest.raises(ValueError, match="full row rank"):
        ActiveSetQP(Q, p, G, h, torch.cat([A, A[:1]]))
