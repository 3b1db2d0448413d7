"""Differentiate y*(θ) defined by F(y*, θ) = 0 without differentiating the solver.

By the implicit function theorem ∂y*/∂θ = −(∂F/∂y)⁻¹ ∂F/∂θ, so a vector-Jacobian product
is one linear solve and one vjp:

    (∂F/∂y)ᵀ u = v,     v̄_θ = −uᵀ ∂F/∂θ.

The linear solve is supplied by the caller (a structured factorization such as the QP's
KKT Cholesky, reused from the forward pass, as in OptNet) and polished by iterative
refinement against the exact Jacobian, whose transpose products come from torch.func.vjp.
This follows jaxopt's `custom_root`/`root_vjp` (Blondel et al., 2022).
"""

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

Tensors = tuple[Tensor, ...]


def implicit_root(
    F: Callable[..., Tensors],
    solve_transpose: Callable[[Tensors], Tensors],
    ys: Sequence[Tensor],
    params: Sequence[Tensor | None],
    *,
    refine: int = 1,
) -> Tensors:
    """Attach implicit gradients to a solution computed elsewhere.

    F(*ys, *params) -> residuals shaped like ys, zero at the solution; row b of each
    residual must depend only on problem b (params may broadcast over the batch, and then
    their gradients are summed over it). solve_transpose(v) returns u with
    (∂F/∂y)ᵀ u ≈ v for a tuple v shaped like ys. `refine` iterative-refinement steps
    correct u against the exact Jacobian. Returns ys, now differentiable w.r.t. params.
    """
    return _ImplicitRoot.apply(F, solve_transpose, refine, len(ys), *ys, *params)


class _ImplicitRoot(torch.autograd.Function):
    @staticmethod
    def forward(F, solve_transpose, refine, n_y, *args):
        return tuple(y.detach().clone() for y in args[:n_y])

    @staticmethod
    def setup_context(ctx, inputs, output):
        F, solve_transpose, refine, n_y, *args = inputs
        ctx.F, ctx.solve_transpose, ctx.refine, ctx.n_y = F, solve_transpose, refine, n_y
        ctx.save_for_backward(*args)

    @staticmethod
    def backward(ctx, *v):
        args = ctx.saved_tensors
        n_y = ctx.n_y
        ys, params = args[:n_y], args[n_y:]
        wanted = [i for i, p in enumerate(params) if p is not None and ctx.needs_input_grad[4 + n_y + i]]
        v = tuple(torch.zeros_like(y) if g is None else g for y, g in zip(ys, v))

        def F_of(ys_, ps_):
            full = list(params)
            for i, p in zip(wanted, ps_):
                full[i] = p
            return ctx.F(*ys_, *full)

        ys_d = tuple(y.detach() for y in ys)
        ps_d = tuple(params[i].detach() for i in wanted)
        with torch.enable_grad():
            _, vjp_fn = torch.func.vjp(F_of, ys_d, ps_d)
        u = ctx.solve_transpose(v)
        for _ in range(ctx.refine):
            JTu, _ = vjp_fn(u)
            du = ctx.solve_transpose(tuple(vi - ji for vi, ji in zip(v, JTu)))
            u = tuple(ui + di for ui, di in zip(u, du))
        _, grads = vjp_fn(tuple(-ui for ui in u))
        out = [None] * len(params)
        for i, g in zip(wanted, grads):
            out[i] = g
        return (None, None, None, None, *([None] * n_y), *out)
