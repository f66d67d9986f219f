"""Skeleton videos of SMPL joints, for eyeballing generated motion next to generated video.

Orthographic and drawn with PIL so it runs anywhere (no OpenGL, no OpenCV) and is deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from .smpl import JOINT_NAMES, SMPL_PARENTS

__all__ = ["VIEWS", "render_skeleton", "side_by_side"]

# (image-right axis, image-up axis) in SMPL world coordinates (y up, body facing +z, left = +x).
VIEWS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "front": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),  # camera in front of the body: its left on image right
    "side": ((0.0, 0.0, -1.0), (0.0, 1.0, 0.0)),  # camera at the body's left (+x)
    "top": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),  # camera above: the body's front points down the image
}
_LEFT, _RIGHT, _CENTER = (230, 90, 60), (60, 130, 230), (235, 235, 235)
_FILL = 0.9  # auto-fit leaves a 5 % margin on each side


def _side_colors(num_joints: int) -> list[tuple[int, int, int]]:
    """Left joints warm, right joints cool, so left/right swaps are visible at a glance."""
    if num_joints != len(JOINT_NAMES):
        return [_CENTER] * num_joints
    return [_LEFT if n.startswith("left_") else _RIGHT if n.startswith("right_") else _CENTER for n in JOINT_NAMES]


def _background(background, num_frames: int, height: int, width: int) -> np.ndarray:
    if background is None:
        return np.zeros((num_frames, height, width, 3), np.uint8)
    if isinstance(background, np.ndarray) and background.ndim >= 3:
        want = (num_frames, height, width, 3)
        if background.dtype != np.uint8 or background.shape[-3:] != want[1:] or background.ndim > 4 or (
            background.ndim == 4 and background.shape[0] != num_frames
        ):
            raise ValueError(
                f"background frames must be uint8 {list(want)} or {list(want[1:])}, "
                f"got {background.dtype} {list(background.shape)}"
            )
        return np.broadcast_to(background, want).copy()
    rgb = np.asarray(background, dtype=np.int64)
    if rgb.shape != (3,) or rgb.min() < 0 or rgb.max() > 255:
        raise ValueError(f"background must be None, an (r, g, b) tuple in 0..255 or uint8 frames, got {background!r}")
    return np.broadcast_to(rgb.astype(np.uint8), (num_frames, height, width, 3)).copy()


def render_skeleton(
    joints: torch.Tensor | np.ndarray,
    height: int,
    width: int,
    *,
    background: tuple[int, int, int] | np.ndarray | None = None,
    color: tuple[int, int, int] | None = None,
    view: str = "front",
    scale: float | None = None,
    center: Sequence[float] | None = None,
    parents: Sequence[int] = SMPL_PARENTS,
    line_width: int | None = None,
    joint_radius: int | None = None,
) -> np.ndarray:
    """Draw joints [F,J,3] as bones and dots, returning uint8 frames [F,H,W,3].

    background: None (black), an (r, g, b) colour, or uint8 frames [F,H,W,3] / [H,W,3] to draw over.
    color: one colour for everything; None colours SMPL's left side warm and right side cool.
    scale (pixels per metre) and center (a 3-D world point mapped to the image centre) default to a
    fit of the whole clip, so the camera stays still while the body moves. Non-finite joints are skipped.
    """
    j = joints.detach().cpu().double().numpy() if torch.is_tensor(joints) else np.asarray(joints, np.float64)
    if j.ndim != 3 or j.shape[-1] != 3 or j.shape[1] != len(parents):
        raise ValueError(f"joints must be [F,{len(parents)},3] (one row per entry of parents), got {j.shape}")
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; choose one of {sorted(VIEWS)}")
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be positive, got {height}x{width}")
    axes = np.array(VIEWS[view], dtype=np.float64)  # [2,3]: right, up
    ab = j @ axes.T  # [F,J,2]
    finite = np.isfinite(ab).all(-1)

    if center is None:
        pts = ab[finite]
        c2 = (pts.min(0) + pts.max(0)) / 2 if len(pts) else np.zeros(2)
    else:
        c = np.asarray(center, dtype=np.float64)
        if c.shape != (3,):
            raise ValueError(f"center must be a 3-D world point, got {center!r}")
        c2 = axes @ c
    if scale is None:
        pts = ab[finite]
        half = np.abs(pts - c2).max(0) if len(pts) else np.zeros(2)
        need = max(2 * half[0] / width, 2 * half[1] / height)
        scale = _FILL / need if need > 0 else 1.0
    u = (width - 1) / 2 + scale * (ab[..., 0] - c2[0])
    v = (height - 1) / 2 - scale * (ab[..., 1] - c2[1])

    lw = line_width if line_width is not None else max(1, round(min(height, width) / 100))
    r = joint_radius if joint_radius is not None else lw
    colors = [tuple(color)] * len(parents) if color is not None else _side_colors(len(parents))
    frames = _background(background, j.shape[0], height, width)
    for f in range(j.shape[0]):
        img = Image.fromarray(frames[f])
        draw = ImageDraw.Draw(img)
        for child, parent in enumerate(parents):
            if parent >= 0 and finite[f, child] and finite[f, parent]:
                draw.line([(u[f, parent], v[f, parent]), (u[f, child], v[f, child])], fill=colors[child], width=lw)
        for k in np.flatnonzero(finite[f]):
            draw.ellipse([u[f, k] - r, v[f, k] - r, u[f, k] + r, v[f, k] + r], fill=colors[k])
        frames[f] = np.asarray(img)
    return frames


def side_by_side(frames_a: np.ndarray, frames_b: np.ndarray) -> np.ndarray:
    """Concatenate two uint8 videos [F,H,W,3] horizontally, resizing b to a's height (aspect kept)."""
    for name, x in (("frames_a", frames_a), ("frames_b", frames_b)):
        if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"{name} must be a uint8 ndarray [F,H,W,3], got {getattr(x, 'dtype', type(x))} "
                             f"{getattr(x, 'shape', '')}")
    if frames_a.shape[0] != frames_b.shape[0]:
        raise ValueError(f"frame counts differ: {frames_a.shape[0]} vs {frames_b.shape[0]}; trim one video first")
    h = frames_a.shape[1]
    if frames_b.shape[1] != h:
        w = max(1, round(frames_b.shape[2] * h / frames_b.shape[1]))
        frames_b = np.stack([np.asarray(Image.fromarray(f).resize((w, h), Image.BILINEAR)) for f in frames_b])
    return np.concatenate([frames_a, frames_b], axis=2)
