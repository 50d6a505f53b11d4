"""Curves over the cost: clamped cubic B-splines on [0, 1], free or monotone.

A clamped B-spline passes through its first and last control points and stays
inside their convex hull; with non-decreasing control points it is non-decreasing.
So a curve whose first control point is pinned takes exactly that value at 0, and
a curve whose control points are a cumulative sum of positive increments is
monotone — both by construction, not by initialisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def bspline_basis(t: torch.Tensor, count: int, degree: int = 3) -> torch.Tensor:
    """Values of the ``count`` clamped uniform B-spline basis functions at ``t`` ∈ [0, 1]: ``(*t.shape, count)``.

    The basis sums to 1 everywhere; at ``t = 0`` it is ``(1, 0, …, 0)`` and at
    ``t = 1`` ``(0, …, 0, 1)``.
    """
    if count <= degree:
        raise ValueError(f"a degree-{degree} spline needs more than {degree} control points, got {count}")
    t = torch.as_tensor(t, dtype=torch.float64)
    interior = torch.linspace(0, 1, count - degree + 1, dtype=torch.float64)
    knots = torch.cat([torch.zeros(degree, dtype=torch.float64), interior, torch.ones(degree, dtype=torch.float64)])
    x = t.clamp(0, 1 - 1e-12)[..., None]  # t = 1 is read as the limit from the left
    basis = ((knots[:-1] <= x) & (x < knots[1:])).double()
    for d in range(1, degree + 1):
        left_span = knots[d:-1] - knots[:-d - 1]
        right_span = knots[d + 1:] - knots[1:-d]
        left = torch.where(left_span > 0, (x - knots[:-d - 1]) / left_span.clamp_min(1e-12), 0.0)
        right = torch.where(right_span > 0, (knots[d + 1:] - x) / right_span.clamp_min(1e-12), 0.0)
        basis = left * basis[..., :-1] + right * basis[..., 1:]
    return basis


class MonotoneCurves(nn.Module):
    """A batch of non-decreasing curves ``f(t) = start + Σ_i B_i(t) · Σ_{j≤i} softplus(raw_j)``.

    ``start`` is fixed (the value at ``t = 0``); ``shape`` is the batch shape (one
    curve per layer, say). ``offsets`` (same shape as the increments, optional)
    are added to the raw increments before the softplus, so that a shared curve
    plus per-curve deviations can be expressed by passing the shared part.
    """

    def __init__(self, shape: tuple[int, ...], count: int = 10, start: float = 0.0, rise: float = 1.0):
        super().__init__()
        self.count = count
        self.start = start
        step = rise / (count - 1)
        inverse_softplus = step + torch.log(-torch.expm1(torch.tensor(-step))).item()
        self.raw = nn.Parameter(torch.full((*shape, count - 1), inverse_softplus))

    def controls(self, offsets: torch.Tensor | None = None) -> torch.Tensor:
        raw = self.raw if offsets is None else self.raw + offsets
        steps = F.softplus(raw)
        zero = torch.zeros_like(steps[..., :1])
        return self.start + torch.cat([zero, steps.cumsum(-1)], -1)

    def forward(self, t: torch.Tensor | float, offsets: torch.Tensor | None = None) -> torch.Tensor:
        """Curve values at the scalar ``t``: the batch shape."""
        basis = bspline_basis(torch.as_tensor(t), self.count).to(self.raw.dtype)
        return self.controls(offsets) @ basis


class PinnedCurves(nn.Module):
    """A batch of free curves pinned to ``start`` at ``t = 0`` (first control point fixed)."""

    def __init__(self, shape: tuple[int, ...], count: int = 10, start: float = 0.0, slope: float = 1.0):
        super().__init__()
        self.count = count
        self.start = start
        rest = start + slope * torch.linspace(0, 1, count)[1:]
        self.free = nn.Parameter(rest.expand(*shape, count - 1).clone())

    def controls(self) -> torch.Tensor:
        first = torch.full_like(self.free[..., :1], self.start)
        return torch.cat([first, self.free], -1)

    def forward(self, t: torch.Tensor | float) -> torch.Tensor:
        basis = bspline_basis(torch.as_tensor(t), self.count).to(self.free.dtype)
        return self.controls() @ basis
