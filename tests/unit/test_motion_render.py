"""Skeleton rendering: pixels land where an orthographic camera puts them."""

import numpy as np
import pytest
import torch

from echomotion.motion import render_skeleton, side_by_side

RED, BLACK = (255, 0, 0), (0, 0, 0)
STICK = np.array([[[0.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])  # one vertical bone, 1 m long
STICK_PARENTS = (-1, 0)


def draw_stick(joints=STICK, **kw):
    args = dict(background=BLACK, color=RED, parents=STICK_PARENTS, line_width=1, joint_radius=0)
    return render_skeleton(joints, 21, 21, **{**args, **kw})


def smpl_like_clip(num_frames: int = 3) -> np.ndarray:
    g = np.random.default_rng(0)
    return g.normal(size=(num_frames, 24, 3)) * 0.3 + np.array([0.0, 1.0, 0.0])


def test_shape_dtype_and_determinism():
    clip = smpl_like_clip()
    a = render_skeleton(clip, 32, 48)
    assert a.shape == (3, 32, 48, 3) and a.dtype == np.uint8 and a.any()
    assert np.array_equal(a, render_skeleton(torch.from_numpy(clip).float(), 32, 48))
    assert np.array_equal(a, render_skeleton(clip, 32, 48))


def test_bone_pixels_where_expected():
    # scale 10 px/m, centre (0, 0.5, 0) -> image centre (10, 10): the bone spans rows 5..15 of column 10.
    img = draw_stick(scale=10.0, center=(0.0, 0.5, 0.0))[0]
    assert all(tuple(img[row, 10]) == RED for row in range(5, 16))
    assert tuple(img[10, 12]) == BLACK and tuple(img[3, 10]) == BLACK and tuple(img[17, 10]) == BLACK
    assert (img.any(-1).sum(0) > 0).sum() == 1  # nothing outside that one column


def test_front_and_side_view_orientation():
    bone_x = np.array([[[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]])  # towards the body's left
    img = draw_stick(bone_x, scale=5.0, center=(0.0, 0.0, 0.0))[0]
    assert tuple(img[10, 15]) == RED and tuple(img[10, 5]) == BLACK  # front view: +x on the image right
    bone_z = np.array([[[0.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])  # towards the body's front
    side = draw_stick(bone_z, scale=5.0, center=(0.0, 0.0, 0.0), view="side")[0]
    assert tuple(side[10, 5]) == RED and tuple(side[10, 15]) == BLACK  # seen from its left, it faces left
    top = draw_stick(bone_z, scale=5.0, center=(0.0, 0.0, 0.0), view="top")[0]
    assert tuple(top[15, 10]) == RED and tuple(top[5, 10]) == BLACK  # from above, the front points down


def test_auto_fit_uses_the_whole_clip():
    # Frame 1 moves the stick 1 m right; the fit is over both frames, so frame 0 sits left of centre.
    clip = np.concatenate([STICK, STICK + np.array([1.0, 0.0, 0.0])])
    auto = draw_stick(clip)
    # bbox: x in [0, 1], y in [0, 1] -> centre (0.5, 0.5), scale = 0.9 * 21 / 1 px/m
    assert np.array_equal(auto, draw_stick(clip, scale=0.9 * 21, center=(0.5, 0.5, 0.0)))
    cols = [np.flatnonzero(f.any(-1).any(0)) for f in auto]
    assert cols[0].max() < 10 < cols[1].min()


def test_default_palette_and_backgrounds():
    clip = smpl_like_clip(2)
    clip[:, 20] = [1.0, 1.0, 0.0]  # left wrist far to the +x side
    out = render_skeleton(clip, 40, 40, background=(0, 0, 80))
    row, col = np.argwhere(out[0].any(-1) & (out[0, ..., 0] > 0)).T
    rightmost = out[0, row[col.argmax()], col.max()]
    assert rightmost[0] > rightmost[2]  # the left side is drawn warm
    assert tuple(out[0, 0, 0]) == (0, 0, 80)
    frames = np.full((2, 40, 40, 3), 7, np.uint8)
    over = render_skeleton(clip, 40, 40, background=frames)
    untouched = (over == 7).all(-1)
    assert untouched.any() and not untouched.all() and (frames == 7).all()


def test_non_finite_joints_are_skipped():
    clip = smpl_like_clip(2)
    clip[0, 5] = np.nan
    out = render_skeleton(clip, 24, 24)
    assert out.shape == (2, 24, 24, 3)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown view 'back'"):
        render_skeleton(smpl_like_clip(), 8, 8, view="back")
    with pytest.raises(ValueError, match=r"joints must be \[F,24,3\]"):
        render_skeleton(np.zeros((2, 23, 3)), 8, 8)
    with pytest.raises(ValueError, match="background"):
        render_skeleton(smpl_like_clip(), 8, 8, background=np.zeros((8, 9, 3), np.uint8))


def test_side_by_side_resizes_b_to_a_height():
    a = np.full((2, 20, 30, 3), 10, np.uint8)
    b = np.full((2, 10, 8, 3), 200, np.uint8)
    out = side_by_side(a, b)
    assert out.shape == (2, 20, 46, 3) and out.dtype == np.uint8
    assert np.array_equal(out[:, :, :30], a) and (out[:, :, 30:] == 200).all()
    with pytest.raises(ValueError, match="frame counts differ"):
        side_by_side(a, b[:1])
