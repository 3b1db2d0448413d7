"""Bad input, QPLayer and the qpth-compatible QPFunction."""

import pytest
import torch

import amortized as am
from amortized.problems.random_qp import FAMILIES
from amortized.qp import QPFunction


@pytest.fixture
def qp():
    return FAMILIES["optnet"](3, torch.float64, torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda a: a.__setitem__(0, a[0][:, :-1]), ValueError, r"Q has shape \(3, 29, 30\)"),
        (lambda a: a.__setitem__(1, a[1][None]), ValueError, r"p has shape"),
        (lambda a: a.__setitem__(2, a[2][:, :, :-1]), ValueError, r"G has shape"),
        (lambda a: a.__setitem__(3, a[3][:, :-1]), ValueError, r"G has shape .* m = 29"),
        (lambda a: a.__setitem__(5, a[5][:2]), ValueError, r"inconsistent batch sizes"),
        (lambda a: a.__setitem__(3, None), ValueError, r"G/h: give both or neither"),
        (
            lambda a: a.__setitem__(0, a[0].float()),
            TypeError,
            r"Q has dtype torch.float32 but p has torch.float64",
        ),
        (lambda a: a.__setitem__(1, a[1].long()), TypeError, r"p has dtype torch.int64"),
        (lambda a: a.__setitem__(2, a[2].to("meta")), ValueError, r"G is on meta but p is on cpu"),
        (lambda a: a.__setitem__(1, a[1].numpy()), TypeError, r"must be torch tensors"),
    ],
)
def test_bad_shapes_dtypes_devices(qp, change, error, match):
    args = list(qp)
    change(args)
    with pytest.raises(error, match=match):
        am.solve_qp(*args)


def test_non_convex_Q_is_rejected(qp):
    Q = qp[0].clone()
    Q[1] = -torch.eye(Q.shape[-1], dtype=Q.dtype)
    with pytest.raises(ValueError, match=r"not positive semidefinite for problem\(s\) \[1\]"):
        am.solve_qp(Q, *qp[1:])


def test_psd_singular_Q_is_accepted():
    Q = torch.zeros(2, 2, dtype=torch.float64)
    Q[0, 0] = 1.0  # PSD, singular
    p = torch.tensor([0.0, 1.0], dtype=torch.float64)
    G = torch.tensor([[0.0, -1.0]], dtype=torch.float64)
    sol = am.solve_qp(Q, p, G, torch.tensor([2.0], dtype=torch.float64))
    assert sol.solved.all()
    torch.testing.assert_close(sol.z[0], torch.tensor([0.0, -2.0], dtype=torch.float64), atol=1e-8, rtol=0)


def test_non_symmetric_Q_is_symmetrized(qp):
    Q, *rest = qp
    skew = torch.randn(Q.shape, generator=torch.Generator().manual_seed(1), dtype=Q.dtype)
    skew = skew - skew.mT
    torch.testing.assert_close(am.solve_qp(Q + skew, *rest).z, am.solve_qp(Q, *rest).z, atol=1e-9, rtol=0)


@pytest.mark.parametrize("where", [0, 1, 2, 3, 4, 5])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_input_marks_only_that_problem(qp, where, bad):
    args = [x.clone() for x in qp]
    args[where][1].view(-1)[0] = bad
    sol = am.solve_qp(*args)
    assert sol.status.tolist() == [0, int(am.QPStatus.NUMERICAL), 0]
    assert torch.isfinite(sol.z).all() and torch.isfinite(sol.lam).all()
    torch.testing.assert_close(sol.z[0], am.solve_qp(*(x[0] for x in qp)).z[0], atol=1e-9, rtol=0)


def test_max_iter_is_reported_not_solved(qp):
    sol = am.solve_qp(*qp, max_iter=2)
    assert (sol.status == am.QPStatus.MAX_ITER).all() and (sol.iters == 2).all()
    assert am.QPStatus.MAX_ITER.message.startswith("not converged")


def test_solution_fields_are_ordinary_tensors(qp):
    """The solver runs in inference mode; what it returns must still work in autograd and
    take in-place edits: a loss weighted by the residuals, a status overwritten."""
    Q, p, G, h, A, b = qp
    p = p.clone().requires_grad_()
    sol = am.solve_qp(Q, p, G, h, A, b)
    fields = [getattr(sol, f) for f in ("z", "lam", "nu", "s", "status", "iters")]
    fields += [sol.primal_residual, sol.dual_residual, sol.gap]
    assert not any(x.is_inference() for x in fields)
    (sol.z * (1 + sol.gap + sol.primal_residual).unsqueeze(-1)).sum().backward()
    assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    sol.status[0] = am.QPStatus.NUMERICAL
    sol.gap.zero_()


def test_empty_batch_returns_empty_outputs_with_a_graph():
    """B = 0 (a data loader's empty last batch): outputs shaped (0, ·), constraints kept
    (a (0, m, n) G is m rows for no problems, not "no constraints"), zero gradients."""
    shapes = [(3, 3), (0, 3), (0, 2, 3), (0, 2)]  # Q shared, p, G, h batched
    args = [torch.eye(3, dtype=torch.float64).requires_grad_()]
    args += [torch.ones(s, dtype=torch.float64, requires_grad=True) for s in shapes[1:]]
    sol = am.solve_qp(*args)
    assert sol.z.shape == (0, 3) and sol.lam.shape == (0, 2) and sol.status.shape == (0,)
    sol.z.sum().backward()
    assert args[0].grad.shape == (3, 3) and not args[0].grad.any()


def test_unknown_solver(qp):
    with pytest.raises(ValueError, match="unknown solver"):
        am.solve_qp(*qp, solver="simplex")


def test_qplayer_learns_and_stays_feasible():
    torch.manual_seed(0)
    layer = am.QPLayer(8, n_ineq=6, n_eq=2, dtype=torch.float64)
    assert {n for n, _ in layer.named_parameters()} == {"L", "G", "A", "z0", "s0"}
    target = torch.rand(16, 8, dtype=torch.float64)
    x = torch.randn(16, 8, dtype=torch.float64)
    opt = torch.optim.Adam(layer.parameters(), lr=0.05)
    losses = []
    for _ in range(30):
        sol = layer.solve(-x)
        assert sol.solved.all()  # feasible by construction, so never INFEASIBLE
        loss = (sol.z - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_qplayer_constants_are_buffers():
    n = 4
    G = -torch.eye(n)
    layer = am.QPLayer(n, n_ineq=n, n_eq=1, Q=0.5 * torch.eye(n), G=G, h=torch.zeros(n))
    names = {n for n, _ in layer.named_parameters()}
    assert names == {"A", "log_s0"}
    assert {"Q", "G", "h"} <= {n for n, _ in layer.named_buffers()}
    z = layer(torch.randn(5, n))
    assert z.shape == (5, n) and z.dtype == torch.float32
    assert (z >= -1e-5).all()


def _boxes(n):
    """Constant inequalities G (m, n), h (m,) of several shapes, none strictly satisfied by
    z = 0 (the old z0 = 0 start), named by the parametrization they get."""
    eye, one = torch.eye(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64)
    return {
        "z >= 0 (slack)": (-eye, 0 * one),
        "z <= -1 (slack)": (eye, -one),
        "2 <= z <= 3 (gauge)": (torch.cat([eye, -eye]), torch.cat([3 * one, -2 * one])),
        "simplex-like (gauge)": (
            torch.cat([-eye, one[None]]),
            torch.cat([-0.1 * one, one[:1]]),
        ),
    }


@pytest.mark.parametrize("case", list(_boxes(5)))
def test_qplayer_feasible_with_constant_inequalities(case):
    """Constant G, h with learned A, b: z0 stays strictly inside Gz < h (so b = A z0 is
    never the degenerate b = A·0 = 0) at the start and after arbitrary parameter moves, and
    every QP of the batch is SOLVED."""
    n, q = 5, 2
    G, h = _boxes(n)[case]
    gen = torch.Generator().manual_seed(0)
    layer = am.QPLayer(n, len(h), q, G=G, h=h, dtype=torch.float64)
    assert layer.z0_mode == case.split("(")[1][:-1]
    p = torch.randn(8, n, generator=gen, dtype=torch.float64)
    for step in range(4):
        z0 = layer.interior_point()
        assert (G @ z0 < h).all(), (step, G @ z0 - h)  # z = 0 fails this in every case
        Q, _, _, A, b = layer.data()
        torch.testing.assert_close(b, A @ z0)
        sol = layer.solve(p)
        assert sol.solved.all() and (G @ sol.z.T <= h[:, None] + 1e-8).all()
        (sol.z.sum() + sol.nu.square().sum()).backward()
        assert all(x.grad is not None and x.grad.abs().amax() > 0 for x in layer.parameters())
        with torch.no_grad():  # large random moves: the parametrization must keep z0 inside
            for x in layer.parameters():
                x.add_(torch.randn(x.shape, generator=gen, dtype=x.dtype))
            layer.zero_grad()


def test_qplayer_slack_parametrization_is_optnet_sudoku():
    """G = −I, h = 0: b = A exp(log_s0), the OptNet Sudoku model's b = A exp(log z0)."""
    layer = am.QPLayer(6, 6, 3, G=-torch.eye(6), h=torch.zeros(6), dtype=torch.float64)
    with torch.no_grad():
        layer.log_s0.copy_(torch.linspace(-3, 2, 6, dtype=torch.float64))
    torch.testing.assert_close(layer.data()[4], layer.A @ layer.log_s0.exp(), rtol=1e-14, atol=0)


def test_qplayer_feasible_rejects_what_it_cannot_keep_feasible():
    eye = torch.eye(3)
    with pytest.raises(ValueError, match="no strictly feasible point"):  # z = 0 is the only point
        am.QPLayer(3, 6, 1, G=torch.cat([eye, -eye]), h=torch.zeros(6))
    with pytest.raises(ValueError, match="learned G, a constant h"):
        am.QPLayer(3, 3, 1, h=torch.ones(3))
    am.QPLayer(3, 3, 1, h=torch.ones(3), feasible=False)  # allowed: the user's responsibility


def test_qpfunction_matches_solve_qp_and_takes_empty_tensors():
    Q, p, G, h, _, _ = FAMILIES["optnet"](3, torch.float64, torch.Generator().manual_seed(2))
    e = torch.empty(0, dtype=torch.float64)
    z = QPFunction(verbose=-1)(Q, p, G, h, e, e)
    torch.testing.assert_close(z, am.solve_qp(Q, p, G, h).z)


def test_qpfunction_matches_qpth():
    qpth = pytest.importorskip("qpth.qp")
    data = FAMILIES["optnet"](3, torch.float64, torch.Generator().manual_seed(3))
    ours = QPFunction()(*data)
    theirs = qpth.QPFunction(verbose=-1)(*data)
    assert (ours - theirs).abs().max() <= 1e-6
