"""The KKT conditions of the QP as an optimality function, their Jacobian products in
closed form, and their transposed Jacobian solve at a solution, for implicit
differentiation (OptNet, Amos & Kolter 2017, eq. 6-8).

    F(z, λ, ν) = [ Qz + p + Gᵀλ + Aᵀν ;  λ ∘ (Gz − h) ;  Az − b ] = 0
"""

import warnings

import torch
from torch import Tensor

from amortized.linalg import bmv, brmv
from amortized.qp.kkt_system import KKT
from amortized.qp.pdipm import PDIPMResult


def kkt_conditions(z, lam, nu, Q, p, G, h, A, b) -> tuple[Tensor, Tensor, Tensor]:
    """F above for z (B,n), λ (B,m), ν (B,q); every parameter batched or shared. Q enters
    through its symmetric part, so dF/dQ is symmetric. The implicit backward does not
    linearize F: it uses the closed forms below, checked against torch.func.vjp of F."""
    r_d = 0.5 * (bmv(Q, z) + brmv(Q, z)) + p + brmv(G, lam) + brmv(A, nu)
    return r_d, lam * (bmv(G, z) - h), bmv(A, z) - b


def kkt_transpose_product(
    z, lam, nu, Q, p, G, h, A, b, u, tight: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """(∂F/∂(z, λ, ν))ᵀ u for F = `kkt_conditions` and u = (u_z, u_λ, u_ν), in closed form:

    ½(Q + Qᵀ) u_z + Gᵀ(λ∘u_λ) + Aᵀu_ν,    G u_z + (Gz − h)∘u_λ,    A u_z.

    tight (B, m): rows the backward's factor holds as equalities (a polished active set),
    whose slack h − Gz is taken as zero: what is left of it there is rounding, which a
    weakly active row (λ ~ 1e-5) amplifies by 1/λ once the refinement resolves it."""
    u_z, u_lam, u_nu = u
    Q_u = 0.5 * (bmv(Q, u_z) + brmv(Q, u_z))
    Gz_h = bmv(G, z) - h
    if tight is not None:
        Gz_h = torch.where(tight, 0.0, Gz_h)
    return Q_u + brmv(G, lam * u_lam) + brmv(A, u_nu), bmv(G, u_z) + Gz_h * u_lam, bmv(A, u_z)


def kkt_parameter_vjp(z, lam, nu, params, w, wanted) -> list[Tensor]:
    """(∂F/∂θ_i)ᵀ w for F = `kkt_conditions`, θ = (Q, p, G, h, A, b), w = (w_z, w_λ, w_ν)
    and the indices i in `wanted`, in closed form:

    Q: ½(w_z zᵀ + z w_zᵀ),   p: w_z,   G: λ w_zᵀ + (λ∘w_λ) zᵀ,   h: −λ∘w_λ,
    A: ν w_zᵀ + w_ν zᵀ,      b: −w_ν,

    each summed over the batch where its parameter is shared. Each matrix gradient is one
    sum of two outer products (`_outer_sum`): Q's is symmetric to rounding (a transposed
    sum P + Pᵀ would cost more), and its ½ scales the vectors, not the n × n result."""
    Q, p, G, h, A, b = params
    w_z, w_lam, w_nu = w
    lam_w = lam * w_lam
    # y w_zᵀ + w_y zᵀ = [y w_y][w_z z]ᵀ, one product
    outer2 = lambda M, y, w_y: _outer_sum(M, torch.stack([y, w_y], -1), torch.stack([w_z, z], -2))
    grads = {
        0: lambda: _outer_sum(Q, torch.stack([w_z, z], -1), torch.stack([z, w_z], -2) * 0.5),
        1: lambda: w_z.sum_to_size(p.shape),
        2: lambda: outer2(G, lam, lam_w),
        3: lambda: (-lam_w).sum_to_size(h.shape),
        4: lambda: outer2(A, nu, w_nu),
        5: lambda: (-w_nu).sum_to_size(b.shape),
    }
    return [grads[i]() for i in wanted]


def _outer_sum(M: Tensor, U: Tensor, V: Tensor) -> Tensor:
    """U V for U (B, k, r), V (B, r, n), summed over the batch where M (k, n) or (1, k, n)
    is shared: then one (k, rB) × (rB, n) product. Per problem, one batched product writes
    the k × n result once (a product plus a multiply-add of outer products measured 6–10%
    slower in the backward)."""
    (B, k, r), n = U.shape, V.shape[-1]
    if M.dim() == 3 and M.shape[0] == B:
        return U @ V
    return (U.transpose(0, 1).reshape(k, r * B) @ V.reshape(r * B, n)).reshape(M.shape)


class JacobianSolves:
    """Solves with the Jacobian J = ∂F/∂(z, λ, ν) at the returned solution, reusing the
    forward's factorization at that point (`result.kkt`, factored on first use if the
    forward left none that fits every problem). `transpose(v)`, for the backward, solves

        Q u_z + Gᵀ(λ∘u_λ) + Aᵀu_ν = v_z
        G u_z − s∘u_λ             = v_λ      (Gz − h = −s at the solution)
        A u_z                     = v_ν

    In w = λ∘u_λ this is the forward's KKT system K (symmetric) with compliance D = s/λ
    (the interior point factor), or D = 0 on active and ∞ on inactive rows (the polish
    factor), solved on the scaled problem (`_kkt`). Then u_λ = w/λ where λ > s and
    (G u_z − v_λ)/s elsewhere. `forward(ū)`, for second derivatives, solves J w = ū, which
    is K w = (ū_z, ū_λ/λ, ū_ν) since J = diag(I, Λ, I) K; a row left out of K (D = ∞, λ = 0)
    has w_λ = −ū_λ/s instead, moved to the first block's right side. At weakly active
    constraints (s ≈ λ ≈ 0) J is singular; the regularized factor gives a finite
    (least-change) answer instead of a NaN. Problems that are not `solved` (B,), or whose
    system does not factor (with a warning), get zeros (`frozen`).
    """

    def __init__(self, result: PDIPMResult, s: Tensor, lam: Tensor, solved: Tensor):
        self.G, self.sc = result.G, result.scaling
        self.lam = lam
        self.keep = solved.unsqueeze(-1)
        self.absent = torch.isinf(result.D)
        self.tight = result.D == 0  # rows factored as equalities (a polished active set)
        self.big = lam > s
        eps = torch.finfo(s.dtype).eps
        # the result until the first solve, then only its factor: the result's scaled data
        # and dual base (three (B, n, n)-sized matrices when m ≈ n) are freed before the
        # gradients of Q and G are formed
        self.held: PDIPMResult | KKT = result
        self.solved = solved
        self.s_safe = s.clamp(min=eps)
        self.lam_safe = lam.clamp(min=eps * (1 + lam.abs().amax(-1, keepdim=True))) if lam.shape[-1] else lam

    @property
    def frozen(self) -> Tensor:
        """(B,) the problems whose solves are held at zero."""
        return ~self.keep.squeeze(-1)

    def _kkt(
        self, r_z: Tensor, r_lam: Tensor, r_nu: Tensor, refine: int = 0
    ) -> tuple[Tensor, Tensor, Tensor]:
        """K⁻¹(r_z, r_λ, r_ν) in the original problem's terms, through the scaled factor
        (x = D x̃, y = E ỹ / c for right sides (c D r_z, E r_λ, E r_ν)); `refine` steps
        against the exact K where the factor keeps its data (primal and separable forms,
        whose ρ = δ ≈ 1e-7 would otherwise stay in the answer)."""
        if isinstance(self.held, PDIPMResult):
            self.held = self.held.kkt.factors_only()
            failed = self.solved & ~self.held.ok
            if bool(failed.any()):
                bad = failed.nonzero().flatten().tolist()[:10]
                warnings.warn(
                    f"solve_qp backward: the KKT system at the solution of problems {bad} did not "
                    "factor; their gradients are zero",
                    RuntimeWarning,
                    stacklevel=3,
                )
                self.keep = self.keep & ~failed.unsqueeze(-1)
        sc = self.sc
        E_G, E_A = sc.split(self.G.shape[-2])
        c = sc.c.unsqueeze(-1)
        refine = refine if self.held.d is not None else 0
        x, y, y_e = self.held.solve(c * sc.D * r_z, E_G * r_lam, E_A * r_nu, refine=refine)
        return sc.D * x, E_G * y / c, E_A * y_e / c

    def _masked(self, *xs: Tensor) -> tuple[Tensor, ...]:
        return tuple(torch.where(self.keep, x, 0.0) for x in xs)

    def transpose(self, v: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, ...]:
        """u with Jᵀu = v."""
        v_z, v_lam, v_nu = v
        u_z, w, u_nu = self._kkt(v_z, v_lam, v_nu)
        u_lam = torch.where(
            self.big, w / torch.where(self.big, self.lam, 1.0), (bmv(self.G, u_z) - v_lam) / self.s_safe
        )
        return self._masked(u_z, u_lam, u_nu)

    def forward(self, u_bar: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, ...]:
        """w with J w = ū."""
        b_z, b_lam, b_nu = u_bar
        out = torch.where(self.absent, b_lam / self.s_safe, 0.0)  # rows left out of K
        # refined here: the backward's transposed solves are refined by implicit_root instead
        w_z, w_lam, w_nu = self._kkt(
            b_z + brmv(self.G, out), torch.where(self.absent, 0.0, b_lam / self.lam_safe), b_nu, refine=2
        )
        return self._masked(w_z, torch.where(self.absent, -out, w_lam), w_nu)
