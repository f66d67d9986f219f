"""Rotation conversions against independent references (matrix exponential, trace/skew formulas)."""

import math

import pytest
import torch

from echomotion.motion import (
    axis_angle_to_matrix,
    axis_angle_to_rot6d,
    matrix_to_axis_angle,
    matrix_to_rot6d,
    rot6d_to_axis_angle,
    rot6d_to_matrix,
)


def skew(v: torch.Tensor) -> torch.Tensor:
    m = torch.zeros(*v.shape[:-1], 3, 3, dtype=v.dtype)
    m[..., 0, 1], m[..., 0, 2], m[..., 1, 2] = -v[..., 2], v[..., 1], -v[..., 0]
    return m - m.transpose(-1, -2)


def reference_matrix(aa: torch.Tensor) -> torch.Tensor:
    """exp([aa]_x): the definition of the rotation, with no Rodrigues formula involved."""
    return torch.linalg.matrix_exp(skew(aa.double()))


def random_axis_angles(angles: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """One random unit axis per angle."""
    g = torch.Generator().manual_seed(seed)
    axis = torch.nn.functional.normalize(torch.randn(len(angles), 3, generator=g, dtype=torch.float64), dim=-1)
    return axis * angles[:, None]


def mixed_angles(n: int, seed: int = 0) -> torch.Tensor:
    """Uniform angles in (0, pi) plus the awkward ones: exactly 0, tiny, and just below pi."""
    g = torch.Generator().manual_seed(seed)
    special = torch.tensor([0.0, 1e-12, 1e-7, 1e-4, 0.5, math.pi - 1e-3, math.pi - 1e-6], dtype=torch.float64)
    return torch.cat([special, torch.rand(n, generator=g, dtype=torch.float64) * math.pi])


def test_axis_angle_to_matrix_matches_matrix_exponential():
    # Angles above pi too: the conversion must not assume a canonical range.
    aa = random_axis_angles(torch.cat([mixed_angles(200), torch.tensor([3.5, 2 * math.pi, 7.0], dtype=torch.float64)]))
    torch.testing.assert_close(axis_angle_to_matrix(aa), reference_matrix(aa), atol=1e-12, rtol=0)


def test_axis_angle_to_matrix_float32_and_leading_dims():
    aa = random_axis_angles(mixed_angles(17), seed=1).reshape(2, 3, 4, 3)
    r = axis_angle_to_matrix(aa.float())
    assert r.shape == (2, 3, 4, 3, 3) and r.dtype == torch.float32
    torch.testing.assert_close(r.double(), reference_matrix(aa), atol=2e-6, rtol=0)


def test_matrix_to_axis_angle_round_trip_below_pi():
    aa = random_axis_angles(mixed_angles(293, seed=2), seed=2)
    back = matrix_to_axis_angle(reference_matrix(aa))
    torch.testing.assert_close(back, aa, atol=1e-8, rtol=0)


def test_matrix_to_axis_angle_small_angle_series_is_accurate():
    # Angles on both sides of the switch to the series (|sin(t/2)|^2 < 1e-8, i.e. t < 2e-4).
    aa = random_axis_angles(torch.logspace(-5, -3, 60, dtype=torch.float64), seed=8)
    torch.testing.assert_close(matrix_to_axis_angle(reference_matrix(aa)), aa, rtol=1e-9, atol=0)


def test_matrix_to_axis_angle_against_trace_formula():
    # Independent inverse for mid-range angles: cos t = (tr R - 1) / 2, axis from the skew part.
    aa = random_axis_angles(torch.linspace(0.2, 2.9, 100, dtype=torch.float64), seed=3)
    r = reference_matrix(aa)
    angle = torch.arccos((r.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2)
    w = torch.stack([r[:, 2, 1] - r[:, 1, 2], r[:, 0, 2] - r[:, 2, 0], r[:, 1, 0] - r[:, 0, 1]], -1)
    expected = w / (2 * torch.sin(angle))[:, None] * angle[:, None]
    torch.testing.assert_close(matrix_to_axis_angle(r), expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 2e-5)])
def test_near_pi_recovers_the_rotation(dtype, tol):
    angles = torch.tensor([math.pi, math.pi - 1e-7, math.pi - 1e-4, math.pi - 1e-2] * 25, dtype=torch.float64)
    aa = random_axis_angles(angles, seed=4)
    r = reference_matrix(aa).to(dtype)
    back = matrix_to_axis_angle(r)
    assert torch.isfinite(back).all()
    # At pi the axis sign is ambiguous, so compare rotations, and check the angle stays in [0, pi].
    torch.testing.assert_close(reference_matrix(back), r.double(), atol=tol * 10, rtol=0)
    assert (back.double().norm(dim=-1) <= math.pi + tol).all()
    torch.testing.assert_close(back.double().norm(dim=-1), angles, atol=1e-3 if dtype == torch.float32 else tol,
                               rtol=0)


def test_near_zero_float32_round_trip():
    aa = random_axis_angles(torch.logspace(-9, -2, 50, dtype=torch.float64), seed=5).float()
    back = matrix_to_axis_angle(axis_angle_to_matrix(aa))
    torch.testing.assert_close(back, aa, atol=1e-6, rtol=0)
    assert torch.equal(matrix_to_axis_angle(torch.eye(3)), torch.zeros(3))


def test_rot6d_is_the_first_two_columns():
    rz90 = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # 90 deg about z
    torch.testing.assert_close(matrix_to_rot6d(rz90), torch.tensor([0.0, 1.0, 0.0, -1.0, 0.0, 0.0]))
    torch.testing.assert_close(axis_angle_to_rot6d(torch.tensor([0.0, 0.0, math.pi / 2])),
                               torch.tensor([0.0, 1.0, 0.0, -1.0, 0.0, 0.0]), atol=1e-7, rtol=0)


def test_rot6d_round_trip_on_rotations():
    aa = random_axis_angles(mixed_angles(193, seed=6), seed=6)
    r = reference_matrix(aa)
    torch.testing.assert_close(rot6d_to_matrix(matrix_to_rot6d(r)), r, atol=1e-12, rtol=0)
    torch.testing.assert_close(reference_matrix(rot6d_to_axis_angle(matrix_to_rot6d(r))), r, atol=1e-9, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rot6d_to_matrix_projects_any_input_onto_a_rotation(dtype):
    g = torch.Generator().manual_seed(7)
    d6 = (torch.randn(5, 40, 6, generator=g) * 3).to(dtype)
    r = rot6d_to_matrix(d6)
    eye = torch.eye(3, dtype=dtype).expand_as(r)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(r.transpose(-1, -2) @ r, eye, atol=tol, rtol=0)
    torch.testing.assert_close(torch.linalg.det(r), torch.ones(5, 40, dtype=dtype), atol=tol, rtol=0)
    # Gram-Schmidt keeps the first vector's direction and the second within the same plane.
    a1, a2 = d6[..., :3], d6[..., 3:]
    torch.testing.assert_close(r[..., :, 0], a1 / a1.norm(dim=-1, keepdim=True), atol=tol, rtol=0)
    assert ((r[..., :, 1] * a2).sum(-1) > 0).all()
    torch.testing.assert_close((r[..., :, 2] * a2).sum(-1), torch.zeros(5, 40, dtype=dtype), atol=tol * 10, rtol=0)


def test_gradients_are_finite_at_singular_angles():
    aa = torch.tensor([[0.0, 0.0, 0.0], [1e-9, 0.0, 0.0], [0.0, math.pi - 1e-6, 0.0], [0.3, -0.2, 0.1]],
                      dtype=torch.float64, requires_grad=True)
    r = axis_angle_to_matrix(aa)
    loss = (r * torch.arange(9, dtype=torch.float64).reshape(3, 3)).sum() + matrix_to_axis_angle(r).square().sum()
    loss.backward()
    assert torch.isfinite(aa.grad).all()
    d6 = torch.randn(8, 6, dtype=torch.float64, requires_grad=True)
    rot6d_to_axis_angle(d6).sum().backward()
    assert torch.isfinite(d6.grad).all()


def test_gradcheck_at_zero_and_generic():
    aa = torch.tensor([[0.0, 0.0, 0.0], [0.4, -1.1, 0.7]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(axis_angle_to_matrix, (aa,))
    r = reference_matrix(torch.tensor([[0.4, -1.1, 0.7], [1e-3, 2e-3, 0.0]], dtype=torch.float64))
    assert torch.autograd.gradcheck(matrix_to_axis_angle, (r.requires_grad_(),))


def test_shape_errors_name_the_expected_shape():
    with pytest.raises(ValueError, match=r"\[\.\.\., 3\]"):
        axis_angle_to_matrix(torch.zeros(4, 4))
    with pytest.raises(ValueError, match=r"\[\.\.\., 6\]"):
        rot6d_to_matrix(torch.zeros(5))
    with pytest.raises(ValueError, match=r"\[\.\.\., 3, 3\]"):
        matrix_to_axis_angle(torch.zeros(3))
