"""Wan's 3D RoPE, and MVS-RoPE for motion tokens (paper Eq. 2-3).

Angles are computed directly as position * inverse frequency in float64 (Wan precomputes tables for integer positions only;
motion tokens sit at fractional times f/4). Pairs of adjacent channels rotate together, and a head's channels split into
time/height/width bands exactly as Wan's: for head_dim d, real dims d - 4*(d//6), 2*(d//6), 2*(d//6) (44/42/42 for d=128).
"""
from __future__ import annotations

import torch
from torch import Tensor


def axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Real channels per axis (t, h, w), Wan's split."""
    return head_dim - 4 * (head_dim // 6), 2 * (head_dim // 6), 2 * (head_dim // 6)


def inverse_frequencies(head_dim: int, theta: float = 10000.0) -> list[Tensor]:
    """One float64 inverse-frequency vector per axis, Wan's rope_params: 1 / theta^(2j/d_axis)."""
    return [
        1.0 / torch.pow(torch.tensor(theta, dtype=torch.float64), torch.arange(0, d, 2, dtype=torch.float64) / d)
        for d in axis_dims(head_dim)
    ]


def video_positions(frames: int, height: int, width: int) -> Tensor:
    """(t, h, w) of each video token in Wan's row-major (F, H, W) order: [F*H*W, 3] float64."""
    grid = torch.meshgrid(
        torch.arange(frames, dtype=torch.float64),
        torch.arange(height, dtype=torch.float64),
        torch.arange(width, dtype=torch.float64),
        indexing="ij",
    )
    return torch.stack(grid, dim=-1).reshape(-1, 3)


def motion_positions(
    frames: int, tokens_per_frame: int, grid_hw: tuple[int, int], layout: str = "mvs", temporal_ratio: float = 4.0
) -> Tensor:
    """Positions of motion token i of frame f, frame-major: [frames * tokens_per_frame, 3] float64.

    "mvs" (paper Eq. 3): (f / ratio, H + i, W + i), a diagonal outside the video grid, so no motion token shares a spatial
    coordinate with a video token and each token index i gets its own phase. "collision" (Eq. 15, the ablation): (f / ratio, i, i).
    """
    f = torch.arange(frames, dtype=torch.float64) / temporal_ratio
    i = torch.arange(tokens_per_frame, dtype=torch.float64)
    h0, w0 = grid_hw if layout == "mvs" else (0, 0)
    t = f[:, None].expand(frames, tokens_per_frame)
    h = (h0 + i)[None, :].expand(frames, tokens_per_frame)
    w = (w0 + i)[None, :].expand(frames, tokens_per_frame)
    return torch.stack([t, h, w], dim=-1).reshape(-1, 3)


def rope_angles(positions: Tensor, head_dim: int, theta: float = 10000.0) -> Tensor:
    """Rotation angle of every channel pair: [L, head_dim // 2] float64, bands ordered t | h | w."""
    freqs = inverse_frequencies(head_dim, theta)
    pos = positions.to(torch.float64)
    return torch.cat([pos[:, a, None] * freqs[a].to(pos.device)[None, :] for a in range(3)], dim=1)


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos/sin tables in float32 from float64 angles ([L, head_dim // 2] each)."""
    ang = rope_angles(positions, head_dim, theta)
    return torch.cos(ang).float(), torch.sin(ang).float()


def sincos_embedding(positions: Tensor, dim: int, theta: float = 100.0) -> Tensor:
    """Parameter-free absolute position embedding [L, dim] (float32) of (t, h, w) positions: each axis gets a band of the
    width (Wan's RoPE split, `axis_dims(dim)`), half sines and half cosines of position * theta^(-j / pairs).

    A toy-scale aid (`model.abs_pos`), not part of Wan: under RoPE alone the token values carry no position, and a tiny model
    trained from scratch never learns to place content (docs/method-decisions.md). theta = 100 spreads the wavelengths over
    the few tens of positions a toy grid has, where Wan's 10000 would leave most channels nearly constant.
    """
    pos = positions.to(torch.float64)
    bands = []
    for axis, width in enumerate(axis_dims(dim)):
        pairs = width // 2
        freqs = torch.pow(torch.tensor(theta, dtype=torch.float64), -torch.arange(pairs, dtype=torch.float64) / pairs)
        angle = pos[:, axis, None] * freqs.to(pos.device)[None, :]
        bands += [torch.sin(angle), torch.cos(angle)]
    return torch.cat(bands, dim=1).float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent channel pairs of x [B, L, N, D] by the angles of its L tokens, in fp32 (or wider), cast back.

    One complex multiply, as Wan writes it: a pair (x1, x2) is the complex number x1 + i x2, rotated by cos + i sin. It is
    also the cheapest form on CPU (a single fused op forward and backward, no stack/select copies).
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    pairs = torch.view_as_complex(x.to(dtype).unflatten(-1, (-1, 2)))
    rotation = torch.complex(cos.to(dtype), sin.to(dtype))[None, :, None, :]
    return torch.view_as_real(pairs * rotation).flatten(-2).type_as(x)
