"""amortized: differentiable and amortized optimization for PyTorch."""

from amortized import solvers
from amortized.amortize import Amortizer
from amortized.deq import DEQ
from amortized.implicit import custom_fixed_point, custom_root
from amortized.qp import QPFunction, QPLayer, QPSolution, QPStatus, solve_qp
from amortized.solvers import SolverSolution, SolverStatus, argmin, fixed_point

__version__ = "0.1.0"
__all__ = [
    "DEQ",
    "Amortizer",
    "QPFunction",
    "QPLayer",
    "QPSolution",
    "QPStatus",
    "SolverSolution",
    "SolverStatus",
    "__version__",
    "argmin",
    "custom_fixed_point",
    "custom_root",
    "fixed_point",
    "solve_qp",
    "solvers",
]
