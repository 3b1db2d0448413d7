"""The amortization framework on a problem with a known solution map.

ParametricQuadratic: f(y; x) = ½ (y − W x)ᵀ H (y − W x), so y*(x) = W x (linear) and a
bias-free linear model can represent it exactly.
"""

import json
import math

import pytest
import torch
from torch import nn

from amortized.amortize import (
    MLP,
    AdamRefiner,
    AmortizedModel,
    Amortizer,
    BoxProjection,
    EqualityCompletion,
    GradientRefiner,
    SimplexProjection,
    SolverRefiner,
    SphereProjection,
    iterate_weights,
    time_to_match,
)

D, N = 3, 4


class ParametricQuadratic:
    context_dim, solution_dim = D, N

    def __init__(self, seed=0, dtype=torch.float64):
        g = torch.Generator().manual_seed(seed)
        M = torch.randn(N, N, generator=g, dtype=dtype)
        self.H = M @ M.T / N + 0.5 * torch.eye(N, dtype=dtype)
        self.W = torch.randn(N, D, generator=g, dtype=dtype)
        self.dtype = dtype

    def objective(self, y, x):
        r = y - x @ self.W.T
        return 0.5 * ((r @ self.H) * r).sum(-1)

    def sample(self, n, generator=None):
        return torch.randn(n, D, generator=generator, dtype=self.dtype)

    def solve(self, x):
        return x @ self.W.T


def linear_model(seed=1):
    torch.manual_seed(seed)
    return AmortizedModel(nn.Linear(D, N, bias=False).double())


def fit(am, *, steps=400, lr=0.05, data=None):
    g = torch.Generator().manual_seed(3)
    am.fit(
        torch.optim.Adam(am.model.parameters(), lr=lr),
        steps=steps,
        batch_size=64,
        data=data,
        generator=g,
    )


def labelled(prob, n=512):
    x = prob.sample(n, torch.Generator().manual_seed(5))
    return x, prob.solve(x)


@pytest.mark.parametrize("loss", ["regression", "objective", "mixed"])
def test_each_loss_recovers_the_solution_map(loss):
    prob = ParametricQuadratic()
    am = Amortizer(prob, linear_model(), loss=loss)
    w0 = (am.model.net.weight - prob.W).abs().max().item()
    fit(am, data=None if loss == "objective" else labelled(prob))
    err = (am.model.net.weight - prob.W).abs().max().item()
    assert err < 1e-2 < w0


@pytest.mark.parametrize("weights", ["last", "constant", "increasing"])
def test_semi_amortized_unrolled_training_recovers_the_map(weights):
    prob = ParametricQuadratic()
    am = Amortizer(prob, linear_model(), refiner=GradientRefiner(0.3), train_refine_steps=3, weights=weights)
    fit(am, steps=300, lr=0.1)
    x = prob.sample(256, torch.Generator().manual_seed(9))
    # The refined prediction reaches y*; with weight on y_0 the raw prediction does too.
    assert (am.predict(x, refine_steps=3) - prob.solve(x)).abs().max() < 2e-2
    if weights != "last":
        assert (am.model.net.weight - prob.W).abs().max() < 2e-2


def test_solver_refiner_is_the_library_solver():
    # am.argmin's gradient descent is the same iteration as GradientRefiner, unrolled or not.
    prob = ParametricQuadratic()
    x = prob.sample(5, torch.Generator().manual_seed(4))
    y0 = torch.randn(5, N, dtype=torch.float64, requires_grad=True)
    ys = SolverRefiner("gd", lr=0.3, tol=0.0)(prob.objective, y0, x, 6)
    ref = GradientRefiner(0.3)(prob.objective, y0, x, 6)
    assert len(ys) == 2
    torch.testing.assert_close(ys[-1], ref[-1])
    g1, g2 = (torch.autograd.grad(y.sum(), y0)[0] for y in (ys[-1], ref[-1]))
    torch.testing.assert_close(g1, g2)
    am = Amortizer(
        prob, linear_model(), refiner=SolverRefiner("lbfgs"), train_refine_steps=3, weights="constant"
    )
    fit(am, steps=100, lr=0.1)
    assert (am.model.net.weight - prob.W).abs().max() < 5e-2


@pytest.mark.parametrize("refiner", [GradientRefiner(0.3), AdamRefiner(0.1), SolverRefiner("gd", lr=0.3)])
def test_semi_amortized_implicit_training_recovers_the_map(refiner):
    prob = ParametricQuadratic()
    am = Amortizer(
        prob,
        linear_model(),
        refiner=refiner,
        train_refine_steps=5,
        weights="constant",
        refine_grad="implicit",
    )
    fit(am, steps=150, lr=0.1)
    assert (am.model.net.weight - prob.W).abs().max() < 2e-2


class LearnedQuadratic(ParametricQuadratic):
    """y*(x) = W x with W the weight of `objective_module` (a parameter of f, as a decoder)."""

    def __init__(self):
        super().__init__()
        self.objective_module = nn.Linear(D, N, bias=False).double()
        with torch.no_grad():
            self.objective_module.weight.copy_(self.W)

    def objective(self, y, x):
        r = y - self.objective_module(x)
        return 0.5 * ((r @ self.H) * r).sum(-1)


@pytest.mark.parametrize(
    "refiner",
    [GradientRefiner(0.3), AdamRefiner(0.2), GradientRefiner(0.3, retract=lambda y: y, riemannian=False)],
)
def test_implicit_refinement_gradient_is_the_solution_map_derivative(refiner):
    # With L = Σ ‖y_K‖² and y* = W x: dL/dW = 2 y_Kᵀ x and dL/dx = 2 y_K W, whatever the
    # model predicted; the steps are not differentiated, only their fixed point.
    prob = LearnedQuadratic()
    K = 100
    am = Amortizer(
        prob,
        linear_model(),
        refiner=refiner,
        train_refine_steps=K,
        weights="constant",
        refine_grad="implicit",
    )
    x = prob.sample(6, torch.Generator().manual_seed(2)).requires_grad_()
    y_K = am.iterates(x, K, create_graph=True)[-1]
    W = prob.objective_module.weight
    g_W, g_x, g_theta = torch.autograd.grad(
        y_K.square().sum(), (W, x, am.model.net.weight), allow_unused=True
    )
    y = y_K.detach()
    torch.testing.assert_close(g_W, 2 * y.T @ x.detach(), atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(g_x, 2 * y @ prob.W, atol=1e-8, rtol=1e-8)
    assert (y - x.detach() @ prob.W.T).abs().max() < 5e-2  # y_K near y* (Adam hovers within ~lr)
    assert g_theta is None  # the fixed point does not depend on the model's prediction


def test_implicit_refinement_needs_weight_on_the_prediction():
    prob = ParametricQuadratic()
    with pytest.raises(ValueError, match="put weight on y_0"):
        Amortizer(
            prob, linear_model(), refiner=GradientRefiner(0.3), train_refine_steps=3, refine_grad="implicit"
        )
    with pytest.raises(ValueError, match="refine_grad must be"):
        Amortizer(prob, linear_model(), refine_grad="exact")


def test_unrolled_gradient_matches_finite_differences():
    prob = ParametricQuadratic()
    am = Amortizer(
        prob,
        linear_model(),
        refiner=GradientRefiner(0.2),
        train_refine_steps=4,
        weights="increasing",
    )
    x = prob.sample(8, torch.Generator().manual_seed(2))
    w = am.model.net.weight.detach().clone().requires_grad_()
    model = am.model
    am.model = lambda x_: torch.func.functional_call(model, {"net.weight": w_holder[0]}, (x_,))
    w_holder = [w]

    def loss_of(weight):
        w_holder[0] = weight
        return am.loss(x)

    assert torch.autograd.gradcheck(loss_of, (w,))
    assert loss_of(w).grad_fn is not None


def test_gradient_refiner_matches_closed_form_contraction():
    # On a quadratic, y_K − y* = (I − lr H)^K (y_0 − y*) exactly.
    prob = ParametricQuadratic()
    x = prob.sample(5, torch.Generator().manual_seed(4))
    y0 = torch.randn(5, N, dtype=torch.float64)
    lr, K = 0.3, 6
    ys = GradientRefiner(lr)(prob.objective, y0, x, K, create_graph=False)
    T = torch.linalg.matrix_power(torch.eye(N, dtype=torch.float64) - lr * prob.H, K)
    expected = prob.solve(x) + (y0 - prob.solve(x)) @ T.T
    assert len(ys) == K + 1
    torch.testing.assert_close(ys[-1], expected)


def test_adam_refiner_matches_torch_adam():
    prob = ParametricQuadratic()
    x = prob.sample(5, torch.Generator().manual_seed(4))
    y0 = torch.randn(5, N, dtype=torch.float64)
    ys = AdamRefiner(0.05)(prob.objective, y0, x, 10, create_graph=False)
    y = y0.clone().requires_grad_()
    opt = torch.optim.Adam([y], lr=0.05)
    for _ in range(10):
        opt.zero_grad()
        prob.objective(y, x).sum().backward()
        opt.step()
    torch.testing.assert_close(ys[-1], y.detach())


def test_test_time_fine_tuning_is_separate_from_training():
    prob = ParametricQuadratic()
    am = Amortizer(prob, linear_model(), refiner=GradientRefiner(0.3), test_refine_steps=5)
    x = prob.sample(32, torch.Generator().manual_seed(8))
    y_star = prob.solve(x)
    raw = (am.predict(x, refine_steps=0) - y_star).norm()
    tuned = (am.predict(x) - y_star).norm()
    assert tuned < 0.5 * raw
    assert am.loss(x).requires_grad  # training ignores the test-time steps
    assert torch.equal(am.iterates(x, 0, create_graph=False)[0], am.model(x))


def test_iterate_weights():
    z = torch.zeros((), dtype=torch.float64)
    torch.testing.assert_close(iterate_weights("constant", 3, z), torch.full((4,), 0.25, dtype=torch.float64))
    torch.testing.assert_close(
        iterate_weights("increasing", 2, z), torch.tensor([1, 2, 3], dtype=torch.float64) / 6
    )
    torch.testing.assert_close(
        iterate_weights("last", 2, z), torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    )
    with pytest.raises(ValueError, match="3 non-negative"):
        iterate_weights([1.0, 2.0], 2, z)
    with pytest.raises(ValueError, match="iterate weights"):
        iterate_weights("bogus", 2, z)


def test_projections():
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(7, 5, generator=g, dtype=torch.float64) * 3
    torch.testing.assert_close(SphereProjection()(raw).norm(dim=-1), torch.ones(7, dtype=torch.float64))
    s = SimplexProjection()(raw)
    assert bool((s > 0).all())
    torch.testing.assert_close(s.sum(-1), torch.ones(7, dtype=torch.float64))
    for kind in ("sigmoid", "tanh"):
        b = BoxProjection(-2.0, torch.tensor([1.0, 2, 3, 4, 5]), kind)(raw * 10)
        assert bool((b >= -2).all()) and bool(
            (b <= torch.tensor([1.0, 2, 3, 4, 5], dtype=torch.float64)).all()
        )
    with pytest.raises(ValueError, match="hi > lo"):
        BoxProjection(1.0, 0.0)
    A = torch.randn(3, 8, generator=g, dtype=torch.float64)
    comp = EqualityCompletion(A)
    x = torch.randn(7, 3, generator=g, dtype=torch.float64)
    y = comp(torch.randn(7, 5, generator=g, dtype=torch.float64), x)
    assert (y @ A.T - x).abs().max() < 1e-12
    with pytest.raises(ValueError, match="singular"):
        EqualityCompletion(torch.cat([A[:, :5], torch.zeros(3, 3, dtype=torch.float64)], 1))


class BoxProblem:
    """f(y; x) = ‖y − x‖² subject to y ≤ 0 and y_1 + y_2 = 0 (for hand-computed reports)."""

    context_dim = solution_dim = 2

    def objective(self, y, x):
        return (y - x).square().sum(-1)

    def sample(self, n, generator=None):
        return torch.rand(n, 2, generator=generator, dtype=torch.float64)

    def constraint_violation(self, y, x):
        return {"eq": (y[:, :1] + y[:, 1:]).abs(), "ineq": y.clamp_min(0)}


class Const(nn.Module):
    def __init__(self, y):
        super().__init__()
        self.y = nn.Parameter(y)

    def forward(self, x):
        return self.y.expand(x.shape[0], -1)


def test_report_fields_computed_by_hand():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    y_ref = torch.zeros(2, 2, dtype=torch.float64)
    am = Amortizer(BoxProblem(), Const(torch.tensor([0.5, -0.1], dtype=torch.float64)))
    r = am.evaluate(x, y_ref=y_ref, solver_trace=([0.1, 0.2, 0.4], [9.0, 3.0, 1.0]), repeats=3)
    # f(ŷ) = (0.25 + 0.01, 0.25 + 4.41) → mean 2.46; f(y*) = (1, 4) → mean 2.5.
    assert r.model_objective == pytest.approx(2.46)
    assert r.solver_objective == pytest.approx(2.5)
    assert r.objective_gap == pytest.approx(-0.04)
    assert r.objective_gap_rel == pytest.approx(-0.016)
    assert r.median_distance == pytest.approx(math.hypot(0.5, 0.1))
    assert r.max_eq_violation == pytest.approx(0.4) and r.mean_eq_violation == pytest.approx(0.4)
    assert r.max_ineq_violation == pytest.approx(0.5) and r.mean_ineq_violation == pytest.approx(0.25)
    assert r.time_to_match_s == pytest.approx(0.4)  # the trace first reaches 2.46 at 0.4 s (value 1.0)
    assert r.speedup_time_to_match == pytest.approx(0.4 / r.model_time_per_batch_s)
    assert r.model_time_per_instance_s == pytest.approx(r.model_time_per_batch_s / 2)
    d = r.to_dict()
    assert json.loads(json.dumps(d)) == d


def test_time_to_match():
    assert time_to_match([1.0, 2.0, 3.0], [5.0, 2.0, 1.0], 2.0) == 2.0
    assert time_to_match([1.0, 2.0], [5.0, 4.0], 1.0) is None
    with pytest.raises(ValueError, match="length"):
        time_to_match([1.0], [1.0, 2.0], 0.0)


def test_evaluate_times_the_problem_solver():
    prob = ParametricQuadratic()
    am = Amortizer(prob, linear_model())
    x = prob.sample(64, torch.Generator().manual_seed(1))
    r = am.evaluate(x, repeats=2)
    assert r.solver_objective == pytest.approx(0.0, abs=1e-12)
    assert r.solver_time_per_batch_s > 0 and r.speedup_full_run == pytest.approx(
        r.solver_time_per_batch_s / r.model_time_per_batch_s
    )
    with torch.no_grad():
        expected = prob.objective(am.model(x), x).mean().item()
    assert r.objective_gap == pytest.approx(expected)


def test_save_load_round_trip(tmp_path):
    prob = ParametricQuadratic()
    model = AmortizedModel(MLP([D, 16, N], nn.Tanh).double(), SphereProjection())
    am = Amortizer(prob, model)
    fit(am, steps=5)
    path = tmp_path / "model.safetensors"
    am.save(path, meta={"sizes": [D, 16, N]})
    other = AmortizedModel(MLP([D, 16, N], nn.Tanh).double(), SphereProjection())
    side = Amortizer(prob, other).load(path)
    x = prob.sample(10)
    assert torch.equal(other(x), model(x))
    assert side["meta"] == {"sizes": [D, 16, N]} and side["dtype"] == "torch.float64"
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError, match="does not match"):
        Amortizer(prob, linear_model()).load(path)
    with pytest.raises(ValueError, match="checkpoint holds"):
        Amortizer(prob, MLP([D, N]).double()).load(path)


def test_bad_input_errors():
    prob = ParametricQuadratic()
    with pytest.raises(TypeError, match="not a Problem"):
        Amortizer(object(), linear_model())
    with pytest.raises(ValueError, match="loss must be"):
        Amortizer(prob, linear_model(), loss="l2")
    with pytest.raises(ValueError, match="refiner"):
        Amortizer(prob, linear_model(), train_refine_steps=2)
    am = Amortizer(prob, linear_model(), loss="regression")
    with pytest.raises(ValueError, match="labelled"):
        am.fit(torch.optim.SGD(am.model.parameters(), lr=0.1), steps=1, batch_size=4)


def test_problem_projection_is_applied():
    class OnSphere(ParametricQuadratic):
        def project(self, y, x):
            return SphereProjection()(y)

    prob = OnSphere()
    am = Amortizer(prob, linear_model())
    x = prob.sample(6)
    torch.testing.assert_close(am.predict(x).norm(dim=-1), torch.ones(6, dtype=torch.float64))
    assert am.loss(x).requires_grad
