"""amortized: differentiable and amortized optimization for PyTorch."""

from amortized.amortize import Amortizer
from amortized.qp import QPFunction, QPLayer, QPSolution, QPStatus, solve_qp

__version__ = "0.1.0"
__all__ = ["Amortizer", "QPFunction", "QPLayer", "QPSolution", "QPStatus", "solve_qp", "__version__"]
