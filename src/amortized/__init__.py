"""amortized: differentiable and amortized optimization for PyTorch."""

from amortized.qp import QPFunction, QPLayer, QPSolution, QPStatus, solve_qp

__version__ = "0.1.0"
__all__ = ["QPFunction", "QPLayer", "QPSolution", "QPStatus", "solve_qp", "__version__"]
