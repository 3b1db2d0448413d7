"""`Amortizer`: learn ŷ_θ(x) ≈ y*(x), optionally refined by K differentiable solver steps.

Full amortization: y = ŷ_θ(x). Semi-amortization: y_K from K refinement steps started at
ŷ_θ(x) (`train_refine_steps`, the iterate-sum loss ℒ^Σ over y_0..y_K), trained through
either by unrolling the steps (`refine_grad="unroll"`) or implicitly (`"implicit"`: the
steps run without a graph and y_K gets the gradient of the refiner's fixed point through
`amortized.custom_root`). Test-time fine-tuning (`test_refine_steps`) warm-starts the
refiner from the prediction at evaluation time and is switched independently of
training-time refinement.
"""

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from amortized.amortize.losses import LOSSES, iterate_weights, objective_loss, regression_loss
from amortized.amortize.problem import check_problem, distance, violations
from amortized.amortize.refine import Refiner
from amortized.amortize.report import EvalReport, time_to_match, timed
from amortized.atomic import save_tensors, write_json


class Amortizer:
    """Train and evaluate an amortization model for a `Problem`.

    problem: a `Problem` (objective(y, x) -> (B,), sample(n, generator) -> (n, d_x), ...).
    model: nn.Module x (B, d_x) -> y (B, n) (projections included, see `amortize.models`).
    loss: "objective" (f(ŷ; x) + penalty_weight · soft penalty), "regression" (‖ŷ − y*‖²,
        needs labels) or "mixed" (regression_weight · reg + objective_weight · obj).
    refiner: a refiner callable (see `amortize.refine`), used for the K training-time steps
        (`train_refine_steps`, unrolled) and the test-time steps (`test_refine_steps`).
    weights: iterate weights of ℒ^Σ over y_0..y_K: "last", "constant", "increasing" or a list.
    refine_grad: how training differentiates the K refinement steps. "unroll": backprop
        through every step (memory and time grow with K). "implicit": the steps run without
        a graph and y_K is differentiated as a fixed point of the refiner (its
        `optimality(objective)`, e.g. ∇f = 0 or y = T(y)) with `amortized.custom_root`: a
        linear solve per problem, memory independent of K, exact when the steps have
        converged. The fixed point does not depend on where the steps started, so y_K
        passes no gradient to the model: the model learns from the y_0 term (its weight
        must be positive), and y_K trains the objective's own parameters (the problem's
        optional `objective_module`, e.g. a VAE decoder) and anything upstream of x. The
        intermediate iterates carry no gradient in this mode and their weights are unused.
    """

    def __init__(
        self,
        problem,
        model: nn.Module,
        *,
        loss: str = "objective",
        penalty_weight: float = 0.0,
        regression_weight: float = 1.0,
        objective_weight: float = 1.0,
        refiner: Refiner | None = None,
        train_refine_steps: int = 0,
        test_refine_steps: int = 0,
        weights="last",
        refine_grad: str = "unroll",
    ):
        check_problem(problem)
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if (train_refine_steps or test_refine_steps) and refiner is None:
            raise ValueError("refinement steps need a refiner (e.g. GradientRefiner(lr))")
        if train_refine_steps < 0 or test_refine_steps < 0:
            raise ValueError("refinement steps must be non-negative")
        self.problem, self.model, self.loss_kind = problem, model, loss
        self.penalty_weight, self.regression_weight, self.objective_weight = (
            penalty_weight,
            regression_weight,
            objective_weight,
        )
        self.refiner, self.train_refine_steps, self.test_refine_steps = (
            refiner,
            train_refine_steps,
            test_refine_steps,
        )
        if refine_grad not in ("unroll", "implicit"):
            raise ValueError(f"refine_grad must be 'unroll' or 'implicit', got {refine_grad!r}")
        self.weights, self.refine_grad = weights, refine_grad
        w = iterate_weights(weights, train_refine_steps, torch.zeros(()))  # validate early
        if refine_grad == "implicit" and train_refine_steps:
            if not hasattr(refiner, "optimality"):
                raise ValueError("refine_grad='implicit' needs a refiner with an optimality() function")
            if float(w[0]) == 0.0:
                raise ValueError(
                    "refine_grad='implicit' gives y_K no gradient w.r.t. the model: put weight on y_0 "
                    "(weights='constant', 'increasing' or a list with w_0 > 0)"
                )

    # ----------------------------------------------------------------- prediction
    def iterates(self, x: Tensor, steps: int, *, create_graph: bool) -> list[Tensor]:
        """[ŷ_θ(x), y_1, …, y_steps]: the prediction and its refinement iterates."""
        y0 = self.model(x)
        if hasattr(self.problem, "project"):  # the problem's own output projection, if any
            y0 = self.problem.project(y0, x)
        if steps == 0:
            return [y0]
        if create_graph and self.refine_grad == "implicit":
            return self._implicit_iterates(y0, x, steps)
        return self.refiner(self.problem.objective, y0, x, steps, create_graph=create_graph)

    def _implicit_iterates(self, y0: Tensor, x: Tensor, steps: int) -> list[Tensor]:
        """[y0, y_1, …, y_K]: the steps run without a graph; y_K is differentiable w.r.t. x and
        the objective module's parameters θ through F(y_K, x, θ) = 0 (`custom_root`)."""
        from amortized.implicit import custom_root

        module = getattr(self.problem, "objective_module", None)
        named = [] if module is None else [(k, p) for k, p in module.named_parameters() if p.requires_grad]
        names, thetas = [k for k, _ in named], [p for _, p in named]
        holder = _ObjectiveCall(self.problem, module)

        def f(y, x_, *theta):  # f(y; x) with θ explicit, so the backward can differentiate it
            if not theta:
                return self.problem.objective(y, x_)
            swapped = {f"module.{k}": t for k, t in zip(names, theta, strict=True)}
            return torch.func.functional_call(holder, swapped, (y, x_))

        def run(init, x_, *theta):
            ys = self.refiner(self.problem.objective, init, x_, steps, create_graph=False)
            return ys[-1], ys if len(ys) == steps + 1 else [init, ys[-1]]

        sym = bool(getattr(self.refiner, "symmetric", False))
        solver = custom_root(
            self.refiner.optimality(f), "cg" if sym else "gmres", symmetric=sym, has_aux=True
        )
        y_K, ys = solver(run)(y0.detach(), x, *thetas)
        return [y0, *ys[1:-1], y_K]

    def predict(self, x: Tensor, refine_steps: int | None = None) -> Tensor:
        """ŷ (B, n) for contexts x (B, d_x), after `refine_steps` (default test_refine_steps)."""
        steps = self.test_refine_steps if refine_steps is None else refine_steps
        with torch.no_grad():
            if steps == 0:
                return self.iterates(x, 0, create_graph=False)[0]
        return self.iterates(x, steps, create_graph=False)[-1].detach()

    # ----------------------------------------------------------------- training
    def loss(self, x: Tensor, y_star: Tensor | None = None) -> Tensor:
        """The training loss ℒ^Σ on a batch x (B, d_x), labels y_star (B, n) if any."""
        ys = self.iterates(x, self.train_refine_steps, create_graph=True)
        w = iterate_weights(self.weights, self.train_refine_steps, ys[0])
        if len(ys) == 2 and len(w) > 2:  # a refiner that returns only [y_0, y_K]
            w = torch.stack([w[0], w[1:].sum()])
        total = ys[0].new_zeros(())
        for k, (wk, y) in enumerate(zip(w, ys, strict=True)):
            implicit_middle = self.refine_grad == "implicit" and 0 < k < len(ys) - 1
            if float(wk) == 0.0 or implicit_middle:  # middle iterates carry no gradient here
                continue
            total = total + wk * self._loss_one(y, x, y_star)
        return total

    def _loss_one(self, y: Tensor, x: Tensor, y_star: Tensor | None) -> Tensor:
        if self.loss_kind == "regression":
            return regression_loss(y, y_star)
        obj = objective_loss(self.problem, y, x, self.penalty_weight)
        if self.loss_kind == "objective":
            return obj
        return self.regression_weight * regression_loss(y, y_star) + self.objective_weight * obj

    def fit(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        steps: int,
        batch_size: int,
        data: tuple[Tensor, Tensor | None] | None = None,
        generator: torch.Generator | None = None,
        scheduler=None,
        callback: Callable[[int, float], None] | None = None,
    ) -> list[float]:
        """Plain training loop: `steps` optimizer steps on minibatches of `batch_size`.

        data: (x (N, d_x), y* (N, n) or None) a fixed training set sampled with replacement;
        None draws fresh contexts from problem.sample each step. Nothing here is specific to
        one process, so the loop runs unchanged with a DDP-wrapped model under torchrun.
        Returns the loss of every step; callback(step, loss) is called after each step.
        """
        if steps < 0 or batch_size < 1:
            raise ValueError("steps must be >= 0 and batch_size >= 1")
        if self.loss_kind != "objective" and (data is None or data[1] is None):
            raise ValueError(f"loss {self.loss_kind!r} needs labelled data=(x, y_star)")
        history = []
        self.model.train()
        for step in range(steps):
            if data is None:
                x, y_star = self.problem.sample(batch_size, generator), None
            else:
                idx = torch.randint(data[0].shape[0], (batch_size,), generator=generator).to(data[0].device)
                x = data[0][idx]
                y_star = None if data[1] is None else data[1][idx]
            loss = self.loss(x, y_star)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            history.append(float(loss.detach()))
            if callback is not None:
                callback(step, history[-1])
        self.model.eval()
        return history

    # ----------------------------------------------------------------- evaluation
    def evaluate(
        self,
        x: Tensor,
        *,
        y_ref: Tensor | None = None,
        solver: Callable[[Tensor], Tensor] | None = None,
        solver_trace: tuple[list[float], list[float]] | None = None,
        refine_steps: int | None = None,
        repeats: int = 5,
        solver_repeats: int = 1,
    ) -> EvalReport:
        """Report on held-out contexts x (B, d_x), timed as one batch.

        Reference: y_ref (B, n) if given (then `solver`'s time, if also given, is still
        measured), else `solver(x)` or `problem.solve(x)` when present, timed.
        solver_trace: (cumulative times, mean objective) of a solver run on x, for
        time-to-match against the model's mean objective.
        """
        steps = self.test_refine_steps if refine_steps is None else refine_steps
        t_model, y = timed(lambda: self.predict(x, steps), repeats=repeats)
        B = x.shape[0]
        with torch.no_grad():
            f_model = self.problem.objective(y, x)
            v = violations(self.problem, y, x)
        if solver is None and hasattr(self.problem, "solve"):
            solver = self.problem.solve
        t_solver = None
        if solver is not None and (y_ref is None or solver_repeats > 0):
            t_solver, y_solved = timed(lambda: solver(x), repeats=max(solver_repeats, 1), warmup=0)
            y_ref = y_solved if y_ref is None else y_ref
        r = EvalReport(
            n_instances=B,
            refine_steps=steps,
            model_objective=float(f_model.mean()),
            model_time_per_batch_s=t_model,
            model_time_per_instance_s=t_model / B,
            max_eq_violation=_max(v["eq"]),
            mean_eq_violation=_mean(v["eq"]),
            max_ineq_violation=_max(v["ineq"]),
            mean_ineq_violation=_mean(v["ineq"]),
        )
        if y_ref is not None:
            with torch.no_grad():
                f_ref = float(self.problem.objective(y_ref, x).mean())
                d = distance(self.problem, y, y_ref)
            r.solver_objective = f_ref
            r.objective_gap = r.model_objective - f_ref
            r.objective_gap_rel = r.objective_gap / abs(f_ref) if f_ref != 0 else float("inf")
            r.median_distance, r.mean_distance = float(d.median()), float(d.mean())
        if t_solver is not None:
            r.solver_time_per_batch_s, r.solver_time_per_instance_s = t_solver, t_solver / B
            r.speedup_full_run = t_solver / t_model
        if solver_trace is not None:
            r.time_to_match_s = time_to_match(*solver_trace, r.model_objective)
            if r.time_to_match_s is not None:
                r.speedup_time_to_match = r.time_to_match_s / t_model
        return r

    # ----------------------------------------------------------------- checkpoints
    def save(self, path: str | Path, meta: dict | None = None) -> None:
        """Weights to `path` (.safetensors) and a JSON sidecar `path`.json, both atomically.

        The sidecar records the model class, dtype, library version, the amortizer's
        settings and `meta` (e.g. layer sizes needed to rebuild the model).
        """
        from amortized import __version__

        path = Path(path)
        state = {k: v.detach().cpu().contiguous().clone() for k, v in self.model.state_dict().items()}
        dtypes = sorted({str(v.dtype) for v in state.values() if v.is_floating_point()})
        sidecar = {
            "format": "amortized.Amortizer/1",
            "library_version": __version__,
            "model_class": f"{type(self.model).__module__}.{type(self.model).__qualname__}",
            "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
            "problem_class": type(self.problem).__qualname__,
            "loss": self.loss_kind,
            "penalty_weight": self.penalty_weight,
            "train_refine_steps": self.train_refine_steps,
            "test_refine_steps": self.test_refine_steps,
            "weights": self.weights,
            "refine_grad": self.refine_grad,
            "meta": meta or {},
        }
        save_tensors(state, path)
        write_json(Path(str(path) + ".json"), sidecar)

    def load(self, path: str | Path) -> dict:
        """Load weights saved by `save` into this model (strict); returns the sidecar dict."""
        from safetensors.torch import load_file

        path = Path(path)
        sidecar = json.loads(Path(str(path) + ".json").read_text())
        expected = f"{type(self.model).__module__}.{type(self.model).__qualname__}"
        if sidecar.get("model_class") != expected:
            raise ValueError(f"checkpoint holds a {sidecar.get('model_class')}, this model is a {expected}")
        device = next(iter(self.model.parameters()), torch.zeros(())).device
        try:
            self.model.load_state_dict(load_file(str(path), device=str(device)))
        except RuntimeError as e:
            raise ValueError(f"checkpoint {path} does not match this model's parameters: {e}") from None
        return sidecar


class _ObjectiveCall(nn.Module):
    """(y, x) ↦ problem.objective(y, x) as a module holding the objective's parameters, so
    torch.func.functional_call can substitute them (the implicit backward needs θ explicit)."""

    def __init__(self, problem, module: nn.Module | None):
        super().__init__()
        self.problem, self.module = problem, module

    def forward(self, y: Tensor, x: Tensor) -> Tensor:
        return self.problem.objective(y, x)


def _max(v: Tensor) -> float:
    return float(v.max()) if v.numel() else 0.0


def _mean(v: Tensor) -> float:
    return float(v.mean()) if v.numel() else 0.0
