"""The smallest Maros–Meszaros problems: solved, with qpbenchmark's residual checks."""

import pytest
import torch

import amortized as am
from amortized.problems import maros_meszaros as mm

SMALL = [
    "HS21",
    "HS35",
    "HS35MOD",
    "HS51",
    "HS52",
    "HS53",
    "HS76",
    "HS118",
    "HS268",
    "S268",
    "TAME",
    "QPTEST",
    "ZECEVIC2",
    "GENHS28",
    "LOTSCHD",
    "DUALC2",
    "DUALC5",
]


@pytest.mark.parametrize("name", SMALL)
def test_small_problem_solved_with_small_residuals(name):
    pytest.importorskip("scipy")
    prob = mm.load(name)
    sol = am.solve_qp(*prob.data)
    assert sol.status.tolist() == [am.QPStatus.SOLVED]
    r = mm.residuals(prob, sol.z[0], sol.lam[0], sol.nu[0])
    assert max(r.values()) <= 1e-6, r


def test_conversion_keeps_the_bounds():
    """HS21: 10x1 − x2 ≥ 10, 2 ≤ x1 ≤ 50, −50 ≤ x2 ≤ 50 becomes five rows of G z ≤ h."""
    pytest.importorskip("scipy")
    prob = mm.load("HS21")
    assert prob.G.shape == (5, 2) and prob.A.shape == (0, 2)
    z = torch.tensor([2.0, 0.0], dtype=torch.float64)  # the known solution
    assert (prob.G @ z <= prob.h + 1e-12).all()
    torch.testing.assert_close(am.solve_qp(*prob.data).z[0], z, atol=1e-7, rtol=0)


# degenerate LPs with a small quadratic term, where the interior point method used to jam
# (a slack rounded away under the KKT solve's error) or creep along a free face by |r_d|/ρ
DEGENERATE = ["QSCAGR7", "QSHARE1B", "QBRANDY", "QE226"]


@pytest.mark.parametrize("name", DEGENERATE)
def test_degenerate_lp_solved(name):
    pytest.importorskip("scipy")
    prob = mm.load(name)
    sol = am.solve_qp(*prob.data, max_iter=200, eps_abs=1e-9)
    assert sol.status.tolist() == [am.QPStatus.SOLVED]
    r = mm.residuals(prob, sol.z[0], sol.lam[0], sol.nu[0])
    assert max(r.values()) <= 1e-6, r


def test_eps_abs_below_rounding_is_met_at_the_rounding_error():
    """QSCAGR7's gap sums terms of 5e7: float64 resolves it to ~1e-8 only. Asked for 1e-12,
    the solver reports SOLVED with each residual within 10·ε of the magnitudes summed in it
    (measured here on the original data, independently of the solver's scaling)."""
    pytest.importorskip("scipy")
    prob = mm.load("QSCAGR7")
    Q, p, G, h, A, b = prob.data
    sol = am.solve_qp(Q, p, G, h, A, b, max_iter=200, eps_abs=1e-12)
    assert sol.status.tolist() == [am.QPStatus.SOLVED]
    z, lam, nu = sol.z[0], sol.lam[0], sol.nu[0]
    r = mm.residuals(prob, z, lam, nu)
    eps = torch.finfo(torch.float64).eps
    gap_terms = (z @ Q @ z).abs() + (p @ z).abs() + (h @ lam).abs() + (b @ nu).abs()
    dual_terms = (Q.abs() @ z.abs() + p.abs() + G.abs().T @ lam.abs() + A.abs().T @ nu.abs()).max()
    assert r["gap"] <= 10 * eps * gap_terms and gap_terms > 1e7
    assert r["dual"] <= max(1e-12, 10 * eps * dual_terms)
    assert r["primal"] <= 1e-9
