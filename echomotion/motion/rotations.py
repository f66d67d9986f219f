"""Batched rotation conversions (axis-angle, matrix, 6D) for any leading dims, float32 or float64.

SMPL stores rotations as axis-angle; the model consumes the continuous 6D representation of
Zhou et al. 2019 (first two columns of the matrix), so every conversion must be exact on rotations,
differentiable, and free of NaNs at the singular angles 0 and pi.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "axis_angle_to_matrix",
    "matrix_to_axis_angle",
    "matrix_to_rot6d",
    "rot6d_to_matrix",
    "axis_angle_to_rot6d",
    "rot6d_to_axis_angle",
]

# Below this squared angle (about 0.03 degrees) the Taylor series are exact to float64 precision,
# and the closed forms would divide by a vanishing angle.
_SMALL_ANGLE_SQ = 1e-8


def _check_last_dims(x: torch.Tensor, shape: tuple[int, ...], name: str) -> None:
    if x.dim() < len(shape) or tuple(x.shape[x.dim() - len(shape):]) != shape:
        want = "[..., " + ", ".join(map(str, shape)) + "]"
        raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")


def _skew(v: torch.Tensor) -> torch.Tensor:
    """Cross-product matrix [v]_x, so that [v]_x @ u == cross(v, u)."""
    x, y, z = v.unbind(-1)
    zero = torch.zeros_like(x)
    return torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=-1).reshape(*v.shape[:-1], 3, 3)


def axis_angle_to_matrix(aa: torch.Tensor) -> torch.Tensor:
    """Rodrigues: R = I + a(t) K + b(t) K^2 with K = [aa]_x, a = sin t / t, b = (1 - cos t) / t^2.

    Written on the unnormalised K so a zero vector needs no axis; a and b switch to their Taylor
    series near t = 0, keeping values and gradients finite there.
    """
    _check_last_dims(aa, (3,), "axis-angle")
    theta_sq = (aa * aa).sum(-1)
    small = theta_sq < _SMALL_ANGLE_SQ
    theta = torch.sqrt(torch.where(small, torch.ones_like(theta_sq), theta_sq))
    a = torch.where(small, 1.0 - theta_sq / 6.0, torch.sin(theta) / theta)
    b = torch.where(small, 0.5 - theta_sq / 24.0, (1.0 - torch.cos(theta)) / (theta * theta))
    k = _skew(aa)
    eye = torch.eye(3, dtype=aa.dtype, device=aa.device).expand_as(k)
    return eye + a[..., None, None] * k + b[..., None, None] * (k @ k)


def _matrix_to_quaternion(r: torch.Tensor) -> torch.Tensor:
    """Unit quaternion (w, x, y, z) with w >= 0, by Shepperd's method.

    Each of the four classic formulas divides by one quaternion component; picking the one built on
    the largest component keeps the division well conditioned for every rotation, including pi.
    """
    m00, m01, m02 = r[..., 0, 0], r[..., 0, 1], r[..., 0, 2]
    m10, m11, m12 = r[..., 1, 0], r[..., 1, 1], r[..., 1, 2]
    m20, m21, m22 = r[..., 2, 0], r[..., 2, 1], r[..., 2, 2]
    # 4 * (w^2, x^2, y^2, z^2)
    four_sq = torch.stack(
        [
            1.0 + m00 + m11 + m22,
            1.0 + m00 - m11 - m22,
            1.0 - m00 + m11 - m22,
            1.0 - m00 - m11 + m22,
        ],
        dim=-1,
    )
    # Clamping keeps the unused candidates (and their gradients) finite; they are discarded below.
    two_q = torch.sqrt(four_sq.clamp_min(1e-12))
    d21, d02, d10 = m21 - m12, m02 - m20, m10 - m01
    s01, s02, s12 = m01 + m10, m02 + m20, m12 + m21
    # Row i: the quaternion computed from component i (each row is 4*q_i * q, then divided by 4*q_i).
    cand = torch.stack(
        [
            torch.stack([two_q[..., 0] ** 2, d21, d02, d10], dim=-1),
            torch.stack([d21, two_q[..., 1] ** 2, s01, s02], dim=-1),
            torch.stack([d02, s01, two_q[..., 2] ** 2, s12], dim=-1),
            torch.stack([d10, s02, s12, two_q[..., 3] ** 2], dim=-1),
        ],
        dim=-2,
    ) / (2.0 * two_q[..., :, None])
    best = four_sq.argmax(dim=-1)
    q = torch.gather(cand, -2, best[..., None, None].expand(*best.shape, 1, 4)).squeeze(-2)
    q = F.normalize(q, dim=-1)
    return torch.where(q[..., :1] < 0, -q, q)


def matrix_to_axis_angle(r: torch.Tensor) -> torch.Tensor:
    """Inverse of axis_angle_to_matrix, angle in [0, pi]; at exactly pi either axis sign is valid."""
    _check_last_dims(r, (3, 3), "rotation matrix")
    q = _matrix_to_quaternion(r)
    w, v = q[..., 0], q[..., 1:]
    n_sq = (v * v).sum(-1)
    small = n_sq < _SMALL_ANGLE_SQ
    n = torch.sqrt(torch.where(small, torch.ones_like(n_sq), n_sq))
    # angle / sin(angle / 2) = 2 atan2(n, w) / n; its series for small n is 2/w - (2/3) n^2 / w^3.
    w_safe = torch.where(small, w, torch.ones_like(w))
    factor = torch.where(
        small,
        2.0 / w_safe - (2.0 / 3.0) * n_sq / w_safe**3,
        2.0 * torch.atan2(n, w) / n,
    )
    return v * factor[..., None]


def matrix_to_rot6d(r: torch.Tensor) -> torch.Tensor:
    """6D representation of Zhou et al. 2019: the first two columns, [R[:, 0], R[:, 1]]."""
    _check_last_dims(r, (3, 3), "rotation matrix")
    return torch.cat([r[..., :, 0], r[..., :, 1]], dim=-1)


def rot6d_to_matrix(d6: torch.Tensor) -> torch.Tensor:
    """Gram-Schmidt on the two 3-vectors, third column = their cross product.

    Maps any 6D vector (e.g. a network output) to a proper rotation, and is the exact inverse of
    matrix_to_rot6d on rotations.
    """
    _check_last_dims(d6, (6,), "6D rotation")
    a1, a2 = d6[..., :3], d6[..., 3:]
    b1 = F.normalize(a1, dim=-1)
    b2 = F.normalize(a2 - (b1 * a2).sum(-1, keepdim=True) * b1, dim=-1)
    b3 = torch.linalg.cross(b1, b2, dim=-1)
    return torch.stack([b1, b2, b3], dim=-1)


def axis_angle_to_rot6d(aa: torch.Tensor) -> torch.Tensor:
    """Axis-angle [..., 3] -> 6D [..., 6]."""
    return matrix_to_rot6d(axis_angle_to_matrix(aa))


def rot6d_to_axis_angle(d6: torch.Tensor) -> torch.Tensor:
    """6D [..., 6] -> axis-angle [..., 3] (projects non-orthogonal inputs onto a rotation first)."""
    return matrix_to_axis_angle(rot6d_to_matrix(d6))
