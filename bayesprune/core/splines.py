"""Curves over the cost: clamped cubic B-splines on [0, 1], free or monotone.

A clamped B-spline passes through its first and last control points and stays
inside their convex hull; with non-decreasing control points it is non-decreasing.
So a curve whose first control point is pinned takes exactly that value at 0, and
a curve whose control points are a cumulative sum of positive increments is
monotone — both by construction, not by initialisation. The curves are plain
functions of their control points, so the control points can be random variables.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def monotone_controls(start: float, raw: torch.Tensor) -> torch.Tensor:
    """Non-decreasing control points ``start, start + softplus(raw_1), …`` (cumulative), ``(..., count)``."""
    steps = F.softplus(raw)
    return start + torch.cat([torch.zeros_like(steps[..., :1]), steps.cumsum(-1)], -1)


def pinned_controls(start: float, free: torch.Tensor) -> torch.Tensor:
    """Control points whose first is fixed at ``start``, the rest free, ``(..., count)``."""
    return torch.cat([torch.full_like(free[..., :1], start), free], -1)


def curve_at(controls: torch.Tensor, t: float) -> torch.Tensor:
    """Values at ``t`` of the clamped cubic B-splines with these control points: the batch shape."""
    return controls @ bspline_basis(torch.as_tensor(t), controls.shape[-1]).to(controls)


def rising_increments(count: int, rise: float) -> torch.Tensor:
    """Raw increments whose monotone curve rises linearly by ``rise`` over [0, 1]: ``(count − 1,)``."""
    step = torch.tensor(rise / (count - 1), dtype=torch.float64)
    return (step + torch.log(-torch.expm1(-step))).float().expand(count - 1).clone()
