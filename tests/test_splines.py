import pytest
import torch

from bayesprune.splines import MonotoneCurves, PinnedCurves, bspline_basis

T = torch.linspace(0, 1, 101)


@pytest.mark.parametrize("count", [4, 6, 10])
def test_basis_is_a_partition_of_unity_clamped_at_both_ends(count):
    basis = bspline_basis(T, count)
    assert basis.shape == (101, count)
    assert torch.allclose(basis.sum(-1), torch.ones(101, dtype=torch.float64))
    assert (basis >= 0).all()
    assert torch.equal(basis[0], torch.eye(count, dtype=torch.float64)[0])
    assert torch.allclose(basis[-1], torch.eye(count, dtype=torch.float64)[-1], atol=1e-6)


def test_basis_matches_a_hand_computed_cubic_bezier():
    # With 4 control points the clamped cubic B-spline is the Bernstein basis.
    t = 0.3
    expected = torch.tensor([[(1 - t) ** 3, 3 * t * (1 - t) ** 2, 3 * t ** 2 * (1 - t), t ** 3]], dtype=torch.float64)
    assert torch.allclose(bspline_basis(torch.tensor([t]), 4), expected)


def test_too_few_control_points_are_refused():
    with pytest.raises(ValueError, match="more than 3"):
        bspline_basis(T, 3)


def test_monotone_curves_start_where_pinned_and_never_decrease_whatever_the_parameters():
    curves = MonotoneCurves((5,), count=8, start=-2.0, rise=3.0)
    with torch.no_grad():
        curves.raw.normal_(0, 3)
    values = torch.stack([curves(t) for t in T], -1)
    assert torch.equal(values[:, 0], torch.full((5,), -2.0))
    assert (values.diff(dim=-1) >= -1e-6).all()


def test_monotone_curves_rise_as_asked_at_initialisation_and_take_offsets():
    curves = MonotoneCurves((2,), count=6, start=1.0, rise=2.0)
    assert torch.allclose(curves(1.0), torch.full((2,), 3.0), atol=1e-5)
    shifted = curves(1.0, offsets=torch.full((2, 5), 10.0))
    assert (shifted > 3.0 + 40).all()


def test_pinned_curves_are_exact_at_zero_and_free_elsewhere():
    curves = PinnedCurves((3,), count=5, start=0.0, slope=1.0)
    with torch.no_grad():
        curves.free.normal_()
    assert torch.equal(curves(0.0), torch.zeros(3))
    assert not torch.allclose(curves(0.7), torch.zeros(3))
    curves(0.5).sum().backward()
    assert curves.free.grad is not None and curves.free.grad.abs().sum() > 0
