"""Dense batched QPs: the OptNet core (solve, differentiate, layer)."""

from amortized.qp.active_set import ActiveSetQP, ActiveSetResult, ActiveSetStep
from amortized.qp.function import QPFunction
from amortized.qp.layer import QPLayer
from amortized.qp.solve import QPSolution, solve_qp
from amortized.qp.status import QPStatus

__all__ = [
    "ActiveSetQP",
    "ActiveSetResult",
    "ActiveSetStep",
    "QPFunction",
    "QPLayer",
    "QPSolution",
    "QPStatus",
    "solve_qp",
]
