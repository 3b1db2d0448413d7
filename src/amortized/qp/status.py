"""Per-problem outcome of a batched solve."""

from enum import IntEnum


class QPStatus(IntEnum):
    """Status codes stored in `QPSolution.status` (a LongTensor, one per problem)."""

    SOLVED = 0
    MAX_ITER = 1
    INFEASIBLE = 2
    NUMERICAL = 3
    UNBOUNDED = 4

    @property
    def message(self) -> str:
        return _MESSAGES[self]


_MESSAGES = {
    QPStatus.SOLVED: "solved: primal, dual residuals and duality gap within tolerance",
    QPStatus.MAX_ITER: "not converged within max_iter iterations; the iterate is not a solution",
    QPStatus.INFEASIBLE: "primal infeasible: a Farkas certificate (lam >= 0 with G^T lam + A^T nu = 0 "
    "and h^T lam + b^T nu < 0) was found",
    QPStatus.UNBOUNDED: "dual infeasible (unbounded below): a ray d with Qd = 0, Gd <= 0, Ad = 0 and "
    "p^T d < 0 was found",
    QPStatus.NUMERICAL: "numerical failure: non-finite input, or the KKT factorization broke down",
}
