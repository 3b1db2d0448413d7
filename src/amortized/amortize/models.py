"""Amortization models ŷ_θ(x): plain `nn.Module`s followed by an output projection.

Every projection is an `nn.Module` called as `projection(raw, x)`, with raw (B, k) the
network's output and x (B, context_dim) the context, and returns y (B, n):

    SphereProjection       y = raw / ‖raw‖                     (unit sphere S^{n−1})
    SimplexProjection      y = softmax(raw)                    (probability simplex)
    BoxProjection          y = lo + (hi − lo)·σ(raw)  or  mid + half·tanh(raw)   (box)
    EqualityCompletion     DC3's completion (Donti, Rolnick, Kolter 2021): raw are the
                           n − q "partial" variables y_p and the other q solve A y = b(x)
                           exactly, y_o = A_o⁻¹ (b(x) − A_p y_p)
"""

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn


class MLP(nn.Sequential):
    """Fully connected network sizes[0] → … → sizes[-1] with `activation` between layers."""

    def __init__(self, sizes: Sequence[int], activation: type[nn.Module] = nn.ReLU):
        if len(sizes) < 2:
            raise ValueError("MLP needs at least an input and an output size")
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(activation())
        super().__init__(*layers)
        self.sizes = list(sizes)


class SphereProjection(nn.Module):
    """raw (B, n) → raw/‖raw‖ on the unit sphere (the tutorial's sphere model)."""

    def forward(self, raw: Tensor, x: Tensor | None = None) -> Tensor:
        return raw / raw.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(raw.dtype).tiny ** 0.5)


class SimplexProjection(nn.Module):
    """raw (B, n) → softmax(raw) on the probability simplex."""

    def forward(self, raw: Tensor, x: Tensor | None = None) -> Tensor:
        return torch.softmax(raw, dim=-1)


class BoxProjection(nn.Module):
    """raw (B, n) → the box [lo, hi] (lo, hi scalars or (n,)) by a sigmoid or a tanh."""

    def __init__(self, lo: float | Tensor, hi: float | Tensor, kind: str = "sigmoid"):
        super().__init__()
        if kind not in ("sigmoid", "tanh"):
            raise ValueError(f"kind must be 'sigmoid' or 'tanh', got {kind!r}")
        lo, hi = torch.as_tensor(lo, dtype=torch.float64), torch.as_tensor(hi, dtype=torch.float64)
        if not bool((hi > lo).all()):
            raise ValueError("BoxProjection needs hi > lo")
        self.register_buffer("lo", lo)
        self.register_buffer("hi", hi)
        self.kind = kind

    def forward(self, raw: Tensor, x: Tensor | None = None) -> Tensor:
        lo, hi = self.lo.to(raw), self.hi.to(raw)
        if self.kind == "sigmoid":
            return lo + (hi - lo) * torch.sigmoid(raw)
        return (hi + lo) / 2 + (hi - lo) / 2 * torch.tanh(raw)


class EqualityCompletion(nn.Module):
    """DC3 completion for A y = b(x): raw (B, n − q) are y_p; y_o = A_o⁻¹ (b(x) − A_p y_p).

    A (q, n) fixed with full row rank; `other` (q,) indices of the completed variables
    (default: the last q, as DC3) must make A_o = A[:, other] invertible. b(x) = x by default
    (DC3's family: the context is the right-hand side); pass `rhs` for another map
    x (B, context_dim) → b (B, q). Output y (B, n) satisfies A y = b(x) to rounding.
    """

    def __init__(self, A: Tensor, other: Tensor | None = None, rhs: Callable[[Tensor], Tensor] | None = None):
        super().__init__()
        q, n = A.shape
        if q >= n:
            raise ValueError(
                f"EqualityCompletion needs fewer equalities than variables, got A {tuple(A.shape)}"
            )
        other = torch.arange(n - q, n) if other is None else torch.as_tensor(other)
        mask = torch.ones(n, dtype=torch.bool)
        mask[other] = False
        partial = mask.nonzero().flatten()
        A_o, A_p = A[:, other], A[:, partial]
        if torch.linalg.matrix_rank(A_o) < q:
            raise ValueError("A[:, other] is singular: choose other completion variables")
        A_o_inv = torch.linalg.inv(A_o)  # one small matrix, inverted once
        self.register_buffer("A_o_inv", A_o_inv)
        self.register_buffer("M", A_o_inv @ A_p)  # y_o = A_o⁻¹ b − M y_p
        self.register_buffer("partial", partial)
        self.register_buffer("other", other)
        self.rhs = rhs
        self.n = n

    def complete(self, y_p: Tensor, x: Tensor) -> Tensor:
        """y_p (B, n − q), x (B, context_dim) → y (B, n) with A y = b(x)."""
        b = x if self.rhs is None else self.rhs(x)
        y_o = b @ self.A_o_inv.to(b).T - y_p @ self.M.to(y_p).T
        y = y_p.new_empty(y_p.shape[0], self.n)
        y = y.index_copy(1, self.partial, y_p)
        return y.index_copy(1, self.other, y_o)

    def forward(self, raw: Tensor, x: Tensor) -> Tensor:
        return self.complete(raw, x)


class AmortizedModel(nn.Module):
    """ŷ_θ(x) = projection(net(x), x); `projection` None means the identity."""

    def __init__(self, net: nn.Module, projection: nn.Module | None = None):
        super().__init__()
        self.net = net
        self.projection = projection

    def forward(self, x: Tensor) -> Tensor:
        raw = self.net(x)
        return raw if self.projection is None else self.projection(raw, x)
