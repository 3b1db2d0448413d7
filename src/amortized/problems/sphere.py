"""The tutorial's sphere problem (ch. 4): minimize a soft-min of c-convex components on S².

Context x ∈ R^16 holds m = 4 points z_i ∈ S² (uniform) and offsets α_i = 0.7·U[0, 1]; the
objective on the unit sphere is

    f(y; x) = −γ log Σ_i exp(−(½ d(y, z_i)² + α_i)/γ),   γ = 0.5,

with d the geodesic distance d(u, v) = 2 atan2(‖u − v‖, ‖u + v‖) (stable at 0 and π).
f is non-convex on S²; the reference solver takes the best point of a dense Fibonacci grid
and refines it by Riemannian gradient descent (projected gradient, then renormalization).

f is invariant under permuting the m components and equivariant under rotations,
f(Qy; Qx) = f(y; x) for Q ∈ SO(3) acting on every z_i, so y*(Qx) = Q y*(x). `ContextFrame`
uses both to present an amortization model with the context in a canonical pose.
"""

import math
import time

import torch
from torch import Tensor, nn

from amortized.amortize import GradientRefiner, SphereProjection


def geodesic(u: Tensor, v: Tensor) -> Tensor:
    """Great-circle distance between unit vectors u, v (..., 3), broadcast; finite gradients."""
    tiny = torch.finfo(u.dtype).tiny ** 0.5
    a = ((u - v).square().sum(-1) + tiny).sqrt()
    b = ((u + v).square().sum(-1) + tiny).sqrt()
    return 2 * torch.atan2(a, b)


def fibonacci_sphere(n: int, dtype=torch.float64, device=None) -> Tensor:
    """(n, 3) nearly uniform points on S² (golden-angle spiral)."""
    i = torch.arange(n, dtype=dtype, device=device) + 0.5
    z = 1 - 2 * i / n
    r = (1 - z * z).clamp_min(0).sqrt()
    phi = math.pi * (3 - math.sqrt(5)) * i
    return torch.stack([r * phi.cos(), r * phi.sin(), z], -1)


def canonical_frame(z: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The context's canonical pose: components sorted by α, and the rotation R (B, 3, 3)
    (rows u₁, u₂, u₃) taking the lowest-α point to the north pole e₃ and the next one into
    the half-plane {y = 0, x > 0}. z (B, m, 3) unit vectors, alpha (B, m); returns
    (R, z sorted (B, m, 3), α sorted (B, m)). R is undefined only when z₂ = ±z₁ (measure zero).
    """
    alpha, order = alpha.sort(-1)
    z = z.gather(-2, order.unsqueeze(-1).expand_as(z))
    u3 = z[:, 0]
    v = z[:, 1] - (z[:, 1] * u3).sum(-1, keepdim=True) * u3  # z₂'s part orthogonal to z₁
    u1 = v / v.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny ** 0.5)
    return torch.stack([u1, torch.linalg.cross(u3, u1), u3], 1), z, alpha


class ContextFrame(nn.Module):
    """ŷ(x) = Rᵀ net(R z, (α − E α)/std α): the model sees the context in its canonical pose.

    Parameter-free input normalization by the problem's symmetries (see the module
    docstring): the components are sorted by α (f does not depend on their order), α is
    standardized with p(x)'s moments (U[0, a]: mean a/2, std a/√12), and with rotate=True
    the points are rotated by `canonical_frame`'s R and the net's output (B, 3) is rotated
    back by Rᵀ, so the model is exactly rotation-equivariant and the net only learns y* in
    the canonical pose (5 of the points' 8 degrees of freedom vary there, not 8 plus the
    pose). rotate=False keeps only the sorting and standardization (no output map).
    Input x (B, 4m) as `SphereProblem`; net: (B, 4m) → (B, 3).
    """

    def __init__(self, net: nn.Module, m: int = 4, alpha_scale: float = 0.7, rotate: bool = True):
        super().__init__()
        self.net, self.m, self.rotate = net, m, rotate
        self.alpha_mean, self.alpha_std = alpha_scale / 2, alpha_scale / math.sqrt(12)

    def forward(self, x: Tensor) -> Tensor:
        z, alpha = x[..., : 3 * self.m].unflatten(-1, (self.m, 3)), x[..., 3 * self.m :]
        R, z, alpha = canonical_frame(z, alpha)
        if self.rotate:
            z = z @ R.transpose(1, 2)  # R z_i for every point
        h = torch.cat([z.flatten(1), (alpha - self.alpha_mean) / self.alpha_std], -1)
        out = self.net(h)
        return (R.transpose(1, 2) @ out.unsqueeze(-1)).squeeze(-1) if self.rotate else out


class SphereProblem:
    """f(y; x) on S² for contexts x (B, 16) = (z (B, 4·3) flattened, α (B, 4)); y (B, 3)."""

    def __init__(
        self,
        m: int = 4,
        gamma: float = 0.5,
        alpha_scale: float = 0.7,
        dtype=torch.float64,
        grid: int = 4000,
        refine_steps: int = 200,
        refine_lr: float = 0.2,
    ):
        self.m, self.gamma, self.alpha_scale, self.dtype = m, gamma, alpha_scale, dtype
        self.context_dim, self.solution_dim = 4 * m, 3
        self.grid, self.refine_steps, self.refine_lr = grid, refine_steps, refine_lr

    def unpack(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x[..., : 3 * self.m].unflatten(-1, (self.m, 3)), x[..., 3 * self.m :]

    def objective(self, y: Tensor, x: Tensor) -> Tensor:
        """(B,) soft-min; y (B, 3) on the sphere (or (B, G, 3) for G points per context)."""
        z, alpha = self.unpack(x)
        if y.dim() == 3:
            z, alpha = z.unsqueeze(1), alpha.unsqueeze(1)
        c = 0.5 * geodesic(y.unsqueeze(-2), z).square() + alpha
        return -self.gamma * torch.logsumexp(-c / self.gamma, dim=-1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        z = torch.randn(n, self.m, 3, generator=generator, dtype=self.dtype)
        z = z / z.norm(dim=-1, keepdim=True)
        alpha = self.alpha_scale * torch.rand(n, self.m, generator=generator, dtype=self.dtype)
        return torch.cat([z.flatten(1), alpha], -1)

    def grid_search(self, x: Tensor) -> Tensor:
        """(B, 3) the best point of the Fibonacci grid for each context."""
        pts = fibonacci_sphere(self.grid, dtype=x.dtype, device=x.device)
        best = []
        with torch.no_grad():
            for xc in x.split(256):  # bounds memory at B·grid·m distances
                f = self.objective(pts.expand(xc.shape[0], -1, -1), xc)
                best.append(pts[f.argmin(1)])
        return torch.cat(best)

    def refiner(self) -> GradientRefiner:
        return GradientRefiner(self.refine_lr, retract=SphereProjection(), riemannian=True)

    def solve(self, x: Tensor) -> Tensor:
        """Reference optimum: best of a Fibonacci grid, then Riemannian gradient descent."""
        return self.refiner()(self.objective, self.grid_search(x), x, self.refine_steps, create_graph=False)[
            -1
        ]

    def solve_trace(self, x: Tensor) -> tuple[Tensor, tuple[list[float], list[float]]]:
        """`solve` with its progress: the solution (B, 3) and (cumulative wall times, mean
        objective) after the grid search and after each Riemannian step (for time-to-match)."""
        t0 = time.perf_counter()
        y = self.grid_search(x)
        times, values = [time.perf_counter() - t0], [float(self.objective(y, x).mean())]
        step = self.refiner()
        for _ in range(self.refine_steps):
            t0 = time.perf_counter()
            y = step(self.objective, y, x, 1, create_graph=False)[-1]
            times.append(times[-1] + time.perf_counter() - t0)
            values.append(float(self.objective(y, x).mean()))  # outside the timed region
        return y, (times, values)

    def distance(self, y: Tensor, y_ref: Tensor) -> Tensor:
        return geodesic(y, y_ref)
