"""DEQ layer: gradients three ways, modes, and the digits command end to end at toy size."""

import json

import pytest
import torch
from torch import nn

import amortized as am
from amortized.cli.deq import DigitsDEQ, load_digits_split, save_outputs, train_deq

F64 = torch.float64


class Cell(nn.Module):
    def __init__(self, d, d_in):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        W = torch.randn(d, d, generator=g, dtype=F64)
        self.W = nn.Parameter(0.6 * W / torch.linalg.matrix_norm(W, ord=2))
        self.U = nn.Parameter(torch.randn(d, d_in, generator=g, dtype=F64) / d_in**0.5)

    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + x @ self.U.T)


def test_deq_gradients_three_ways():
    torch.manual_seed(0)
    x = torch.randn(5, 4, dtype=F64)
    c = torch.randn(5, 6, dtype=F64)
    cell = Cell(6, 4)
    deq = am.DEQ(cell, 6, tol=1e-14, max_iter=200)
    z = deq(x)
    assert deq.last_solution.solved.all()
    torch.testing.assert_close(z, cell(z, x))  # it is a fixed point
    gW, gU = torch.autograd.grad((z * c).sum(), (cell.W, cell.U))

    unrolled = am.DEQ(cell, 6, solver="iteration", grad="unroll", tol=1e-15, max_iter=300)
    gWu, gUu = torch.autograd.grad((unrolled(x) * c).sum(), (cell.W, cell.U))
    torch.testing.assert_close(gW, gWu, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(gU, gUu, rtol=1e-8, atol=1e-10)

    dW = torch.randn(6, 6, dtype=F64)
    h = 1e-5

    def value(W):
        with torch.no_grad():
            old = cell.W.data.clone()
            cell.W.data.copy_(W)
            out = (deq(x) * c).sum()
            cell.W.data.copy_(old)
        return out

    fd = (value(cell.W + h * dW) - value(cell.W - h * dW)) / (2 * h)
    torch.testing.assert_close((gW * dW).sum(), fd, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("backward_solve", ["gmres", "neumann", "direct"])
def test_deq_input_gradient_with_each_backward_solve(backward_solve):
    x = torch.randn(3, 4, dtype=F64, requires_grad=True)
    cell = Cell(6, 4)
    z = am.DEQ(cell, 6, backward_solve=backward_solve, tol=1e-13, max_iter=200)(x)
    (gx,) = torch.autograd.grad(z.sum(), x)
    # Reference: dz/dx = (I − ∂f/∂z)⁻¹ ∂f/∂x per sample, dense.
    with torch.no_grad():
        pre = z @ cell.W.T + x @ cell.U.T
        s = 1 - torch.tanh(pre) ** 2  # (B, d)
        Jz = s.unsqueeze(-1) * cell.W
        Jx = s.unsqueeze(-1) * cell.U
        dzdx = torch.linalg.solve(torch.eye(6, dtype=F64) - Jz, Jx)
    torch.testing.assert_close(gx, dzdx.sum(1), rtol=1e-9, atol=1e-10)


def test_deq_rejects_bad_state_size():
    with pytest.raises(ValueError, match="state size"):
        am.DEQ(Cell(6, 4), 0)


def test_digits_training_and_outputs(tmp_path):
    """Two epochs at toy size learn something and write every artefact."""
    model, results = train_deq(epochs=2, hidden=24, seed=0)
    assert results["test_accuracy"] > 0.6  # chance is 0.1
    assert results["epochs"][-1]["test_solved_fraction"] > 0.9
    save_outputs(model, results, tmp_path)
    for name in ("results.json", "deq_residual.png", "deq_digits.safetensors", "deq_digits.json"):
        assert (tmp_path / name).stat().st_size > 0
    saved = json.loads((tmp_path / "results.json").read_text())
    hist = saved["residual_history_median"]["epoch 1"]
    assert hist[-1] < hist[0]  # the fixed-point residual goes down with the iterations
    from safetensors.torch import load_file

    fresh = DigitsDEQ(64, 24)
    fresh.load_state_dict(load_file(str(tmp_path / "deq_digits.safetensors")))
    _, _, Xte, yte = load_digits_split(0)
    with torch.no_grad():
        acc = float((fresh(Xte).argmax(-1) == yte).float().mean())
    assert abs(acc - results["test_accuracy"]) < 1e-6
