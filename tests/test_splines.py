import pytest
import torch

from bayesprune.core.splines import bspline_basis, curve_at, monotone_controls, pinned_controls, rising_increments

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
    controls = monotone_controls(-2.0, torch.randn(5, 7) * 3)
    values = torch.stack([curve_at(controls, t) for t in T], -1)
    assert torch.equal(values[:, 0], torch.full((5,), -2.0))
    assert (values.diff(dim=-1) >= -1e-6).all()


def test_monotone_curves_rise_as_asked_at_initialisation():
    controls = monotone_controls(1.0, rising_increments(6, 2.0).expand(2, 5))
    assert torch.allclose(curve_at(controls, 1.0), torch.full((2,), 3.0), atol=1e-5)
    assert torch.allclose(curve_at(controls, 0.5), torch.full((2,), 2.0), atol=1e-5)


def test_pinned_curves_are_exact_at_zero_and_free_elsewhere():
    free = torch.randn(3, 4, requires_grad=True)
    controls = pinned_controls(0.0, free)
    assert torch.equal(curve_at(controls, 0.0), torch.zeros(3))
    assert not torch.allclose(curve_at(controls, 0.7), torch.zeros(3))
    curve_at(controls, 0.5).sum().backward()
    assert free.grad is not None and free.grad.abs().sum() > 0
