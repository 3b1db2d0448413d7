import torch

import amortized as am


def test_unconstrained_qp_matches_linear_solve():
    Q = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    p = torch.tensor([1.0, -1.0], dtype=torch.float64)
    sol = am.solve_qp(Q, p)
    torch.testing.assert_close(sol.z[0], torch.linalg.solve(Q, -p))
    assert sol.status.tolist() == [am.QPStatus.SOLVED]
