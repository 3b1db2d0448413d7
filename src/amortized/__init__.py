"""amortized: differentiable and amortized optimization for PyTorch."""

from amortized.qp import QPFunction, QPLayer, QPSolution, QPStatus, solve_qp

__version__ = "0.1.0"
__all__ = ["QPFunction", "QPLayer", "QPSolution", "QPStatus", "solve_qp", "__version__"]

# issue 4: implicit differentiation, batched solvers, DEQ
from amortized import solvers  # noqa: E402
from amortized.deq import DEQ  # noqa: E402
from amortized.implicit import custom_fixed_point, custom_root  # noqa: E402
from amortized.solvers import SolverSolution, SolverStatus, argmin, fixed_point  # noqa: E402

__all__ += ["DEQ", "SolverSolution", "SolverStatus", "argmin", "custom_fixed_point", "custom_root",
            "fixed_point", "solvers"]
