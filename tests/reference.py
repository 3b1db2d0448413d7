"""Independent references for the tests: cvxpy + Clarabel at tight tolerances."""

import numpy as np


def clarabel_qp(Q, p, G, h, A, b):
    """Solve one QP with Clarabel; returns z, λ, ν as numpy arrays (our sign convention)."""
    import cvxpy as cp

    Q, p, G, h, A, b = (np.asarray(x, dtype=np.float64) for x in (Q, p, G, h, A, b))
    z = cp.Variable(p.shape[0])
    cons = []
    if G.shape[0]:
        cons.append(G @ z <= h)
    if A.shape[0]:
        cons.append(A @ z == b)
    prob = cp.Problem(cp.Minimize(0.5 * cp.quad_form(z, cp.psd_wrap(Q)) + p @ z), cons)
    prob.solve(solver="CLARABEL", tol_feas=1e-10, tol_gap_abs=1e-10, tol_gap_rel=1e-10, max_iter=500)
    assert prob.status == "optimal", prob.status
    lam = cons[0].dual_value if G.shape[0] else np.zeros(0)
    nu = cons[-1].dual_value if A.shape[0] else np.zeros(0)
    return z.value, np.atleast_1d(lam), np.atleast_1d(nu)
