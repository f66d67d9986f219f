"""3D RoPE and MVS-RoPE against brute-force float64 formulas written out here."""
import math

import pytest
import torch

from echomotion.models.rope import (
    apply_rope,
    axis_dims,
    motion_positions,
    rope_angles,
    rope_cos_sin,
    sincos_embedding,
    video_positions,
)
from echomotion.motion.smpl import MOTION_TOKENS_PER_FRAME


def brute_angle(pos: tuple[float, float, float], head_dim: int, pair: int, theta: float = 10000.0) -> float:
    """Angle of channel pair `pair` for a token at (t, h, w): Wan's 44/42/42-style split of the pairs, per-axis freqs."""
    d_h = d_w = 2 * (head_dim // 6)
    d_t = head_dim - d_h - d_w
    bands = [(0, d_t // 2), (d_t // 2, d_t // 2 + d_h // 2), (d_t // 2 + d_h // 2, head_dim // 2)]
    for axis, (lo, hi) in enumerate(bands):
        if lo <= pair < hi:
            d_axis = 2 * (hi - lo)
            j = pair - lo
            return pos[axis] * (1.0 / math.pow(theta, 2 * j / d_axis))
    raise AssertionError


@pytest.mark.parametrize("head_dim", [128, 32, 12])
@pytest.mark.parametrize("layout", ["mvs", "collision"])
def test_mvs_rope_angles_match_brute_force(head_dim: int, layout: str) -> None:
    frames, tokens, grid = 9, MOTION_TOKENS_PER_FRAME, (30, 52)
    ang = rope_angles(motion_positions(frames, tokens, grid, layout, 4.0), head_dim)
    assert ang.dtype == torch.float64 and ang.shape == (frames * tokens, head_dim // 2)
    for f in range(frames):
        for i in (0, 1, 24, 25, 50):
            h0, w0 = grid if layout == "mvs" else (0, 0)
            pos = (f / 4.0, h0 + i, w0 + i)  # paper Eq. 3 (mvs) / Eq. 15 (collision)
            row = ang[f * tokens + i]
            expect = torch.tensor([brute_angle(pos, head_dim, p) for p in range(head_dim // 2)], dtype=torch.float64)
            torch.testing.assert_close(row, expect, rtol=1e-13, atol=1e-12)


def test_wan_split_for_head_dim_128() -> None:
    # Wan2.1/2.2: head_dim 128 -> 44/42/42 real dims -> 22/21/21 pairs; a token moved only in h rotates only pairs 22..42.
    a = rope_angles(torch.tensor([[0.0, 0.0, 0.0]]), 128)
    b = rope_angles(torch.tensor([[0.0, 5.0, 0.0]]), 128)
    moved = (a != b).squeeze(0).nonzero().squeeze(1)
    assert moved.tolist() == list(range(22, 43))


def test_video_positions_row_major() -> None:
    pos = video_positions(2, 3, 4)
    assert pos.shape == (24, 3)
    assert pos[0].tolist() == [0, 0, 0] and pos[1].tolist() == [0, 0, 1] and pos[4].tolist() == [0, 1, 0]
    assert pos[12].tolist() == [1, 0, 0]


def test_motion_frame_4k_aligns_with_latent_k() -> None:
    per = MOTION_TOKENS_PER_FRAME
    pos = motion_positions(9, per, (3, 3), "mvs", 4.0)
    assert pos[8 * per, 0].item() == 2.0 and pos[2 * per, 0].item() == 0.5  # fractional time, computed directly


def test_rope_scores_depend_only_on_relative_position() -> None:
    g = torch.Generator().manual_seed(0)
    head_dim = 32
    q = torch.randn(1, 1, 1, head_dim, generator=g, dtype=torch.float64)
    k = torch.randn(1, 1, 1, head_dim, generator=g, dtype=torch.float64)

    def score(pq: list[float], pk: list[float]) -> float:
        cq, sq = rope_cos_sin(torch.tensor([pq]), head_dim)
        ck, sk = rope_cos_sin(torch.tensor([pk]), head_dim)
        return float((apply_rope(q, cq.double(), sq.double()) * apply_rope(k, ck.double(), sk.double())).sum())

    base = score([1, 2, 3], [4, 0, 7])
    for shift in ([3, 5, 1], [10, 0, 0], [0.25, 7, 2]):
        moved = score([1 + shift[0], 2 + shift[1], 3 + shift[2]], [4 + shift[0], 0 + shift[1], 7 + shift[2]])
        assert moved == pytest.approx(base, rel=1e-6, abs=1e-9)
    assert abs(score([1, 2, 3], [5, 0, 7]) - base) > 1e-3  # and it does depend on the relative position


def test_apply_rope_is_complex_multiplication_of_adjacent_pairs() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 3, 12, generator=g)
    pos = torch.rand(5, 3, generator=g, dtype=torch.float64) * 10
    ang = rope_angles(pos, 12)
    expect = torch.view_as_real(torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous()) * torch.polar(torch.ones_like(ang), ang)[None, :, None, :])
    got = apply_rope(x, *rope_cos_sin(pos, 12))
    torch.testing.assert_close(got, expect.flatten(-2).float(), rtol=1e-5, atol=1e-5)


def test_sincos_embedding_matches_brute_force() -> None:
    """The toy position aid: per axis a band of the width (Wan's split), sines then cosines of position * 100^(-j/pairs)."""
    pos = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [0.25, 15.0, 7.0]])
    dim = 64
    got = sincos_embedding(pos, dim)
    assert got.shape == (3, dim) and got.dtype == torch.float32
    for n, p in enumerate(pos.tolist()):
        want = []
        for axis, width in enumerate(axis_dims(dim)):
            pairs = width // 2
            angles = [p[axis] * 100.0 ** (-j / pairs) for j in range(pairs)]
            want += [math.sin(a) for a in angles] + [math.cos(a) for a in angles]
        assert got[n].tolist() == pytest.approx(want, abs=1e-6)


def test_tables_are_built_on_the_positions_device() -> None:
    """The model builds positions on its device (CUDA in training); the frequencies must follow them there. The meta
    device stands in for a second device on a CPU machine: mixing it with CPU tensors fails as CUDA does."""
    from echomotion.models.rope import rope_angles, sincos_embedding, video_positions

    pos = video_positions(2, 3, 4).to("meta")
    assert rope_angles(pos, 12).device.type == "meta"
    assert sincos_embedding(pos, 12).device.type == "meta"
