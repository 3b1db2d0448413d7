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
