"""solve_qp against Clarabel on six random families, in float64 and float32."""

import numpy as np
import pytest
import torch

import amortized as am
import amortized.qp.pdipm as pdipm_module
from amortized.problems.random_qp import FAMILIES, random_qp
from reference import clarabel_qp

B = 6
# families whose duals are unique (no duplicated rows, no degenerate vertex)
UNIQUE_DUALS = {"optnet", "box", "equality", "tall"}


@pytest.fixture(scope="module")
def references():
    out = {}
    for i, (name, make) in enumerate(FAMILIES.items()):
        data = make(B, torch.float64, torch.Generator().manual_seed(100 + i))
        out[name] = data, [clarabel_qp(*(x[k].numpy() for x in data)) for k in range(B)]
    return out


def kkt_residual(data, sol):
    """Max relative KKT violation of a solution, computed independently of the solver."""
    Q, p, G, h, A, b = (x.double() for x in data)
    z, lam, nu = sol.z.double(), sol.lam.double(), sol.nu.double()
    mv = lambda M, x: (M @ x.unsqueeze(-1)).squeeze(-1)
    stat = mv(Q, z) + p + mv(G.mT, lam) + mv(A.mT, nu)
    prim = torch.cat([(mv(G, z) - h).clamp(min=0), (mv(A, z) - b).abs()], -1)
    comp = (lam * (h - mv(G, z))).abs()
    scale = 1 + max(x.abs().max() for x in (Q, p, G, h, A, b) if x.numel())
    parts = [
        stat.abs().amax(-1),
        prim.amax(-1) if prim.shape[-1] else 0 * z[:, 0],
        comp.amax(-1) if comp.shape[-1] else 0 * z[:, 0],
        (-lam).clamp(min=0).amax(-1) if lam.shape[-1] else 0 * z[:, 0],
    ]
    return (torch.stack(parts).amax(0) / scale).max().item()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_matches_clarabel(references, family, dtype):
    data, refs = references[family]
    sol = am.solve_qp(*(x.to(dtype) for x in data))
    assert sol.status.tolist() == [am.QPStatus.SOLVED] * B
    z_tol, kkt_tol = (1e-7, 1e-8) if dtype == torch.float64 else (2e-4, 1e-5)
    for k, (z, lam, nu) in enumerate(refs):
        scale = 1 + np.abs(z).max()
        assert np.abs(sol.z[k].double().numpy() - z).max() <= z_tol * scale
        if family in UNIQUE_DUALS:
            dscale = 1 + max(np.abs(lam).max(initial=0), np.abs(nu).max(initial=0))
            assert np.abs(sol.lam[k].double().numpy() - lam).max(initial=0) <= 10 * z_tol * dscale
            assert np.abs(sol.nu[k].double().numpy() - nu).max(initial=0) <= 10 * z_tol * dscale
    assert kkt_residual(data, sol) <= kkt_tol
    assert (sol.lam >= 0).all()
    assert torch.isfinite(sol.primal_residual).all() and torch.isfinite(sol.dual_residual).all()


def test_lp_box_float32_never_wrongly_solved(references):
    data, refs = references["lp_box"]
    sol = am.solve_qp(*(x.float() for x in data))
    for k, (z, _, _) in enumerate(refs):
        if sol.status[k] == am.QPStatus.SOLVED:
            assert np.abs(sol.z[k].double().numpy() - z).max() <= 2e-4 * (1 + np.abs(z).max())


def test_float32_polish_within_rounding_is_solved():
    """Batches of OptNet-protocol problems in float32 where one problem (|z| = 120-400,
    cond Q = 1e3-4e3) has a polished point exact to rounding whose gap cannot read below
    float32's 3e-6 relative: it is accepted at the polish, at iteration 4. Before, those
    problems wandered near eps to max_iter and MAX_ITER (B = 64, seeds 6, 14) or for 18
    iterations (seed 29), no more accurate (float32's 1e-4 relative target). In the last
    (B = 128, seed 1) three refinement steps leave the polished point at 100·eps: ten more,
    for it alone, bring it within rounding (it too was MAX_ITER). In (B = 128, seed 38),
    |z| = 1,100 and cond Q = 4,300: the polished point's dual residual reads 12·eps, all of
    it rounding, and was rejected above 10·eps (MAX_ITER at 100 iterations, 3e-5 off)."""
    for B, seed, k in ((64, 6, 58), (64, 14, 3), (64, 29, 7), (128, 1, 21), (128, 38, 79)):
        data = random_qp(B, 10, 10, 0, generator=torch.Generator().manual_seed(seed))
        sol = am.solve_qp(*(x.float() for x in data))
        assert sol.solved.all()
        assert int(sol.iters.max()) <= 8
        z, _, _ = clarabel_qp(*(x[k].numpy() for x in data))
        assert np.abs(sol.z[k].double().numpy() - z).max() <= 1e-4 * (1 + np.abs(z).max())


def test_float32_polish_refined_short_is_not_taken_near_eps():
    """Batch seed 19 needs the dense primal form (ρ = 3.4e-3 where Q is not comfortably
    positive definite): problem 36 (|z| = 56, cond Q = 3.2e3) refines its polish at only
    2.4× a step, and ten steps left it 5.9e-5 off at 15·eps, within the rounding test. A
    polished point is taken above eps only when its refinement reached its noise floor;
    the iterations then end it 5e-7 off."""
    data = random_qp(128, 10, 10, 0, generator=torch.Generator().manual_seed(19))
    sol, ref = am.solve_qp(*(x.float() for x in data)), am.solve_qp(*data)
    assert sol.solved.all() and int(sol.iters.max()) <= 8
    err = (sol.z.double() - ref.z).abs().amax(-1) / (1 + ref.z.abs().amax(-1))
    assert err[36] <= 1e-5 and err.max() <= 1e-4


def test_answer_independent_of_batch():
    data = FAMILIES["optnet"](5, torch.float64, torch.Generator().manual_seed(3))
    full = am.solve_qp(*data).z
    for k in (0, 3):
        alone = am.solve_qp(*(x[k : k + 1] for x in data)).z
        torch.testing.assert_close(alone[0], full[k], rtol=0, atol=1e-9)


def test_broadcast_arguments():
    Q, p, G, h, A, b = FAMILIES["optnet"](4, torch.float64, torch.Generator().manual_seed(4))
    # shared Q, G, h, A, b; batched p
    sol = am.solve_qp(Q[0], p, G[0], h[0], A[0], b[0])
    for k in range(4):
        ref = am.solve_qp(Q[0], p[k], G[0], h[0], A[0], b[0]).z[0]
        torch.testing.assert_close(sol.z[k], ref, rtol=0, atol=1e-9)
    # a batch of one broadcasts like no batch dimension
    one = am.solve_qp(Q[:1], p, G[:1], h[:1], A[:1], b[:1])
    torch.testing.assert_close(one.z, sol.z, rtol=0, atol=1e-9)


def test_warm_start_from_solution_is_fast_and_same():
    data = FAMILIES["optnet"](4, torch.float64, torch.Generator().manual_seed(5))
    cold = am.solve_qp(*data)
    warm = am.solve_qp(*data, warm_start=cold.z)
    torch.testing.assert_close(warm.z, cold.z, rtol=0, atol=1e-8)
    assert warm.solved.all()


def test_infeasible_problem_flagged_while_others_solve():
    """An infeasible member is reported INFEASIBLE with a Farkas certificate; the others
    are SOLVED with the same answers as when solved alone (a finished problem stops
    changing while the rest of the batch iterates)."""
    Q, p, G, h, A, b = FAMILIES["optnet"](4, torch.float64, torch.Generator().manual_seed(6))
    G, h = G.clone(), h.clone()
    G[2, 1] = -G[2, 0]  # rows 0 and 1 become g·z <= h0 and -g·z <= h1 with h0 + h1 < 0
    h[2, 0], h[2, 1] = -1.0, -1.0
    sol = am.solve_qp(Q, p, G, h, A, b)
    assert sol.status.tolist() == [0, 0, int(am.QPStatus.INFEASIBLE), 0]
    lam, nu = sol.lam[2], sol.nu[2]
    # the certificate: λ ≥ 0, Gᵀλ + Aᵀν ≈ 0 and hᵀλ + bᵀν < 0
    assert (lam >= 0).all()
    farkas = h[2] @ lam + b[2] @ nu
    assert farkas < 0
    assert (G[2].T @ lam + A[2].T @ nu).abs().max() <= 1e-6 * -farkas
    for k in (0, 1, 3):
        alone = am.solve_qp(Q[k], p[k], G[k], h[k], A[k], b[k]).z[0]
        torch.testing.assert_close(sol.z[k], alone, rtol=0, atol=1e-9)


def test_reduced_problem_hands_over_to_the_full_one(monkeypatch):
    """float64 problems with many equality rows iterate in A's null space (`pdipm._reduced`);
    those it does not solve in _REDUCED_MAX_ITER iterations are solved again on the full
    problem: capped at 2 here, every problem is, and ends SOLVED at the same answer,
    reporting the full solve's iterations (≤ max_iter)."""
    data = FAMILIES["optnet"](4, torch.float64, torch.Generator().manual_seed(7))
    want = am.solve_qp(*data)
    monkeypatch.setattr(pdipm_module, "_REDUCED_MAX_ITER", 2)
    got = am.solve_qp(*data)
    assert got.solved.all() and (got.iters > 2).all()
    capped = am.solve_qp(*data, max_iter=4)  # 2 reduced, then 4 on the full problem
    assert (capped.iters <= 4).all() and not capped.solved.any()
    for a, b in ((got.z, want.z), (got.lam, want.lam), (got.nu, want.nu)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
