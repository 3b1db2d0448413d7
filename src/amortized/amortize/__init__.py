"""Amortized optimization: learn ŷ_θ(x) ≈ y*(x) = argmin_y f(y; x), refine, evaluate honestly."""

from amortized.amortize.amortizer import Amortizer
from amortized.amortize.losses import iterate_weights, objective_loss, penalty, regression_loss
from amortized.amortize.models import (
    MLP,
    AmortizedModel,
    BoxProjection,
    EqualityCompletion,
    SimplexProjection,
    SphereProjection,
)
from amortized.amortize.problem import Problem, check_problem
from amortized.amortize.refine import AdamRefiner, GradientRefiner, SolverRefiner
from amortized.amortize.report import EvalReport, time_to_match, timed

__all__ = [
    "MLP",
    "AdamRefiner",
    "AmortizedModel",
    "Amortizer",
    "BoxProjection",
    "EqualityCompletion",
    "EvalReport",
    "GradientRefiner",
    "Problem",
    "SimplexProjection",
    "SolverRefiner",
    "SphereProjection",
    "check_problem",
    "iterate_weights",
    "objective_loss",
    "penalty",
    "regression_loss",
    "time_to_match",
    "timed",
]
