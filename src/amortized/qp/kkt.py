"""The KKT conditions of the QP as an optimality function, and their transposed Jacobian
solve at a solution, for implicit differentiation (OptNet, Amos & Kolter 2017, eq. 6-8).

    F(z, λ, ν) = [ Qz + p + Gᵀλ + Aᵀν ;  λ ∘ (Gz − h) ;  Az − b ] = 0
"""

import torch
from torch import Tensor

from amortized.linalg import bmv, brmv
from amortized.qp.pdipm import PDIPMResult


def kkt_conditions(z, lam, nu, Q, p, G, h, A, b) -> tuple[Tensor, Tensor, Tensor]:
    """F above for z (B,n), λ (B,m), ν (B,q); every parameter batched or shared.
    Q enters through its symmetric part, so dF/dQ is (exactly) symmetric. Each matrix
    enters through one custom product, so that no symmetrized Q is formed or kept by the
    linearization and each gradient is formed once (`_SymProduct`, `_Products`)."""
    Gz, Gt_lam = _Products.apply(G, z, lam)
    Az, At_nu = _Products.apply(A, z, nu)
    r_d = _SymProduct.apply(Q, z) + p + Gt_lam + At_nu
    r_c = lam * (Gz - h)
    r_e = Az - b
    return r_d, r_c, r_e


def kkt_transpose_product(z, lam, nu, Q, p, G, h, A, b, u) -> tuple[Tensor, Tensor, Tensor]:
    """(∂F/∂(z, λ, ν))ᵀ u for F = `kkt_conditions` and u = (u_z, u_λ, u_ν), in closed form:

    ½(Q + Qᵀ) u_z + Gᵀ(λ∘u_λ) + Aᵀu_ν,    G u_z + (Gz − h)∘u_λ,    A u_z.
    """
    u_z, u_lam, u_nu = u
    Q_u = 0.5 * (bmv(Q, u_z) + brmv(Q, u_z))
    return Q_u + brmv(G, lam * u_lam) + brmv(A, u_nu), bmv(G, u_z) + (bmv(G, z) - h) * u_lam, bmv(A, u_z)


class _SymProduct(torch.autograd.Function):
    """½(Q + Qᵀ)x for Q (B, n, n), (1, n, n) or (n, n) and x (B, n), without ½(Q + Qᵀ).
    The gradient of Q, ½(u xᵀ + x uᵀ), is the outer product P = u xᵀ (summed over the
    batch for a shared Q) and its transpose added, exactly symmetric."""

    @staticmethod
    def forward(Q: Tensor, x: Tensor) -> Tensor:
        return 0.5 * (bmv(Q, x) + brmv(Q, x))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, u: Tensor):
        Q, x = ctx.saved_tensors
        need_Q, need_x = ctx.needs_input_grad
        gQ = None
        if need_Q:
            P = _outer_sum(Q, u.unsqueeze(-1), x.unsqueeze(-2))
            gQ = (P + P.mT).mul_(0.5)
        return gQ, 0.5 * (brmv(Q, u) + bmv(Q, u)) if need_x else None


class _Products(torch.autograd.Function):
    """(Mx, Mᵀy) for M (B, k, n), (1, k, n) or (k, n), x (B, n), y (B, k). The gradient of
    M is a xᵀ + y bᵀ = [a y][x b]ᵀ for the cotangents a, b of the two products: one batched
    matrix product (summed over the batch for a shared M), where autograd would form two
    outer products and add them."""

    @staticmethod
    def forward(M: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return bmv(M, x), brmv(M, y)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, a: Tensor, b: Tensor):
        M, x, y = ctx.saved_tensors
        need_M, need_x, need_y = ctx.needs_input_grad
        gM = _outer_sum(M, torch.stack([a, y], -1), torch.stack([x, b], -2)) if need_M else None
        return gM, brmv(M, a) if need_x else None, bmv(M, b) if need_y else None


def _outer_sum(M: Tensor, U: Tensor, V: Tensor) -> Tensor:
    """U V for U (B, k, r), V (B, r, n), summed over the batch where M (k, n) or (1, k, n)
    is shared: then one (k, rB) × (rB, n) product."""
    (B, k, r), n = U.shape, V.shape[-1]
    if M.dim() == 3 and M.shape[0] == B:
        return U @ V
    return (U.transpose(0, 1).reshape(k, r * B) @ V.reshape(r * B, n)).reshape(M.shape)


def transpose_solver(result: PDIPMResult, s: Tensor, lam: Tensor, solved: Tensor):
    """u ↦ solution of (∂F/∂(z,λ,ν))ᵀ u = v at the returned solution, reusing the forward's
    factorization at that point (`result.kkt`, factored on first use if the forward left
    none that fits every problem):

        Q u_z + Gᵀ(λ∘u_λ) + Aᵀu_ν = v_z
        G u_z − s∘u_λ             = v_λ      (Gz − h = −s at the solution)
        A u_z                     = v_ν

    In w = λ∘u_λ this is the forward's KKT system with compliance D = s/λ (the interior
    point factor), or D = 0 on active and ∞ on inactive rows (the polish factor), solved
    on the scaled problem (u_z = D ũ_z, w = E_G w̃ / c, u_ν = E_A ũ_ν / c). Then
    u_λ = w/λ where λ > s and (G u_z − v_λ)/s elsewhere. At weakly active constraints
    (s ≈ λ ≈ 0) the Jacobian is singular; the regularized factor gives a finite
    (least-change) answer instead of a NaN. Problems that are not `solved` (B,) get
    u = 0, hence zero gradients.
    """
    G = result.G
    sc = result.scaling
    E_G, E_A = sc.split(G.shape[-2])
    c = sc.c.unsqueeze(-1)
    keep = solved.unsqueeze(-1)
    big = lam > s
    lam_safe = torch.where(big, lam, 1.0)
    s_safe = torch.where(big, 1.0, s.clamp(min=torch.finfo(s.dtype).eps))

    # the result until the first solve, then only its factor: the result's scaled data and
    # dual base (three (B, n, n)-sized matrices when m ≈ n) are freed before the gradients
    # of Q and G are formed
    held = [result]

    def solve(v):
        if isinstance(held[0], PDIPMResult):
            held[0] = held[0].kkt.factors_only()
        v_z, v_lam, v_nu = v
        u_z, w, u_nu = held[0].solve(c * sc.D * v_z, E_G * v_lam, E_A * v_nu, refine=0)
        u_z, w, u_nu = sc.D * u_z, E_G * w / c, E_A * u_nu / c
        u_lam = torch.where(big, w / lam_safe, (bmv(G, u_z) - v_lam) / s_safe)
        return tuple(torch.where(keep, u, 0.0) for u in (u_z, u_lam, u_nu))

    return solve
