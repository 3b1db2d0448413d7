"""A drop-in replacement for qpth's `QPFunction`."""

import warnings

from torch import Tensor

from amortized.qp.solve import default_eps, solve_qp


class QPFunction:
    """qpth-compatible: `QPFunction(eps=, verbose=, notImprovedLim=, maxIter=,
    check_Q_spd=)(Q, p, G, h, A, b) -> z`.

    Same shapes and conventions as qpth.qp.QPFunction: Q (nBatch, n, n) or (n, n), p
    (nBatch, n) or (n,), G (nBatch, m, n), h (nBatch, m), A (nBatch, q, n), b (nBatch, q);
    empty tensors mean "no such constraints". Differences, on purpose: `eps` is a relative
    tolerance and is raised to what the dtype can reach (qpth's 1e-12 default is below
    float32's precision); `maxIter` below 50 is raised to 50 because qpth's 20 stops
    harder problems early; gradients of broadcast arguments are summed, not averaged; a
    problem that is not solved triggers a warning instead of a print.
    notImprovedLim is accepted and ignored.
    """

    def __init__(self, eps=1e-12, verbose=0, notImprovedLim=3, maxIter=20, check_Q_spd=True):
        self.eps, self.verbose, self.maxIter, self.check_Q_spd = eps, verbose, maxIter, check_Q_spd

    def __call__(self, Q: Tensor, p: Tensor, G: Tensor, h: Tensor, A: Tensor, b: Tensor) -> Tensor:
        eps = max(self.eps, default_eps(p.dtype))
        sol = solve_qp(
            Q,
            p,
            G,
            h,
            A,
            b,
            eps=eps,
            max_iter=max(self.maxIter, 50),
            check_convexity=self.check_Q_spd,
        )
        if self.verbose >= 0 and not bool(sol.solved.all()):
            bad = (~sol.solved).nonzero().flatten().tolist()[:10]
            warnings.warn(
                f"QPFunction: problems {bad} not solved (status {sol.status[bad].tolist()})",
                RuntimeWarning,
                stacklevel=2,
            )
        return sol.z
