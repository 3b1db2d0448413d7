"""The reproductions' problems checked against independent references."""

import math

import pytest
import torch

import amortized as am
from amortized.amortize import MLP, EqualityCompletion
from amortized.problems.qp_proxy import (
    ActiveSetRefiner,
    DC3Correction,
    dc3_simple,
    solve_with_fallback,
)
from amortized.problems.sphere import (
    ContextFrame,
    SphereProblem,
    canonical_frame,
    fibonacci_sphere,
    geodesic,
)
from amortized.problems.vae import VAEInference, gaussian_kl, load_digits_split, make_vae


@pytest.fixture(scope="module")
def small_qp():
    P = dc3_simple(n=20, n_eq=6, n_ineq=12, n_examples=8)
    return P, P.X, P.clarabel(P.X)


def test_dc3_family_matches_its_definition():
    P = dc3_simple(n=10, n_eq=4, n_ineq=5, n_examples=3)
    assert P.Q.shape == (10, 10) and bool((P.Q == torch.diag(P.Q.diagonal())).all())
    assert bool((P.X.abs() <= 1).all()) and P.X.shape == (3, 4)
    h = (P.G @ torch.linalg.pinv(P.A)).abs().sum(1)
    torch.testing.assert_close(P.h, h)
    tr, va, te = dc3_simple(n=10, n_eq=4, n_ineq=5, n_examples=1000).split()
    assert (tr.shape[0], va.shape[0], te.shape[0]) == (834, 83, 83)


def test_active_set_matches_clarabel(small_qp):
    P, x, ref = small_qp
    R = ActiveSetRefiner(P)
    y = R(P.objective, torch.zeros_like(ref), x, 30, create_graph=False)[-1]
    assert bool(R.last_status.all())
    assert (y - ref).abs().max() < 1e-6
    v = P.constraint_violation(y, x)
    assert v["eq"].max() < 1e-10 and v["ineq"].max() < 1e-10


def test_active_set_gradient_matches_solve_qp_implicit(small_qp):
    P, x, ref = small_qp
    R = ActiveSetRefiner(P)
    y = R(P.objective, ref, x, 30, create_graph=False)[-1]
    S = (y @ P.G.T - P.h) > -1e-9
    xg = x.clone().requires_grad_()
    w = torch.randn_like(y)
    (g_as,) = torch.autograd.grad((R.qp.solve_active(S, xg).y * w).sum(), xg)
    xg2 = x.clone().requires_grad_()
    (g_qp,) = torch.autograd.grad((am.solve_qp(P.Q, P.p, P.G, P.h, P.A, xg2).z * w).sum(), xg2)
    torch.testing.assert_close(g_as, g_qp, atol=1e-5, rtol=1e-5)
    x1 = x[:2].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda b: R.qp.solve_active(S[:2], b).y, (x1,))


def test_fallback_and_dc3_correction(small_qp):
    P, x, ref = small_qp
    R = ActiveSetRefiner(P)
    y, fb = solve_with_fallback(P, R, torch.zeros_like(ref), x, steps=0)  # no step: all fall back
    assert bool(fb.all()) and (y - ref).abs().max() < 1e-6
    comp = EqualityCompletion(P.A)
    y0 = comp(torch.randn(x.shape[0], 14, dtype=x.dtype) * 3, x)
    v0 = P.constraint_violation(y0, x)["ineq"].square().sum()
    ys = DC3Correction(P, comp, lr=1e-3)(P.objective, y0, x, 20, create_graph=False)
    v = P.constraint_violation(ys[-1], x)
    assert v["ineq"].square().sum() < 0.5 * v0 and v["eq"].max() < 1e-9


def test_sphere_geometry_and_reference():
    g = torch.Generator().manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(50, 3, generator=g, dtype=torch.float64), dim=-1)
    v = torch.nn.functional.normalize(torch.randn(50, 3, generator=g, dtype=torch.float64), dim=-1)
    torch.testing.assert_close(geodesic(u, v), torch.arccos((u * v).sum(-1)))
    torch.testing.assert_close(geodesic(u, -u), torch.full((50,), math.pi, dtype=torch.float64))
    P = SphereProblem(grid=2000)
    x = P.sample(8, g)
    z, alpha = P.unpack(x)
    y = u[:8]
    c = 0.5 * torch.arccos((y.unsqueeze(1) * z).sum(-1)).square() + alpha
    torch.testing.assert_close(P.objective(y, x), -0.5 * torch.log(torch.exp(-c / 0.5).sum(-1)))
    y_ref = P.solve(x)
    torch.testing.assert_close(y_ref.norm(dim=-1), torch.ones(8, dtype=torch.float64))
    grid = fibonacci_sphere(20_000, dtype=torch.float64)
    assert bool((P.objective(y_ref, x) <= P.objective(grid.expand(8, -1, -1), x).min(1).values + 1e-9).all())
    yr = y_ref.clone().requires_grad_()
    (gr,) = torch.autograd.grad(P.objective(yr, x).sum(), yr)
    riem = gr - (gr * y_ref).sum(-1, keepdim=True) * y_ref
    assert riem.norm(dim=-1).max() < 1e-4
    y_tr, (times, values) = P.solve_trace(x)  # the same solve, with its progress
    torch.testing.assert_close(y_tr, y_ref)
    assert len(times) == len(values) == P.refine_steps + 1 and values[-1] <= values[0] + 1e-12
    assert all(b >= a for a, b in zip(times, times[1:], strict=False))


def _random_rotation(g: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    return q if torch.det(q) > 0 else -q


def _act(Q: torch.Tensor, perm: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The context x (B, 16) with its points rotated by Q and its 4 components permuted."""
    z, alpha = x[:, :12].unflatten(-1, (4, 3)), x[:, 12:]
    return torch.cat([(z @ Q.T)[:, perm].flatten(1), alpha[:, perm]], -1)


def test_sphere_symmetries_and_context_frame():
    g = torch.Generator().manual_seed(3)
    P = SphereProblem()
    x = P.sample(64, g)
    y = torch.nn.functional.normalize(torch.randn(64, 3, generator=g, dtype=torch.float64), dim=-1)
    Q, perm = _random_rotation(g), torch.randperm(4, generator=g)
    # The symmetries ContextFrame relies on: f(Qy; Q·x, permuted) = f(y; x).
    torch.testing.assert_close(P.objective(y @ Q.T, _act(Q, perm, x)), P.objective(y, x))
    # The canonical pose: R a rotation, R z_(1) = e3, R z_(2) in the half-plane y = 0, x > 0.
    R, z, alpha = canonical_frame(*P.unpack(x))
    eye = torch.eye(3, dtype=torch.float64).expand(64, 3, 3)
    torch.testing.assert_close(R @ R.transpose(1, 2), eye)
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(64, dtype=torch.float64))
    assert bool((alpha[:, 1:] >= alpha[:, :-1]).all())
    zc = z @ R.transpose(1, 2)
    torch.testing.assert_close(zc[:, 0], eye[:, 2])
    assert zc[:, 1, 1].abs().max() < 1e-12 and bool((zc[:, 1, 0] > 0).all())
    # A model behind the frame is exactly equivariant (rotated) or invariant (sorted only).
    torch.manual_seed(0)
    net = MLP([16, 32, 3], torch.nn.SiLU).double()
    rotated, sorted_only = ContextFrame(net), ContextFrame(net, rotate=False)
    with torch.no_grad():
        torch.testing.assert_close(rotated(_act(Q, perm, x)), rotated(x) @ Q.T)
        permuted = _act(torch.eye(3, dtype=torch.float64), perm, x)
        torch.testing.assert_close(sorted_only(permuted), sorted_only(x))
        assert (sorted_only(_act(Q, perm, x)) - sorted_only(x)).abs().max() > 1e-3  # not equivariant


def test_vae_elbo_against_torch_distributions():
    torch.manual_seed(0)
    x_train, x_test = load_digits_split(n_test=100)
    assert x_train.shape == (1697, 64) and float(x_test.max()) <= 1.0
    enc, dec = make_vae()
    P = VAEInference(dec)
    y = enc(x_test[:5]).detach()
    mu, logvar = y.chunk(2, -1)
    D = torch.distributions
    q = D.Independent(D.Normal(mu, (0.5 * logvar).exp()), 1)
    prior = D.Independent(D.Normal(torch.zeros_like(mu), torch.ones_like(mu)), 1)
    torch.testing.assert_close(gaussian_kl(y), D.kl_divergence(q, prior))
    eps = torch.randn(3, 5, 10)
    z = mu + (0.5 * logvar).exp() * eps
    logits = dec(z)
    xt = x_test[:5]
    loglik = (
        xt * torch.nn.functional.logsigmoid(logits) + (1 - xt) * torch.nn.functional.logsigmoid(-logits)
    ).sum(-1)
    with torch.no_grad():
        torch.testing.assert_close(P.elbo(y, xt, eps), loglik.mean(0) - D.kl_divergence(q, prior))
        e1 = P.elbo_estimate(y, xt, n_samples=50, seed=3)
        assert torch.equal(e1, P.elbo_estimate(y, xt, n_samples=50, seed=3))  # paired noise
