"""Robustness of solve_qp: infeasible and unbounded members of a batch with their
certificates, rank-deficient equalities, elastic mode, and property tests on random
feasible QPs (hypothesis)."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import amortized as am
from amortized.problems.random_qp import FAMILIES, random_qp
from reference import clarabel_qp
from test_qp_solve import kkt_residual

INFEASIBLE, UNBOUNDED = int(am.QPStatus.INFEASIBLE), int(am.QPStatus.UNBOUNDED)


def _lp_batch():
    """Four LPs in R³ with box-like rows: 0 and 3 bounded, 1 infeasible (z₀ ≤ −1 and
    z₀ ≥ 1), 2 unbounded (min −z₀ with z₀ free above)."""
    eye = torch.eye(3, dtype=torch.float64)
    G = torch.cat([eye, -eye]).expand(4, 6, 3).clone()
    h = torch.ones(4, 6, dtype=torch.float64)
    h[1, 0], h[1, 3] = -1.0, -1.0
    G[2, 0] = 0.0  # drop the upper bound on z₀
    h[2, 0] = 0.0
    p = torch.tensor([[1.0, -2, 0.5], [1, 1, 1], [-1, 0.5, 0], [-1, -1, 1]], dtype=torch.float64)
    Q = torch.zeros(4, 3, 3, dtype=torch.float64)
    return Q, p, G, h


def test_unbounded_member_gets_a_ray_and_infeasible_is_never_solved():
    Q, p, G, h = _lp_batch()
    sol = am.solve_qp(Q, p, G, h)
    assert sol.status.tolist() == [0, INFEASIBLE, UNBOUNDED, 0]
    # bounded members: the box vertex minimizing pᵀz
    for k in (0, 3):
        torch.testing.assert_close(sol.z[k], -torch.sign(p[k]), rtol=0, atol=1e-9)
    # ray, scaled to pᵀd = −1
    d = sol.z[2]
    torch.testing.assert_close(p[2] @ d, torch.tensor(-1.0, dtype=torch.float64), rtol=0, atol=1e-9)
    assert (G[2] @ d).max() <= 1e-6 and d.abs().max() < 10
    assert am.QPStatus.UNBOUNDED.message.startswith("dual infeasible")


def test_infeasible_member_certificate_is_normalized():
    Q, p, G, h = _lp_batch()
    Q = Q + 0.1 * torch.eye(3, dtype=torch.float64)  # a QP: its infeasibility is certified
    sol = am.solve_qp(Q[:2], p[:2], G[:2], h[:2])
    assert sol.status.tolist() == [0, INFEASIBLE]
    lam = sol.lam[1]
    assert (lam >= 0).all()
    torch.testing.assert_close(h[1] @ lam, torch.tensor(-1.0, dtype=torch.float64), rtol=0, atol=1e-9)
    assert (G[1].T @ lam).abs().max() <= 1e-6


def test_infeasible_lp_is_certified():
    """An LP has no strictly feasible dual to pull the iterates in: λ must grow into the
    certificate without the interior point method jamming first."""
    Q, p, G, h = _lp_batch()
    sol = am.solve_qp(Q[1], p[1], G[1], h[1])
    assert sol.status.tolist() == [INFEASIBLE]
    lam = sol.lam[0]
    assert (lam >= 0).all()
    torch.testing.assert_close(h[1] @ lam, torch.tensor(-1.0, dtype=torch.float64), rtol=0, atol=1e-9)
    assert (G[1].T @ lam).abs().max() <= 1e-6


def test_infeasible_dense_lp_is_certified():
    """The same LP rotated (G dense): the primal form, not the separable one."""
    Q, p, G, h = _lp_batch()
    R = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))).Q
    assert am.solve_qp(Q[1], p[1] @ R, G[1] @ R, h[1]).status[0] == INFEASIBLE


def test_unsolved_members_get_zero_gradients_others_exact():
    Q, p, G, h = _lp_batch()
    Q = Q + 0.1 * torch.eye(3, dtype=torch.float64) * torch.tensor([1.0, 0, 0, 1]).view(4, 1, 1)
    p = p.clone().requires_grad_(True)
    sol = am.solve_qp(Q, p, G, h)
    with pytest.warns(RuntimeWarning, match="not SOLVED"):
        (grad,) = torch.autograd.grad(sol.z.sum(), p)
    assert grad[1:3].abs().max() == 0
    assert torch.isfinite(grad).all() and grad[0].abs().max() > 0


def test_rank_deficient_equalities_with_consistent_b():
    """A with a repeated row and a row that is a sum of others: the answer matches the
    QP with the redundant rows removed."""
    Q, p, G, h, A, b = random_qp(3, 8, 6, 3, generator=torch.Generator().manual_seed(11))
    A2 = torch.cat([A, A[:, :1], A[:, 1:2] + A[:, 2:3]], 1)
    b2 = torch.cat([b, b[:, :1], b[:, 1:2] + b[:, 2:3]], 1)
    sol = am.solve_qp(Q, p, G, h, A2, b2)
    assert sol.solved.all()
    for k in range(3):
        z, _, _ = clarabel_qp(*(x[k].numpy() for x in (Q, p, G, h, A, b)))
        np.testing.assert_allclose(sol.z[k].numpy(), z, rtol=0, atol=1e-7)
    assert (sol.primal_residual <= 1e-9).all()


def test_elastic_exact_on_feasible_and_least_l1_on_infeasible():
    import cvxpy as cp

    Q, p, G, h, A, b = random_qp(3, 6, 5, 2, generator=torch.Generator().manual_seed(3))
    G, h = G.clone(), h.clone()
    G[1, 0], G[1, 1] = 0.0, 0.0
    G[1, 0, 0], G[1, 1, 0] = 1.0, -1.0  # z₀ ≤ −1 and −z₀ ≤ −1
    h[1, 0], h[1, 1] = -1.0, -1.0
    w = 10.0
    sol = am.solve_qp(Q, p, G, h, A, b, elastic=w)
    assert sol.solved.all()
    plain = am.solve_qp(Q, p, G, h, A, b)
    assert plain.status.tolist() == [0, INFEASIBLE, 0]
    for k in (0, 2):  # feasible, weight above the multipliers: the QP's own solution
        torch.testing.assert_close(sol.z[k], plain.z[k], rtol=0, atol=1e-8)
        torch.testing.assert_close(sol.lam[k], plain.lam[k], rtol=0, atol=1e-8)
        torch.testing.assert_close(sol.nu[k], plain.nu[k], rtol=0, atol=1e-8)
        assert sol.relaxation[k].abs().max() <= 1e-9
    Qn, pn, Gn, hn, An, bn = (x[1].numpy() for x in (Q, p, G, h, A, b))
    z, t = cp.Variable(6), cp.Variable(5)
    obj = 0.5 * cp.quad_form(z, Qn) + pn @ z + w * (cp.sum(t) + cp.norm1(An @ z - bn))
    cp.Problem(cp.Minimize(obj), [Gn @ z <= hn + t, t >= 0]).solve(
        solver="CLARABEL", tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10
    )
    np.testing.assert_allclose(sol.z[1].numpy(), z.value, rtol=0, atol=1e-6)
    np.testing.assert_allclose(sol.relaxation[1, :5].numpy(), t.value, rtol=0, atol=1e-6)
    assert abs(sol.relaxation[1].abs().sum().item() - 2.0) <= 1e-8  # the two rows conflict by 2


def test_elastic_gradient_shrinks_the_violation():
    """d‖relaxation‖₁/dh by implicit differentiation matches central differences, and a
    gradient step on h reduces the violation."""
    Q, p, G, h, A, b = random_qp(1, 4, 4, 1, generator=torch.Generator().manual_seed(5))
    h = h.clone()
    h[0, 0] = -50.0  # out of reach of the other rows: infeasible
    h.requires_grad_(True)

    def violation(h):
        return am.solve_qp(Q, p, G, h, A, b, elastic=100.0).relaxation.abs().sum()

    v = violation(h)
    (g,) = torch.autograd.grad(v, h)
    direction = torch.randn(h.shape, generator=torch.Generator().manual_seed(0), dtype=h.dtype)
    step = 1e-5
    with torch.no_grad():
        fd = (violation(h + step * direction) - violation(h - step * direction)) / (2 * step)
    torch.testing.assert_close((g * direction).sum(), fd, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        assert violation(h - 0.1 * g) < v


def test_elastic_rejects_bad_weight():
    Q, p, G, h, A, b = random_qp(1, 3, 2, 1, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="positive penalty"):
        am.solve_qp(Q, p, G, h, A, b, elastic=0.0)


@st.composite
def feasible_qps(draw):
    """A batch from one of the families, or OptNet's protocol at random sizes."""
    family = draw(st.sampled_from(["sized", "optnet", "box", "degenerate", "lp_box", "separable"]))
    B = draw(st.integers(1, 4))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if family == "sized":
        n = draw(st.integers(1, 12))
        return random_qp(B, n, draw(st.integers(0, 12)), draw(st.integers(0, min(n - 1, 4))), generator=g)
    return FAMILIES[family](B, torch.float64, g)


_settings = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_settings
@given(feasible_qps())
def test_property_random_feasible_qps_solve_with_small_kkt_residuals(data):
    sol = am.solve_qp(*data)
    assert sol.solved.all(), sol.status
    assert kkt_residual(data, sol) <= 1e-8


@_settings
@given(feasible_qps(), st.integers(0, 3))
def test_property_answer_does_not_depend_on_the_batch(data, k):
    k = k % data[1].shape[0]
    full = am.solve_qp(*data)
    alone = am.solve_qp(*(x[k : k + 1] for x in data))
    torch.testing.assert_close(alone.z[0], full.z[k], rtol=0, atol=1e-8)
    assert alone.status[0] == full.status[k]


@pytest.mark.parametrize("cost", [1.0, 1e4])
def test_unbounded_detected_on_badly_scaled_data(cost):
    """Rows and columns scaled by 1e±3 (Ruiz rescales them): the ray is still found and is
    reported in the original coordinates."""
    G = torch.tensor([[0, 1e3, 0], [0, 0, 1e-3], [0, 0, -1e-3], [-1.0, 0, 0]], dtype=torch.float64)
    h = torch.ones(4, dtype=torch.float64)
    p = cost * torch.tensor([-1.0, 0, 0], dtype=torch.float64)
    sol = am.solve_qp(torch.zeros(3, 3, dtype=torch.float64), p, G, h)
    assert sol.status.tolist() == [UNBOUNDED]
    d = sol.z[0]
    torch.testing.assert_close(p @ d, torch.tensor(-1.0, dtype=torch.float64), rtol=0, atol=1e-9)
    assert (G @ d).max() <= 1e-6 * d.abs().max()
