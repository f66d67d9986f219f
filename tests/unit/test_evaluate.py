"""Held-out evaluation: metric functions against brute force and hand-made cases, the caption parser, the renderer's
label map / camera / background against its pixels, an oracle that must score perfectly and beat every baseline, the
report contract, and an end-to-end CLI run of a tiny random model on a tiny HuMoVe-mini."""

import dataclasses
import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from echomotion.config import load_config
from echomotion.data import synthetic
from echomotion.data.synthetic import (
    ACTIONS,
    COLOURS,
    LABELS,
    generate_humove_mini,
    make_motion,
    project_joints,
    render_clip,
    render_labels,
    sample_spec,
    wall_fraction,
)
from echomotion.data.encoders import pad_text
from echomotion.evaluate import (
    mean_pose_joints,
    BASELINES,
    CHANCE,
    CHECKS,
    HIGHER_IS_BETTER,
    METRIC_TABLE,
    METRICS,
    TASK_ORDER,
    ActionReferences,
    EvalData,
    EvalSettings,
    EvaluationError,
    Generated,
    build_report,
    canonical_joints,
    clip_batches,
    colour_accuracies,
    derangement,
    dilate,
    evaluate,
    fk_joints,
    foreground_mask,
    joint_error_2d,
    mask_iou,
    mean_abs_pixel_error,
    nearest_colour,
    pair_score,
    parse_caption_action,
    parse_caption_colours,
    root_relative_mpjpe,
    score,
    without_depth,
)
from echomotion.export import load_exported, save_exported
from echomotion.models import EchoMotionDiT
from echomotion.models.echomotion import Prediction, Task
from tests.tool_scripts import load_tool

ROOT = Path(__file__).resolve().parents[2]


def _brute_mpjpe(pred: np.ndarray, gt: np.ndarray) -> float:
    total, count = 0.0, 0
    for f in range(gt.shape[0]):
        p = pred[min(f, pred.shape[0] - 1)]
        for j in range(gt.shape[1]):
            d = (p[j] - p[0]) - (gt[f, j] - gt[f, 0])
            total += math.sqrt(float(d[0]) ** 2 + float(d[1]) ** 2 + float(d[2]) ** 2)
            count += 1
    return 1000.0 * total / count


# --- metric functions --------------------------------------------------------------------------------------------------


def test_mpjpe_matches_brute_force_loop():
    rng = np.random.default_rng(0)
    gt, pred = rng.normal(size=(2, 5, 24, 3))
    assert root_relative_mpjpe(pred, gt) == pytest.approx(_brute_mpjpe(pred, gt), rel=1e-12)
    one = pred[:1]  # one pose for every frame (the mean-pose baseline)
    assert root_relative_mpjpe(one, gt) == pytest.approx(_brute_mpjpe(one, gt), rel=1e-12)
    assert root_relative_mpjpe(torch.from_numpy(pred), torch.from_numpy(gt)) == pytest.approx(_brute_mpjpe(pred, gt))


def test_mpjpe_is_root_relative_in_mm_equivalent():
    rng = np.random.default_rng(1)
    gt = rng.normal(size=(4, 24, 3))
    moved = gt + rng.normal(size=(4, 1, 3)) * 10  # a different global translation per frame
    assert root_relative_mpjpe(moved, gt) == pytest.approx(0.0, abs=1e-9)
    off = gt.copy()
    off[:, 5] += [0.0, 0.003, 0.004]  # one joint of 24 off by 5 mm in every frame
    assert root_relative_mpjpe(off, gt) == pytest.approx(5.0 / 24)
    with pytest.raises(ValueError, match="joints must be"):
        root_relative_mpjpe(gt[:2], gt)


def test_depth_unknown_reference_is_the_mean_depth_offset():
    """Flattening depth moves each joint by its depth relative to the pelvis, so the reference is mean |z_j - z_0|."""
    rng = np.random.default_rng(2)
    gt = torch.from_numpy(rng.normal(size=(3, 24, 3)))
    flat = without_depth(gt)
    assert torch.equal(flat[..., :2], gt[..., :2]) and torch.equal(flat[..., 2], gt[:, :1, 2].expand(3, 24))
    want = 1000.0 * (gt[..., 2] - gt[:, :1, 2]).abs().mean().item()
    assert root_relative_mpjpe(flat, gt) == pytest.approx(want, rel=1e-12)
    planar = gt.clone()
    planar[..., 2] = 0.7  # a body in a plane facing the camera loses nothing
    assert root_relative_mpjpe(without_depth(planar), planar) == 0.0


def test_mean_abs_pixel_error_on_hand_made_frames():
    a = np.zeros((2, 2, 2, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0] = 255  # 3 values of 24 differ by 255 (a uint8 difference would wrap to 1)
    b[1, 1, 1, 0] = 24
    assert mean_abs_pixel_error(a, b) == pytest.approx((3 * 255 + 24) / 24)
    assert mean_abs_pixel_error(b, a) == mean_abs_pixel_error(a, b)
    assert mean_abs_pixel_error(b, b) == 0.0
    with pytest.raises(ValueError, match="shape"):
        mean_abs_pixel_error(a, b[:1])
    with pytest.raises(ValueError, match="uint8"):
        mean_abs_pixel_error(a.astype(np.float32), b)


def test_derangement_has_no_fixed_points_and_is_seeded():
    for n in range(2, 40):
        for seed in range(5):
            perm = derangement(n, seed)
            assert sorted(perm.tolist()) == list(range(n))
            assert not np.any(perm == np.arange(n)), (n, seed, perm)
    assert np.array_equal(derangement(20, 3), derangement(20, 3))
    assert not np.array_equal(derangement(20, 3), derangement(20, 4))
    with pytest.raises(EvaluationError, match=">= 2 clips"):
        derangement(1, 0)


def test_caption_colours_round_trip_every_generated_caption():
    rng = np.random.default_rng(0)
    for _ in range(50):
        for action in ACTIONS:
            spec = sample_spec(rng, action)
            assert parse_caption_colours(spec.caption()) == (spec.shirt, spec.trousers, spec.background)
            assert parse_caption_action(spec.caption()) == action
    caption = "a person in an orange shirt and grey trousers runs quickly on a white background"
    assert parse_caption_colours(caption) == ("orange", "grey", "white")
    assert parse_caption_action(caption) == "run"
    with pytest.raises(EvaluationError, match="verb 'dances'"):
        parse_caption_action("a person in an orange shirt and grey trousers dances on a white background")
    with pytest.raises(EvaluationError, match="not a HuMoVe-mini caption"):
        parse_caption_colours("a person runs")
    with pytest.raises(EvaluationError, match="unknown colours"):
        parse_caption_colours("a person in a teal shirt and grey trousers runs on a white background")
    assert "teal" not in COLOURS


def test_pad_text_zero_pads_and_truncates_like_collate():
    emb = torch.arange(12, dtype=torch.float16).reshape(4, 3)
    padded = pad_text(emb, 6)
    assert padded.dtype == torch.float16 and padded.shape == (6, 3)
    assert torch.equal(padded[:4], emb) and not padded[4:].any()
    assert torch.equal(pad_text(emb, 2), emb[:2])
    assert pad_text(torch.zeros(0, 3), 5).shape == (5, 3)  # the empty prompt


def test_clip_batches_cover_every_clip_in_order():
    assert [list(b) for b in clip_batches(5, 2)] == [[0, 1], [2, 3], [4]]
    assert [list(b) for b in clip_batches(3, 8)] == [[0, 1, 2]]


# --- perception metrics on hand-made arrays ---------------------------------------------------------------------------


def _brute_iou(a: np.ndarray, b: np.ndarray) -> float:
    inter = union = 0
    for idx in np.ndindex(a.shape):
        inter += int(a[idx] and b[idx])
        union += int(a[idx] or b[idx])
    return inter / union if union else 0.0


def test_mask_iou_matches_brute_force_and_sums_over_frames():
    rng = np.random.default_rng(3)
    for _ in range(5):
        a, b = rng.random((2, 3, 5, 4)) < 0.4
        assert mask_iou(a, b) == pytest.approx(_brute_iou(a, b), rel=1e-12)
    a = np.zeros((2, 3, 3), bool)
    b = a.copy()
    a[0, 0, :2], b[0, 0, 1:] = True, True  # frame 0: 1 shared pixel of 3
    a[1, :2, :2], b[1, :2, :2] = True, True  # frame 1: 4 of 4
    assert mask_iou(a, b) == pytest.approx(5 / 7)  # sums over frames, not the mean of 1/3 and 1
    assert mask_iou(a, np.zeros_like(a)) == 0.0
    assert mask_iou(np.zeros_like(a), np.zeros_like(a)) == 0.0  # empty union: documented as 0
    with pytest.raises(ValueError, match="shape"):
        mask_iou(a, a[:1])
    assert (pair_score(0.6, 0.2), pair_score(0.3, 0.3), pair_score(0.1, 0.4)) == (1.0, 0.5, 0.0)


def _brute_2d(pred: np.ndarray, gt: np.ndarray, height: int) -> float:
    """Independent of project_joints: the camera is orthographic, height / 2.6 m pixels per metre, y up = row down."""
    per_m = height / synthetic._VIEW_HEIGHT_M
    total, count = 0.0, 0
    for f in range(gt.shape[0]):
        for j in range(gt.shape[1]):
            p = pred[min(f, pred.shape[0] - 1), j]
            du, dv = (p[0] - gt[f, j, 0]) * per_m, -(p[1] - gt[f, j, 1]) * per_m
            total += math.sqrt(du * du + dv * dv)
            count += 1
    return total / count


def test_joint_error_2d_matches_brute_force_and_ignores_depth():
    rng = np.random.default_rng(4)
    gt, pred = rng.normal(size=(2, 3, 24, 3))
    assert joint_error_2d(pred, gt, 32, 40) == pytest.approx(_brute_2d(pred, gt, 32), rel=1e-12)
    assert joint_error_2d(pred[:1], gt, 48, 24) == pytest.approx(_brute_2d(pred[:1], gt, 48), rel=1e-12)
    px = synthetic._VIEW_HEIGHT_M / 32  # metres per pixel at 32 rows
    moved = gt + np.array([3 * px, -4 * px, 5.0])  # 3 px across, 4 px up, any depth: 5 px
    assert joint_error_2d(moved, gt, 32, 32) == pytest.approx(5.0)
    assert joint_error_2d(torch.from_numpy(gt), torch.from_numpy(gt), 32, 32) == 0.0  # absolute, tensors accepted
    with pytest.raises(ValueError, match="joints must be"):
        joint_error_2d(gt[:2], gt, 32, 32)


def test_camera_puts_the_view_centre_mid_image_with_y_up():
    h, w = 32, 40
    centre = project_joints(np.array([0.0, synthetic._VIEW_CENTER_Y, 0.7]), h, w)
    np.testing.assert_allclose(centre, [(w - 1) / 2, (h - 1) / 2])
    up_left = project_joints(np.array([-1.0, synthetic._VIEW_CENTER_Y + 1.0, 0.0]), h, w)
    np.testing.assert_allclose(up_left - centre, [-h / 2.6, -h / 2.6])  # 2.6 m span h rows; higher = smaller row


def test_foreground_is_what_differs_from_the_videos_own_background():
    """A rendered empty scene (the body far outside the frame) plus painted boxes: exactly the boxes, with noise too."""
    h, w = 32, 32
    far = np.full((3, 24, 3), 50.0)
    empty = render_clip(far, "red", "blue", "green", h, w)
    assert np.array_equal(empty[0, 0, 0], COLOURS["green"])
    video = empty.copy()
    video[:, 5:15, 10:14] = COLOURS["red"]  # on the wall
    video[1, 30:32, 3:9] = COLOURS["white"]  # on the floor, one frame
    want = np.zeros((3, h, w), bool)
    want[:, 5:15, 10:14] = True
    want[1, 30:32, 3:9] = True
    assert np.array_equal(foreground_mask(video), want)
    faint = video.copy()
    faint[2, 0:4, 0:4] = np.array(COLOURS["green"]) + [0, 40, 0]  # a difference of 40 < 48: background
    faint[0, 20:22, 0:4] = np.array(COLOURS["green"]) + [0, 0, 50]  # 50 > 48: foreground
    want_faint = want.copy()
    want_faint[0, 20:22, 0:4] = True
    assert np.array_equal(foreground_mask(faint), want_faint)
    noise = np.random.default_rng(5).integers(-20, 21, video.shape)  # sampling noise well under the threshold
    assert np.array_equal(foreground_mask(np.clip(video + noise, 0, 255).astype(np.uint8)), want)
    assert not foreground_mask(empty).any()  # the blended row at the ground line is background too


def test_dilate_and_nearest_colour():
    m = np.zeros((2, 4, 5), bool)
    m[0, 0, 0] = m[1, 2, 2] = True
    d = dilate(m)
    want = np.zeros_like(m)
    want[0, :2, :2] = True
    want[1, 1:4, 1:4] = True
    assert np.array_equal(d, want)  # per frame, 3 x 3, clipped at the border
    for name, rgb in COLOURS.items():
        assert nearest_colour(rgb) == name
        assert nearest_colour(np.clip(np.array(rgb) + [12, -12, 12], 0, 255)) == name


def _rot_y(a: float) -> np.ndarray:
    return np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])


def test_canonical_joints_remove_position_and_facing():
    rng = np.random.default_rng(6)
    j = rng.normal(size=(5, 24, 3))
    for yaw in (0.3, -2.0, 3.1):
        moved = j @ _rot_y(yaw).T + np.array([1.5, 0.2, -3.0])
        np.testing.assert_allclose(canonical_joints(moved), canonical_joints(j), atol=1e-9)
    c = canonical_joints(j)
    hip = c[0, 1] - c[0, 2]
    assert np.allclose(c[0, 0], 0.0) and abs(hip[2]) < 1e-9 and hip[0] > 0  # left hip toward +x: facing +z


# --- the renderer's camera, background and label map ------------------------------------------------------------------

# sha256 of render_clip's frames for the inputs of _checksum_inputs, computed with render_clip as it was before the
# drawing moved into synthetic._draw_frames (shared with render_labels): the refactor must not move a pixel.
RENDER_SHA256 = "6e2d4994474c3e96ec0a6ef21035151b212f7a9f093bbb0694b6d0e924af3251"


def _checksum_inputs():
    for seed, colours, size in ((0, ("red", "blue", "green"), (32, 32)), (1, ("pink", "black", "white"), (24, 40)),
                                (2, ("grey", "yellow", "purple"), (48, 20))):
        lo, hi = np.array([-0.8, -0.1, -0.5]), np.array([0.8, 2.1, 0.5])
        yield lo + (hi - lo) * np.random.default_rng(seed).random((3, 24, 3)), colours, size


def test_render_clip_pixels_are_unchanged():
    digest = hashlib.sha256()
    for joints, colours, size in _checksum_inputs():
        digest.update(render_clip(joints, *colours, *size).tobytes())
    assert digest.hexdigest() == RENDER_SHA256


def test_projection_is_where_render_clip_paints():
    """Every joint at one point p: the body is a disc around p, whose centre in the video and in the label map is p's
    projection (to ~1/8 px: PIL truncates coordinates at the 4x drawing resolution)."""
    rng = np.random.default_rng(7)
    h, w = 96, 80
    wall_rows = wall_fraction(h) == 1
    for _ in range(4):
        p = np.array([rng.uniform(-0.8, 0.8), rng.uniform(0.4, 1.8), rng.uniform(-1.0, 1.0)])
        joints = np.tile(p, (2, 24, 1))
        u, v = project_joints(p, h, w)
        video = render_clip(joints, "red", "blue", "green", h, w)[0]
        rows, cols = np.nonzero(np.any(video != COLOURS["green"], -1) & wall_rows[:, None])
        assert abs(cols.mean() - u) < 0.3 and abs(rows.mean() - v) < 0.3, (p, cols.mean(), rows.mean(), u, v)
        rows, cols = np.nonzero(render_labels(joints, h, w)[0])
        assert abs(cols.mean() - u) < 0.3 and abs(rows.mean() - v) < 0.3


def test_label_map_marks_the_pixels_the_body_covers_at_least_half():
    """Every joint at one image point, the shirt's joints nearest the camera: the shirt limbs are painted last, and
    their 0.30 m end caps hide everything else, so the video shows one white disc on a black wall. An edge pixel is the
    box filter's blend, so its coverage is (pixel - wall) / (white - wall); the silhouette must be exactly the pixels
    covered >= 50%."""
    rng = np.random.default_rng(8)
    h, w = 40, 40
    wall, white = COLOURS["black"][0], COLOURS["white"][0]
    shirt_joints = sorted({q for a, b, _, slot in synthetic._LIMBS if slot == "shirt" for q in (a, b)})
    for _ in range(6):
        joints = np.tile([rng.uniform(-0.4, 0.4), rng.uniform(0.8, 1.4), -1.0], (1, 24, 1))
        joints[:, shirt_joints, 2] = 0.0
        video = render_clip(joints, "white", "blue", "black", h, w)[0].astype(float)
        assert np.all(video[..., 0] == video[..., 2])  # grey levels only: white over black, nothing else shows
        coverage = (video[..., 0] - wall) / (white - wall)
        silhouette = render_labels(joints, h, w)[0] > 0
        assert np.array_equal(silhouette, coverage >= 0.5 - 1 / 64)  # coverage is k/16; rounding moves it < 1/64
        assert (coverage > 0.01).sum() > silhouette.sum() > 10  # thinly covered pixels exist and are left out


def test_wall_fraction_matches_the_rendered_background():
    for h, w in ((32, 32), (40, 24), (17, 9)):
        empty = render_clip(np.full((1, 24, 3), 50.0), "red", "blue", "orange", h, w)[0].astype(float)
        frac = wall_fraction(h)
        wall = np.array(COLOURS["orange"], float)
        floor = (wall * 0.7).astype(np.uint8).astype(float)
        expected = frac[:, None] * wall + (1 - frac[:, None]) * floor
        assert np.abs(empty - expected[:, None]).max() <= 0.5 + 1e-9  # the box filter rounds
        assert (frac == 1).sum() > h / 2 and (frac == 0).any() and ((frac > 0) & (frac < 1)).sum() <= 1


# --- on a tiny HuMoVe-mini ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    data = root / "humove-mini"
    generate_humove_mini(data, clips=8, num_frames=9, heldout_fraction=0.5, motion_only_clips=10, progress=False)
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["model.num_layers=1", "model.dim=32", "model.ffn_dim=64",
                                                       "sample.steps=2"])
    torch.manual_seed(0)
    ckpt = save_exported(EchoMotionDiT(cfg.model), cfg, root / "model.safetensors")
    yield data, ckpt, root


def _ground_truth(data: EvalData) -> Generated:
    """The ground truth as if generated: what a perfect model would output for every task."""
    return Generated(
        v2m_motion=[c.motion for c in data.clips],
        m2v_video=[c.latent for c in data.clips],
        t2vm_video=[c.latent for c in data.clips],
        t2vm_motion=[c.motion for c in data.clips],
        t2m_motion=[c.motion for c in data.clips],
    )


def test_oracle_scores_perfectly_and_beats_every_baseline(setup):
    """The ground truth fed in as the 'generated' outputs: errors ~0, colours and pairings right, silhouettes that fit,
    and every baseline clearly worse."""
    data_dir, _, _ = setup
    data = EvalData.load(data_dir, "heldout", text_len=16)
    assert len(data.clips) == 4
    # With the held-out clips among the action references, each true motion must find itself (FK of its parameters vs
    # its stored joints, canonicalized alike) and the caption's verb must name its category.
    with_heldout = dataclasses.replace(data, references=ActionReferences.load(data_dir, 9, ("train", "heldout")))
    metrics, checks, records = score(with_heldout, _ground_truth(data), seed=0)
    # render_clip(gt joints, caption colours) reproduces the stored pixel-codec video exactly.
    assert checks["render_vs_gt_video_error"] == 0.0
    assert checks["fk_vs_gt_joints_mpjpe"] < 1e-3  # FK of the stored SMPL parameters gives the stored joints
    assert metrics["v2m_mpjpe"] < 1e-3 and metrics["v2m_mpjpe_tokens"] < 1e-3
    assert metrics["m2v_error"] == 0.0
    assert metrics["t2vm_consistency"] < 0.05  # FK joints vs stored joints differ by float rounding only
    assert metrics["v2m_mpjpe_mean_pose"] > 20.0
    assert 0.0 < metrics["v2m_mpjpe_depth_unknown"] < metrics["v2m_mpjpe_mean_pose"]
    assert metrics["m2v_error_shuffled"] > 1.0 and metrics["t2vm_consistency_mismatched"] > 1.0
    assert metrics["v2m_2d_error"] < 1e-3
    assert metrics["v2m_2d_error_mean_pose"] > 0.5 and metrics["v2m_2d_error_other_video"] > 0.5
    for task in ("m2v", "t2vm"):
        assert metrics[f"{task}_silhouette_iou"] > 0.8
        assert metrics[f"{task}_silhouette_iou"] > metrics[f"{task}_silhouette_iou_" + (
            "shuffled" if task == "m2v" else "mismatched")] + 0.2
        assert metrics[f"{task}_pair_acc"] == 1.0  # every clip's silhouette differs from its partner's
    assert metrics["t2vm_background_acc"] == metrics["t2vm_shirt_acc"] == metrics["t2vm_trousers_acc"] == 1.0
    assert metrics["t2m_action_acc"] == 1.0 and checks["gt_action_acc"] == 1.0
    assert (metrics["chance_palette"], metrics["chance_pair"], metrics["chance_action"]) == (0.1, 0.5, 0.1)
    report = build_report(data, EvalSettings(steps=1), metrics, checks, records)
    assert all(report["better_than_baseline"].values())
    assert [r["clip_id"] for r in records] == [c.clip_id for c in data.clips]
    # With the real references (training motions only), the oracle scores the ceiling the checks report.
    metrics, checks, _ = score(data, _ground_truth(data), seed=0)
    assert metrics["t2m_action_acc"] == checks["gt_action_acc"]
    assert metrics["t2vm_silhouette_iou"] == checks["gt_silhouette_iou"]


def _encode(data: EvalData, videos: list[np.ndarray]) -> list[torch.Tensor]:
    return list(data.codec.encode(np.stack(videos)).unbind(0))


def test_perception_metrics_catch_wrong_colours_and_swapped_videos(setup):
    """Right motion, wrong shirt (or background) colour: that accuracy is 0, the others stay 1. Each m2v video swapped
    for its derangement partner's: the partner's silhouette fits better, so the pair accuracy is 0."""
    data_dir, _, _ = setup
    data = EvalData.load(data_dir, "heldout", text_len=16)
    clips, gt = data.clips, _ground_truth(data)
    unused = [next(n for n in COLOURS if n not in c.colours) for c in clips]
    for part, recolour in (("shirt", lambda c, x: (x, *c.colours[1:])),
                           ("background", lambda c, x: (*c.colours[:2], x))):
        videos = [render_clip(c.joints, *recolour(c, x), c.height, c.width) for c, x in zip(clips, unused)]
        metrics, _, _ = score(data, dataclasses.replace(gt, t2vm_video=_encode(data, videos)), seed=0)
        want = {p: 0.0 if p == part else 1.0 for p in ("background", "shirt", "trousers")}
        assert {p: metrics[f"t2vm_{p}_acc"] for p in want} == want
        assert metrics["t2vm_silhouette_iou"] > 0.8 and metrics["t2vm_pair_acc"] == 1.0  # the body is still right
    perm = derangement(len(clips), 0)
    swapped = dataclasses.replace(gt, m2v_video=[clips[int(j)].latent for j in perm])
    metrics, _, _ = score(data, swapped, seed=0)
    assert metrics["m2v_pair_acc"] == 0.0 and metrics["m2v_silhouette_iou"] < metrics["m2v_silhouette_iou_shuffled"]
    # v2m: each clip's motion replaced by its partner's is off by the brute-force distance between the two truths
    moved = dataclasses.replace(gt, v2m_motion=[clips[int(j)].motion for j in perm])
    metrics, _, _ = score(data, moved, seed=0)
    want = np.mean([_brute_2d(clips[int(j)].joints.numpy(), c.joints.numpy(), c.height) for c, j in zip(clips, perm)])
    assert metrics["v2m_2d_error"] == pytest.approx(want, rel=1e-4)


def test_colour_accuracies_on_a_rendered_clip(setup):
    data_dir, _, _ = setup
    c = EvalData.load(data_dir, "heldout", text_len=16).clips[0]
    shirt, trousers, background = c.colours
    labels = render_labels(c.joints, c.height, c.width)
    other = next(n for n in COLOURS if n not in c.colours)
    assert colour_accuracies(render_clip(c.joints, *c.colours), labels, c.colours) == {
        "background": 1.0, "shirt": 1.0, "trousers": 1.0}
    assert colour_accuracies(render_clip(c.joints, shirt, other, background), labels, c.colours) == {
        "background": 1.0, "shirt": 1.0, "trousers": 0.0}
    no_shirt = np.where(labels == 1, 0, labels)  # a motion whose label map has no shirt pixel
    assert colour_accuracies(render_clip(c.joints, *c.colours), no_shirt, c.colours)["shirt"] == 0.0


def test_label_map_agrees_with_render_clip_pixels(setup):
    """A pixel render_clip paints exactly in a slot's colour is fully covered by that slot (a blend of two colours of
    the palette is never exactly either), so the label map must name that slot there; exact wall or floor colour:
    background."""
    data_dir, _, _ = setup
    assert LABELS == ("background", "shirt", "trousers", "skin", "shoes")
    for split in ("heldout", "train"):
        for c in EvalData.load(data_dir, split, text_len=16).clips:
            shirt, trousers, background = c.colours
            video = render_clip(c.joints, *c.colours, c.height, c.width)
            labels = render_labels(c.joints, c.height, c.width)
            assert labels.shape == video.shape[:3] and labels.dtype == np.uint8
            wall = np.array(COLOURS[background])
            exact = {0: [wall, (wall * 0.7).astype(np.uint8)], 1: [COLOURS[shirt]], 2: [COLOURS[trousers]],
                     3: [synthetic._SKIN], 4: [synthetic._SHOES]}
            for label, colours in exact.items():
                where = np.any([np.all(video == rgb, -1) for rgb in colours], axis=0)
                assert (labels[where] == label).all(), (c.clip_id, label)
                assert where.any() or label > 2  # shirt, trousers and background always show whole pixels


def test_silhouette_contains_every_projected_torso_joint(setup):
    """Pelvis, hips, spine and neck lie inside limbs at least 0.2 m (2.5 px) thick: the pixel each projects to is
    body."""
    data_dir, _, _ = setup
    for c in EvalData.load(data_dir, "heldout", text_len=16).clips:
        labels = render_labels(c.joints, c.height, c.width)
        uv = np.rint(project_joints(c.joints, c.height, c.width)).astype(int)
        for f in range(labels.shape[0]):
            for j in (0, 1, 2, 3, 6, 9, 12):
                u, v = uv[f, j]
                if 0 <= u < c.width and 0 <= v < c.height:
                    assert labels[f, v, u] > 0, (c.clip_id, f, j)


def test_action_references_classify_training_motion_as_itself(setup):
    """The references are the train and motion_only samples; FK of a training clip's parameters finds that clip."""
    data_dir, _, _ = setup
    train = EvalData.load(data_dir, "train", text_len=16)
    refs = train.references
    assert len(refs.actions) == 4 + 10 and sum(i.startswith("hm-mo-") for i in refs.clip_ids) == 10
    assert all(refs.classify(fk_joints(train.layer, c.features)) == c.action for c in train.clips)
    with pytest.raises(EvaluationError, match="no 5-frame training motion"):
        ActionReferences.load(data_dir, 5)


def test_action_classifier_recognises_new_motions_of_each_action(setup):
    """Nearest neighbour among 4 random clips per action labels 2 new random clips per action far above chance (1/10):
    canonicalization removes the random facing, position and walking direction."""
    data_dir, _, _ = setup
    layer = EvalData.load(data_dir, "heldout", text_len=16).layer
    rng = np.random.default_rng(11)

    def motions(n: int) -> list[tuple[str, torch.Tensor]]:
        return [(a, make_motion(layer, sample_spec(rng, a), 9).joints) for a in ACTIONS for _ in range(n)]

    refs = motions(4)
    classifier = ActionReferences(np.stack([canonical_joints(j) for _, j in refs]), [a for a, _ in refs],
                                  [str(i) for i in range(len(refs))])
    queries = motions(2)
    assert np.mean([classifier.classify(j) == a for a, j in queries]) >= 0.7
    # the facing parameter of the generator is exactly what canonicalization removes
    spec = sample_spec(rng, "walk")
    turned = dataclasses.replace(spec, facing=spec.facing + 2.0)
    np.testing.assert_allclose(canonical_joints(make_motion(layer, turned, 9).joints),
                               canonical_joints(make_motion(layer, spec, 9).joints), atol=1e-4)


def test_report_contract(setup):
    """One table defines every value; a metric beats its baselines only when it beats each of them in its direction."""
    names = [d.name for d in METRIC_TABLE]
    assert len(set(names)) == len(names) and tuple(names) == METRICS
    for metric, bases in BASELINES.items():
        assert all(b in METRICS and HIGHER_IS_BETTER[b] == HIGHER_IS_BETTER[metric] for b in bases)
    assert set(CHANCE) <= set(METRICS) and TASK_ORDER == ("v2m", "m2v", "t2vm", "t2m")  # older tasks keep their seeds
    data_dir, _, _ = setup
    data = EvalData.load(data_dir, "heldout", text_len=16)
    metrics = {m: 1.0 for m in METRICS}
    metrics.update(v2m_2d_error=2.0, v2m_2d_error_mean_pose=3.0, v2m_2d_error_other_video=1.5,  # beats one of two
                   t2vm_shirt_acc=0.5, chance_palette=0.1, t2vm_trousers_acc=0.1, m2v_error=0.5, m2v_error_shuffled=0.5)
    report = build_report(data, EvalSettings(steps=1), metrics, {k: 0.0 for k in CHECKS}, [])
    better = report["better_than_baseline"]
    assert better["v2m_2d_error"] is False and better["t2vm_shirt_acc"] is True
    assert better["t2vm_trousers_acc"] is False and better["m2v_error"] is False  # ties do not beat
    assert report["baselines"]["v2m_2d_error"] == ["v2m_2d_error_mean_pose", "v2m_2d_error_other_video"]
    assert report["baselines"]["t2vm_background_acc"] == ["chance_palette"]
    assert report["baselines"]["v2m_mpjpe"] == ["v2m_mpjpe_mean_pose"]
    assert set(report["higher_is_better"]) == set(METRICS) and set(report["units"]) >= set(METRICS) | set(CHECKS)
    assert report["higher_is_better"]["t2vm_silhouette_iou"] and not report["higher_is_better"]["v2m_2d_error"]
    assert "lower_is_better" not in report
    metrics["v2m_2d_error_other_video"] = 2.5
    assert build_report(data, EvalSettings(steps=1), metrics, {}, [])["better_than_baseline"]["v2m_2d_error"] is True


def test_mean_pose_is_the_training_clips_mean_root_relative_pose(setup):
    """The baseline, brute force: every training frame's root-relative joints averaged, against what motion_stats gives."""
    data_dir, _, _ = setup
    train = EvalData.load(data_dir, "train", text_len=16)
    frames = torch.cat([c.joints - c.joints[:, :1] for c in train.clips])  # [frames, 24, 3]
    got = mean_pose_joints(train.stats)
    torch.testing.assert_close(got - got[:, :1], frames.mean(0, keepdim=True), atol=1e-5, rtol=0)
    # absolute too (the 2-D baseline projects it): the mean joint positions, mean root translation included
    absolute = torch.cat([c.joints for c in train.clips]).mean(0, keepdim=True)
    torch.testing.assert_close(got, absolute, atol=1e-5, rtol=0)


def test_cli_end_to_end_on_a_tiny_random_model(setup, capsys):
    data_dir, ckpt, root = setup
    out = root / "report.json"
    cli = load_tool("evaluate")
    cli.main(["--checkpoint", str(ckpt), "--data", str(data_dir), "--out", str(out), "--max-clips", "3",
              "--batch-size", "2", "--seed", "5", "--no-progress"])
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert set(report["metrics"]) == set(METRICS) and set(report["checks"]) == set(CHECKS)
    assert all(math.isfinite(v) for v in (*report["metrics"].values(), *report["checks"].values()))
    assert set(report["better_than_baseline"]) == set(BASELINES)
    assert all(isinstance(v, bool) for v in report["better_than_baseline"].values())
    assert report["baselines"] == {m: list(b) for m, b in BASELINES.items()}
    assert set(report["higher_is_better"]) == set(METRICS) and "lower_is_better" not in report
    assert all(0.0 <= report["metrics"][m] <= 1.0 for m in METRICS if m.endswith(("_acc", "_iou", "_mismatched",
                                                                                  "_shuffled")) and "error" not in m
               and "consistency" not in m)
    assert set(report["units"]) >= set(METRICS) | set(CHECKS)
    assert report["counts"] == {"clips": 3, "frames": 27, "batches": 2, "action_references": 14}
    assert report["settings"]["steps"] == 2 and report["settings"]["seed"] == 5  # steps from the exported config
    assert report["checkpoint"] == str(ckpt) and report["data"] == str(data_dir) and report["split"] == "heldout"
    assert len(report["per_clip"]) == 3
    assert report["checks"]["render_vs_gt_video_error"] == 0.0
    assert "v2m_mpjpe_mean_pose" in printed and str(out) in printed
    row = next(line for line in printed.splitlines() if line.startswith("v2m_2d_error "))
    assert "lower" in row and "v2m_2d_error_mean_pose" in row and "v2m_2d_error_other_video" in row
    assert re.search(r"^t2vm_shirt_acc +[0-9.]+ +higher +chance_palette 0\.100 +(yes|NO)$", printed, re.M)

    # Deterministic for a seed: the library call with the same settings reproduces the CLI's numbers.
    model, cfg = load_exported(ckpt)
    settings = EvalSettings.from_config(cfg.sample, seed=5, batch_size=2, max_clips=3)
    again = evaluate(model, cfg, data_dir, settings, checkpoint=str(ckpt))
    assert again["metrics"] == report["metrics"]

    with pytest.raises(EvaluationError, match="holds no shards"):
        evaluate(model, cfg, data_dir, settings, split="nope")


@pytest.mark.parametrize("args, message", [
    (["--max-clips", "1"], "max_clips must be >= 2"),
    (["--split", "motion_only"], "has no video; evaluate a paired split"),
    (["--split", "nope"], "nope holds no shards"),
    (["--steps", "0"], "steps must be >= 1, got 0"),
    (["--batch-size", "0"], "batch_size must be >= 1, got 0"),
    (["--checkpoint", "missing.safetensors"], "missing.safetensors does not exist; create it with tools/export_checkpoint.py"),
    (["--checkpoint", "model.yaml"], "model.yaml is not a safetensors file .*; pass the .safetensors an export writes"),
    (["--checkpoint", "."], "is a folder, not an exported .safetensors file; .* export it first"),
])
def test_cli_user_errors_are_one_line_and_exit_2(setup, capsys, args, message):
    """A bad flag, split or checkpoint is the user's to fix: `evaluate: <message>` and exit 2, not a traceback."""
    data_dir, ckpt, root = setup
    given = dict(zip(args[::2], args[1::2]))
    if "--checkpoint" in given:
        given["--checkpoint"] = str(root / given["--checkpoint"])  # model.yaml: the export's config copy, not weights
    flags = {"--checkpoint": str(ckpt), "--data": str(data_dir), "--out": str(root / "bad.json"), **given}
    with pytest.raises(SystemExit) as exited:
        load_tool("evaluate").main([*(w for kv in flags.items() for w in kv), "--no-progress"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1
    assert re.fullmatch(rf"evaluate: .*{message}.*\n", err), err
    assert not (root / "bad.json").exists()


# --- tools/probe_conditioning.py ---------------------------------------------------------------------------------------


class _LookupOracle(nn.Module):
    """Knows every clip's clean motion by its video latent and answers V2M with the exact velocity (x_sigma - x0) / sigma:
    the posterior mean is then that clip's motion. With the video hidden it answers the dataset's mean (0 normalized)."""

    def __init__(self, clips):
        super().__init__()
        self.clips = clips

    def forward(self, video, video_timestep, video_mask, motion, motion_timestep, text, task):
        assert bool((video_timestep == 0).all()) and bool((task == int(Task.V2M)).all())
        sigma = motion_timestep[:, None, None] / 1000.0
        x0 = torch.stack([
            next(c.motion for c in self.clips if torch.equal(c.latent, v)) if shown else torch.zeros_like(motion[0])
            for v, shown in zip(video, video_mask)
        ])
        return Prediction(None, (motion - x0) / sigma)


def test_probe_reads_the_posterior_mean_of_each_condition(setup, capsys):
    """Against a lookup oracle: own video -> that clip's motion (MPJPE ~0); another clip's video -> that clip's motion
    (MPJPE = brute-force MPJPE between the two clips); hidden -> the mean pose. Flow MSE against the true velocity is ~0
    with the own video only."""
    data_dir, ckpt, _ = setup
    tool = load_tool("probe_conditioning")
    data = EvalData.load(data_dir, "heldout", text_len=16)
    clips = data.clips
    report = tool.probe(_LookupOracle(clips), data, sigmas=[0.5, 1.0], seed=3, batch_size=3)
    other = derangement(len(clips), 3)
    swapped = np.mean([
        _brute_mpjpe(fk_joints(data.layer, clips[int(other[i])].features).numpy(), c.joints.numpy())
        for i, c in enumerate(clips)
    ])
    posed_mean = fk_joints(data.layer, data.stats.mean[None]).numpy()
    mean_features = np.mean([_brute_mpjpe(posed_mean, c.joints.numpy()) for c in clips])
    for sigma in ("0.5", "1"):
        assert report["probe"][f"own@{sigma}"]["mpjpe"] < 1e-3
        assert report["probe"][f"own@{sigma}"]["flow_mse"] < 1e-9
        assert report["probe"][f"other@{sigma}"]["mpjpe"] == pytest.approx(swapped, rel=1e-4)
        assert report["probe"][f"other@{sigma}"]["flow_mse"] > 1e-3
        # hidden: the oracle answers 0 in normalized space, i.e. the mean features posed by FK, which averages the
        # clips' facings into one: a weaker guess than the mean joint positions the baseline uses
        assert report["probe"][f"hidden@{sigma}"]["mpjpe"] == pytest.approx(mean_features, rel=1e-4)
        assert report["mean_pose_mpjpe"] < mean_features
    with pytest.raises(ValueError, match=r"must lie in \(0, 1\]"):
        tool.probe(_LookupOracle(clips), data, sigmas=[0.0])

    # The CLI on a real (random) model: the table and the JSON.
    out = data_dir.parent / "probe.json"
    tool.main(["--checkpoint", str(ckpt), "--data", str(data_dir), "--out", str(out), "--max-clips", "3"])
    written = json.loads(out.read_text())
    assert set(written["probe"]) == {f"{c}@{s}" for c in ("own", "other", "hidden") for s in ("0.5", "1")}
    assert written["clips"] == 3 and "own@1" in capsys.readouterr().out
