"""Evaluation report of an amortized model against a reference solver, and honest timing."""

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor


def _sync(t: Tensor) -> None:
    if t.is_cuda:
        torch.cuda.synchronize(t.device)


def timed(fn: Callable[[], Tensor], *, repeats: int = 5, warmup: int = 1) -> tuple[float, Tensor]:
    """Median wall time (s) of `fn()` over `repeats` runs after `warmup` runs, and its output.

    Each run ends by consuming the output (a reduction read back to the host) and, on a GPU,
    synchronizing, so the time covers a result that is really there.
    """
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    out = None
    for _ in range(warmup):
        out = fn()
        _consume(out)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        _consume(out)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _consume(out: Tensor) -> float:
    _sync(out)
    return float(out.detach().sum())


def time_to_match(times: Sequence[float], values: Sequence[float], target: float) -> float | None:
    """First time at which the solver's value (lower is better) reaches `target`; None if never.

    times (T,) cumulative wall times of the solver's trace, values (T,) its quality at those
    times (e.g. the mean objective over the batch); target the model's quality.
    """
    if len(times) != len(values):
        raise ValueError(f"times and values differ in length ({len(times)} vs {len(values)})")
    for t, v in zip(times, values, strict=True):
        if v <= target:
            return float(t)
    return None


@dataclass
class EvalReport:
    """What `Amortizer.evaluate` measures on a held-out batch of contexts.

    Objectives are means over the instances. objective_gap = mean f(ŷ) − mean f(y*);
    objective_gap_rel = objective_gap / |mean f(y*)|. Distances are ‖ŷ − y*‖ (or the
    problem's own distance). Violations: max and mean over instances and constraints.
    Times are medians, per batch (all instances at once) and per instance (÷ n_instances).
    speedup_full_run = solver time ÷ model time; time_to_match_s is when the solver's trace
    first reaches the model's objective (None: never within its budget), and
    speedup_time_to_match = time_to_match_s ÷ model time.
    """

    n_instances: int
    refine_steps: int
    model_objective: float
    model_time_per_batch_s: float
    model_time_per_instance_s: float
    max_eq_violation: float
    mean_eq_violation: float
    max_ineq_violation: float
    mean_ineq_violation: float
    solver_objective: float | None = None
    objective_gap: float | None = None
    objective_gap_rel: float | None = None
    median_distance: float | None = None
    mean_distance: float | None = None
    solver_time_per_batch_s: float | None = None
    solver_time_per_instance_s: float | None = None
    speedup_full_run: float | None = None
    time_to_match_s: float | None = None
    speedup_time_to_match: float | None = None

    def to_dict(self) -> dict:
        """JSON-ready dict (non-finite floats become None)."""
        return {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()
        }
