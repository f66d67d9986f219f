"""HuMoVe-mini: a procedural stand-in for HuMoVe, small enough to generate and train on a CPU.

Each clip is one of ten actions, written as joint-rotation curves over time with random speed, amplitude, facing
direction, phase and body shape (betas), turned into joints by SMPL forward kinematics, and rendered as a thick-limb
figure whose shirt, trouser and background colours are named by the caption. The renderer is a pure function of the
joints and the named colours, and the camera is fixed, so the joint distribution of (caption, motion, video) is exactly
learnable: the same motion with the same caption always gives the same pixels. For evaluation, `render_labels` gives
the same drawing as a label map (which colour slot covers each pixel), `project_joints` the camera and `wall_fraction`
where the wall and floor are.

`generate_humove_mini` writes the MDS shards (train / heldout / motion_only), motion statistics, the empty-prompt
embedding, dataset.json and optionally raw clips (lossless mp4 + SMPL .npz + JSONL manifest) for
tools/prepare_humove.py. Clip i depends only on (seed, i), so the first clips of a 16-clip and a 200-clip set agree.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from echomotion.data.encoders import (
    PCA_CODEC_FILE,
    PCACodec,
    TextEncoder,
    VideoCodec,
    build_text_encoder,
    build_video_codec,
)
from echomotion.data.schema import COLUMNS, SCHEMA_VERSION, Sample, encode_sample
from echomotion.data.shards import SHARD_BYTES, SHARD_HASHES
from echomotion.motion import (
    NUM_BETAS,
    NUM_JOINTS,
    MotionStats,
    SMPLLayer,
    SMPLMotion,
    axis_angle_to_matrix,
    matrix_to_axis_angle,
    write_synthetic_smpl_model,
)

__all__ = [
    "ACTIONS",
    "COLOURS",
    "ClipSpec",
    "sample_spec",
    "pose_curves",
    "make_motion",
    "LABELS",
    "render_clip",
    "render_labels",
    "project_joints",
    "wall_fraction",
    "generate_humove_mini",
    "SOURCE",
]

SOURCE = "humove-mini"
FPS = 16.0
NUM_FRAMES = 17  # 1 + 4k, the Wan causal VAE's frame-count form
HEIGHT = WIDTH = 32

ACTIONS: dict[str, str] = {  # action -> the verb its caption uses
    "walk": "walks", "run": "runs", "jump": "jumps", "wave": "waves", "squat": "squats",
    "kick": "kicks", "punch": "punches", "spin": "spins", "clap": "claps", "bow": "bows",
}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (205, 40, 40), "green": (40, 160, 70), "blue": (45, 75, 210), "yellow": (235, 205, 40),
    "white": (240, 240, 240), "black": (25, 25, 25), "orange": (240, 135, 30), "purple": (135, 55, 175),
    "grey": (128, 128, 128), "pink": (245, 140, 190),
}
_SKIN, _SHOES = (225, 180, 140), (60, 45, 35)

# Fixed orthographic camera looking at the body's front from +z: the image spans 2.6 m vertically around y = 1.05 m,
# so a 1.7 m person is ~21 px tall at 32 px; the width follows at the same pixels per metre.
_VIEW_HEIGHT_M, _VIEW_CENTER_Y = 2.6, 1.05
_SUPERSAMPLE = 4  # draw at 4x and box-filter down: smooth edges at 32 px
# (joint a, joint b, width in metres, colour slot): the thick-limb body, drawn back to front.
_LIMBS: tuple[tuple[int, int, float, str], ...] = (
    (0, 3, 0.30, "shirt"), (3, 6, 0.30, "shirt"), (6, 9, 0.30, "shirt"), (9, 12, 0.24, "shirt"),
    (16, 17, 0.14, "shirt"), (16, 18, 0.11, "shirt"), (17, 19, 0.11, "shirt"),
    (18, 20, 0.09, "skin"), (19, 21, 0.09, "skin"), (12, 15, 0.08, "skin"),
    (1, 2, 0.20, "trousers"), (1, 4, 0.15, "trousers"), (2, 5, 0.15, "trousers"),
    (4, 7, 0.12, "trousers"), (5, 8, 0.12, "trousers"), (7, 10, 0.09, "shoes"), (8, 11, 0.09, "shoes"),
)
_HEAD_RADIUS_M = 0.12
_FEET = [7, 8, 10, 11]  # ankles and feet: the lowest of them touches the ground


@dataclass(frozen=True)
class ClipSpec:
    """Everything that defines one clip; motion and pixels are deterministic functions of it."""

    action: str
    speed: float  # tempo multiplier, 0.7..1.3
    amplitude: float  # motion size multiplier, 0.7..1.3
    facing: float  # yaw of the body (radians, 0 = facing the camera)
    phase: float  # where in its cycle the action starts, 0..1
    direction: int  # +1 / -1: turning direction of a spin
    betas: tuple[float, ...]
    shirt: str
    trousers: str
    background: str

    @property
    def adverb(self) -> str:
        return "slowly" if self.speed < 0.85 else "quickly" if self.speed > 1.15 else ""

    def motion_caption(self) -> str:
        """HumanML3D-style caption (motion only), used for the motion-only stream."""
        return " ".join(w for w in ("a person", ACTIONS[self.action], self.adverb) if w)

    def caption(self) -> str:
        verb = " ".join(w for w in (ACTIONS[self.action], self.adverb) if w)
        return (f"a person in {_article(self.shirt)} {self.shirt} shirt and {self.trousers} trousers {verb} "
                f"on {_article(self.background)} {self.background} background")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def sample_spec(rng: np.random.Generator, action: str) -> ClipSpec:
    """Draw one clip's tempo, size, facing, shape and three distinct colours for the given action."""
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}; HuMoVe-mini actions are {list(ACTIONS)}")
    names = list(COLOURS)
    shirt, trousers, background = (names[i] for i in rng.choice(len(names), size=3, replace=False))
    return ClipSpec(
        action=action,
        speed=float(rng.uniform(0.7, 1.3)),
        amplitude=float(rng.uniform(0.7, 1.3)),
        facing=float(rng.uniform(-np.pi, np.pi)),
        phase=float(rng.uniform(0.0, 1.0)),
        direction=int(rng.choice([-1, 1])),
        betas=tuple(float(b) for b in np.clip(rng.normal(size=NUM_BETAS), -2.5, 2.5)),
        shirt=shirt,
        trousers=trousers,
        background=background,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Motion: per-joint Euler angles (rx, ry, rz) over time, composed as R = Ry @ Rx @ Rz in the parent's rest frame.
# SMPL rest frames are world-aligned (y up, body facing +z, left = +x): +rx tilts a bone pointing up toward the front
# (spine bends forward) and one pointing down toward the back (knee flexion); hip flexion is -rx.

_L_HIP, _R_HIP, _SPINE1, _L_KNEE, _R_KNEE, _SPINE2, _L_ANKLE, _R_ANKLE, _SPINE3 = 1, 2, 3, 4, 5, 6, 7, 8, 9
_NECK, _L_SHOULDER, _R_SHOULDER, _L_ELBOW, _R_ELBOW = 12, 16, 17, 18, 19
_ARMS_DOWN = 1.3  # |rz| of the shoulders that lowers the T-pose arms to the sides


def _bump(p: np.ndarray) -> np.ndarray:
    return np.sin(np.pi * p) ** 2


def _walk_like(e: np.ndarray, t: np.ndarray, s: ClipSpec, cadence: float, hip: float, knee: tuple[float, float],
               arm: float, elbow: float, lean: float) -> None:
    a = s.amplitude
    th = 2 * np.pi * (cadence * s.speed * t + s.phase)
    e[:, _L_HIP, 0], e[:, _R_HIP, 0] = -hip * a * np.sin(th), hip * a * np.sin(th)
    e[:, _L_KNEE, 0] = a * (knee[0] + knee[1] * np.maximum(0, np.cos(th)))
    e[:, _R_KNEE, 0] = a * (knee[0] + knee[1] * np.maximum(0, -np.cos(th)))
    e[:, _L_SHOULDER, 0], e[:, _R_SHOULDER, 0] = arm * a * np.sin(th), -arm * a * np.sin(th)
    e[:, _L_ELBOW, 1], e[:, _R_ELBOW, 1] = -elbow, elbow
    e[:, _SPINE1, 0] = lean


def _walk(e, t, s):
    _walk_like(e, t, s, cadence=0.9, hip=0.45, knee=(0.1, 0.7), arm=0.35, elbow=0.3, lean=0.0)
    return 0.7 * s.speed * (0.6 + 0.4 * s.amplitude), np.zeros_like(t)


def _run(e, t, s):
    _walk_like(e, t, s, cadence=1.4, hip=0.75, knee=(0.3, 1.3), arm=0.6, elbow=1.5, lean=0.15)
    return 1.1 * s.speed * (0.6 + 0.4 * s.amplitude), np.zeros_like(t)


def _jump(e, t, s):
    a, p = s.amplitude, (s.speed * t + s.phase) % 1.0
    crouch = np.where(p < 0.4, np.sin(np.pi * p / 0.4) ** 2, 0.0)
    flight = np.where(p >= 0.4, np.sin(np.pi * (p - 0.4) / 0.6), 0.0)
    for hip, knee, ankle in ((_L_HIP, _L_KNEE, _L_ANKLE), (_R_HIP, _R_KNEE, _R_ANKLE)):
        e[:, hip, 0] = -a * (1.0 * crouch + 0.4 * flight)
        e[:, knee, 0] = a * (1.6 * crouch + 0.6 * flight)
        e[:, ankle, 0] = -0.6 * a * crouch
    e[:, _SPINE1, 0] = 0.4 * a * crouch
    e[:, _L_SHOULDER, 0] = e[:, _R_SHOULDER, 0] = 0.6 * crouch - 2.2 * a * flight  # back, then forward and up
    return 0.0, 0.3 * a * flight


def _wave(e, t, s):
    th = 2 * np.pi * (2.0 * s.speed * t + s.phase)
    e[:, _R_SHOULDER, 2] = -0.5  # right arm raised out to the side
    e[:, _R_ELBOW, 2] = -(1.3 + 0.5 * s.amplitude * np.sin(th))  # forearm up, swaying
    return 0.0, np.zeros_like(t)


def _squat(e, t, s):
    a, b = s.amplitude, _bump((0.7 * s.speed * t + s.phase) % 1.0)
    for hip, knee, ankle in ((_L_HIP, _L_KNEE, _L_ANKLE), (_R_HIP, _R_KNEE, _R_ANKLE)):
        e[:, hip, 0], e[:, knee, 0], e[:, ankle, 0] = -1.5 * a * b, 2.1 * a * b, -0.6 * a * b
    e[:, _SPINE1, 0] = 0.5 * a * b
    e[:, _L_SHOULDER, 0] = e[:, _R_SHOULDER, 0] = -1.3 * b  # arms forward for balance
    return 0.0, np.zeros_like(t)


def _kick(e, t, s):
    a, p = s.amplitude, (0.9 * s.speed * t + s.phase) % 1.0
    e[:, _R_HIP, 0] = -1.4 * a * _bump(p)
    e[:, _R_KNEE, 0] = 1.3 * np.sin(2 * np.pi * p) ** 2  # chamber, extend, re-chamber
    e[:, _SPINE1, 0] = -0.2 * a * _bump(p)
    e[:, _L_SHOULDER, 0] = e[:, _R_SHOULDER, 0] = -0.6
    e[:, _L_ELBOW, 1], e[:, _R_ELBOW, 1] = -1.2, 1.2
    return 0.0, np.zeros_like(t)


def _punch(e, t, s):
    a, p = s.amplitude, (1.6 * s.speed * t + s.phase) % 1.0
    ext_l, ext_r = np.maximum(0, np.sin(2 * np.pi * p)) ** 2, np.maximum(0, -np.sin(2 * np.pi * p)) ** 2
    for sh, el, sign, ext in ((_L_SHOULDER, _L_ELBOW, -1, ext_l), (_R_SHOULDER, _R_ELBOW, 1, ext_r)):
        e[:, sh, 0] = -1.1 - 0.4 * a * ext
        e[:, el, 1] = sign * (0.1 + 1.8 * (1 - a * ext).clip(0, 1))  # guard: forearm up; punch: straight
    e[:, _SPINE3, 1] = 0.25 * a * (ext_l - ext_r)
    return 0.0, np.zeros_like(t)


def _spin(e, t, s):
    e[:, 0, 1] = s.direction * 2 * np.pi * 0.7 * s.speed * s.amplitude * t
    e[:, _L_SHOULDER, 2], e[:, _R_SHOULDER, 2] = -0.5, 0.5  # arms half raised
    return 0.0, np.zeros_like(t)


def _clap(e, t, s):
    a, th = s.amplitude, 2 * np.pi * (2.0 * s.speed * t + s.phase)
    spread = 0.5 * a * 0.5 * (1 + np.cos(th))  # 0 when the hands meet
    e[:, _L_SHOULDER, 0] = e[:, _R_SHOULDER, 0] = -1.35
    e[:, _L_SHOULDER, 1], e[:, _R_SHOULDER, 1] = -0.35 + spread, 0.35 - spread
    e[:, _L_ELBOW, 1], e[:, _R_ELBOW, 1] = -0.3, 0.3
    return 0.0, np.zeros_like(t)


def _bow(e, t, s):
    a, b = s.amplitude, _bump((0.7 * s.speed * t + s.phase) % 1.0)
    e[:, 0, 0] = 0.4 * a * b  # pelvis tips forward, hips straighten the legs back
    e[:, _L_HIP, 0] = e[:, _R_HIP, 0] = -0.4 * a * b
    e[:, _SPINE1, 0], e[:, _SPINE2, 0], e[:, _SPINE3, 0], e[:, _NECK, 0] = (
        0.35 * a * b, 0.3 * a * b, 0.25 * a * b, 0.15 * b)
    return 0.0, np.zeros_like(t)


_ACTION_FNS: dict[str, Callable[[np.ndarray, np.ndarray, ClipSpec], tuple[float, np.ndarray]]] = {
    "walk": _walk, "run": _run, "jump": _jump, "wave": _wave, "squat": _squat,
    "kick": _kick, "punch": _punch, "spin": _spin, "clap": _clap, "bow": _bow,
}


def _euler_to_matrix(e: torch.Tensor) -> torch.Tensor:
    """[..., 3] (rx, ry, rz) -> Ry @ Rx @ Rz."""
    def rot(axis: int, ang: torch.Tensor) -> torch.Tensor:
        aa = torch.zeros(*ang.shape, 3, dtype=ang.dtype)
        aa[..., axis] = ang
        return axis_angle_to_matrix(aa)

    return rot(1, e[..., 1]) @ rot(0, e[..., 0]) @ rot(2, e[..., 2])


def pose_curves(spec: ClipSpec, num_frames: int = NUM_FRAMES, fps: float = FPS
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SMPL parameters before grounding: global_orient [F,3], body_pose [F,23,3] (axis-angle) and transl [F,3] whose
    x/z follow the walking path (centred on the origin) and whose y is the height above ground (jumps)."""
    t = np.arange(num_frames) / fps
    e = np.zeros((num_frames, NUM_JOINTS, 3))
    e[:, _L_SHOULDER, 2], e[:, _R_SHOULDER, 2] = -_ARMS_DOWN, _ARMS_DOWN
    e[:, _L_ELBOW, 1], e[:, _R_ELBOW, 1] = -0.2, 0.2
    speed, lift = _ACTION_FNS[spec.action](e, t, spec)
    e[:, 0, 1] += spec.facing
    rot = _euler_to_matrix(torch.from_numpy(e))
    aa = matrix_to_axis_angle(rot).float()
    heading = np.array([np.sin(spec.facing), 0.0, np.cos(spec.facing)])
    transl = heading[None] * (speed * (t - t[-1] / 2))[:, None]  # path centred on the origin
    transl[:, 1] = lift
    return aa[:, 0], aa[:, 1:], torch.from_numpy(transl).float()


def make_motion(layer: SMPLLayer, spec: ClipSpec, num_frames: int = NUM_FRAMES, fps: float = FPS) -> SMPLMotion:
    """Pose curves -> forward kinematics -> translate vertically so the lowest foot joint touches the ground (plus
    the jump height); joints include that translation, exactly as smplx adds transl."""
    global_orient, body_pose, transl = pose_curves(spec, num_frames, fps)
    betas = torch.tensor(spec.betas, dtype=torch.float32).expand(num_frames, -1)
    joints = layer.joints(betas, global_orient, body_pose, torch.zeros_like(transl))
    ground = -joints[:, _FEET, 1].amin(1)
    transl = transl + torch.stack([torch.zeros_like(ground), ground, torch.zeros_like(ground)], 1)
    return SMPLMotion(betas.clone(), global_orient, body_pose, transl, joints + transl[:, None], fps=fps)


# ---------------------------------------------------------------------------------------------------------------------
# Rendering: one camera (`project_joints`) and one drawing routine (`_draw_frames`), shared by video and label map.

LABELS: tuple[str, ...] = ("background", "shirt", "trousers", "skin", "shoes")  # render_labels' values, by index


def _as_joints(joints: torch.Tensor | np.ndarray) -> np.ndarray:
    """Joints as float64 numpy [F, 24, 3], or a ValueError that says what shape was given."""
    j = joints.detach().cpu().double().numpy() if torch.is_tensor(joints) else np.asarray(joints, np.float64)
    if j.ndim != 3 or j.shape[1:] != (NUM_JOINTS, 3):
        raise ValueError(f"joints must be [F,{NUM_JOINTS},3], got {list(j.shape)}")
    return j


def project_joints(joints: torch.Tensor | np.ndarray, height: int = HEIGHT, width: int = WIDTH,
                   supersample: int = 1) -> np.ndarray:
    """The fixed orthographic camera: points [..., 3] (metres, y up, camera on +z) -> pixel coordinates [..., 2] (u =
    column, v = row) in an image of height*supersample x width*supersample pixels, integer values at pixel centres.

    render_clip draws with supersample = _SUPERSAMPLE and box-filters down, which maps these coordinates to exactly
    `project_joints(..., supersample=1)`: (u_ss - (ss - 1) / 2) / ss. Depth (z) does not move a point on the image.
    PIL rasterizes at whole pixels of the 4x image, so a painted shape can sit up to ~1/4 output pixel off this.
    """
    j = joints.detach().cpu().double().numpy() if torch.is_tensor(joints) else np.asarray(joints, np.float64)
    ss = supersample
    scale = height * ss / _VIEW_HEIGHT_M  # pixels per metre at the drawing resolution
    u = (width * ss - 1) / 2 + scale * j[..., 0]
    v = (height * ss - 1) / 2 - scale * (j[..., 1] - _VIEW_CENTER_Y)
    return np.stack([u, v], axis=-1)


def _ground_row(height: int, ss: int) -> int:
    """First row of the floor at the drawing resolution: where the ground (y = 0) projects, rounded."""
    scale = height * ss / _VIEW_HEIGHT_M
    return int(round((height * ss - 1) / 2 + scale * _VIEW_CENTER_Y))


def wall_fraction(height: int = HEIGHT) -> np.ndarray:
    """Per output row [H], the fraction of it that is wall (1 above the ground line, 0 on the floor, in between on the
    one row the line crosses after box filtering): where a reader of the video expects wall and floor colour."""
    ss = _SUPERSAMPLE
    return np.clip((_ground_row(height, ss) - np.arange(height) * ss) / ss, 0.0, 1.0)


def _background(colour: str, height: int, width: int, ss: int) -> Image.Image:
    """Plain wall in the named colour above a darker floor that starts at the ground line (y = 0)."""
    rgb = np.array(COLOURS[colour])
    img = np.empty((height * ss, width * ss, 3), np.uint8)
    img[:] = rgb
    img[_ground_row(height, ss):] = (rgb * 0.7).astype(np.uint8)
    return Image.fromarray(img)


def _draw_frames(j: np.ndarray, height: int, width: int, fills: dict[str, Any], base: Image.Image
                 ) -> Iterator[Image.Image]:
    """Each frame of joints [F,24,3] drawn over a copy of `base` at _SUPERSAMPLE x the output size: the thick limbs with
    fills[slot] (a colour of base's mode: RGB for the video, a label index for the label map) and the head with
    fills["skin"], painted back to front by depth (camera on +z). The video and its label map share this one routine,
    so a label is exactly what the video paints there."""
    ss = _SUPERSAMPLE
    scale = height * ss / _VIEW_HEIGHT_M  # pixels per metre at the drawing resolution
    uv = project_joints(j, height, width, ss)
    u, v = uv[..., 0], uv[..., 1]
    head = j[:, 15] + 0.5 * (j[:, 15] - j[:, 12])  # head centre a little beyond the head joint
    huv = project_joints(head, height, width, ss)
    hu, hv = huv[..., 0], huv[..., 1]
    a_idx, b_idx = [l[0] for l in _LIMBS], [l[1] for l in _LIMBS]
    depth = np.concatenate([(j[:, a_idx, 2] + j[:, b_idx, 2]) / 2, head[:, None, 2]], axis=1)  # [F, limbs + head]
    head_r = _HEAD_RADIUS_M * scale
    for f in range(j.shape[0]):
        img = base.copy()
        draw = ImageDraw.Draw(img)
        for k in np.argsort(depth[f], kind="stable"):
            if k == len(_LIMBS):
                draw.ellipse([hu[f] - head_r, hv[f] - head_r, hu[f] + head_r, hv[f] + head_r], fill=fills["skin"])
                continue
            a, b, w_m, slot = _LIMBS[k]
            w = max(1, round(w_m * scale))
            r = w / 2
            draw.line([(u[f, a], v[f, a]), (u[f, b], v[f, b])], fill=fills[slot], width=w)
            for q in (a, b):
                draw.ellipse([u[f, q] - r, v[f, q] - r, u[f, q] + r, v[f, q] + r], fill=fills[slot])
        yield img


def render_clip(joints: torch.Tensor | np.ndarray, shirt: str, trousers: str, background: str,
                height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    """Joints [F,24,3] -> uint8 frames [F,H,W,3]: a thick-limb body in the named colours, fixed camera.

    A pure function of its arguments (no auto-fit, no randomness), so identical motion + caption colours give
    identical pixels. Limbs are painted back to front by depth (camera on +z).
    """
    for name in (shirt, trousers, background):
        if name not in COLOURS:
            raise ValueError(f"unknown colour {name!r}; HuMoVe-mini colours are {sorted(COLOURS)}")
    j = _as_joints(joints)
    fills = {"shirt": COLOURS[shirt], "trousers": COLOURS[trousers], "skin": _SKIN, "shoes": _SHOES}
    base = _background(background, height, width, _SUPERSAMPLE)
    out = np.empty((j.shape[0], height, width, 3), np.uint8)
    for f, img in enumerate(_draw_frames(j, height, width, fills, base)):
        out[f] = np.asarray(img.resize((width, height), Image.BOX))
    return out


def render_labels(joints: torch.Tensor | np.ndarray, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    """Joints [F,24,3] -> uint8 label map [F,H,W] of what render_clip paints where (indices into LABELS: 0 background,
    1 shirt, 2 trousers, 3 skin, 4 shoes; `labels > 0` is the silhouette).

    Drawn by the same routine as the video at the same supersampling; an output pixel is background when the body
    covers < 50% of it (so the silhouette is the pixels the box filter makes at least half body), else the slot that
    covers most of it (ties: the lower index).
    """
    j = _as_joints(joints)
    ss = _SUPERSAMPLE
    fills = {slot: LABELS.index(slot) for slot in LABELS[1:]}
    base = Image.new("L", (width * ss, height * ss), 0)
    out = np.empty((j.shape[0], height, width), np.uint8)
    for f, img in enumerate(_draw_frames(j, height, width, fills, base)):
        cells = np.asarray(img).reshape(height, ss, width, ss)
        counts = np.stack([(cells == k).sum(axis=(1, 3)) for k in range(len(LABELS))])  # [labels, H, W]
        body = ss * ss - counts[0]
        out[f] = np.where(2 * body >= ss * ss, 1 + counts[1:].argmax(0), 0)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Dataset generation


def _write_raw_clip(raw_dir: Path, clip_id: str, frames: np.ndarray, motion: SMPLMotion, fps: float) -> None:
    """Lossless mp4 (H.264 RGB, qp 0) + SMPL .npz, so prepare_humove.py sees exactly the rendered pixels."""
    import imageio.v2 as iio

    writer = iio.get_writer(str(raw_dir / f"{clip_id}.mp4"), format="ffmpeg", fps=fps, codec="libx264rgb",
                            pixelformat="rgb24", ffmpeg_params=["-qp", "0"], macro_block_size=1,
                            ffmpeg_log_level="error")
    for frame in frames:
        writer.append_data(frame)
    writer.close()
    motion.to_npz(raw_dir / f"{clip_id}.npz")


def _clip_spec(seed: int, stream: int, i: int) -> ClipSpec:
    """Clip i of a stream (0 = video clips, 1 = motion-only): actions cycle through a seeded order of all ten, so any
    ten consecutive clips cover every action; the rest is drawn from a generator seeded by (seed, stream, i).

    Every generator seed here has 4 words ending in a distinct tag: numpy's SeedSequence pads with zeros, so
    [s, 1] and [s, 1, 0] would be the same stream."""
    order = np.random.default_rng([seed, stream, 0, 2]).permutation(len(ACTIONS))
    return sample_spec(np.random.default_rng([seed, stream, i, 1]), list(ACTIONS)[order[i % len(ACTIONS)]])


def _heldout_indices(n: int, fraction: float, seed: int) -> set[int]:
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"heldout fraction must be in [0, 1), got {fraction}")
    k = min(n - 1, max(1, round(n * fraction))) if fraction > 0 and n > 1 else 0
    return set(np.random.default_rng([seed, 0, 0, 3]).permutation(n)[:k].tolist())


def _open_writer(path: Path):
    from streaming import MDSWriter

    return MDSWriter(out=str(path), columns=COLUMNS, size_limit=SHARD_BYTES, hashes=SHARD_HASHES)


class _Tally:
    """Counts per split and per action, for dataset.json."""

    def __init__(self) -> None:
        self.counts = {"train": 0, "heldout": 0, "motion_only": 0}
        self.actions: dict[str, dict[str, int]] = {k: {} for k in self.counts}

    def add(self, split: str, action: str) -> None:
        self.counts[split] += 1
        self.actions[split][action] = self.actions[split].get(action, 0) + 1


def generate_humove_mini(
    out: str | Path,
    clips: int,
    seed: int = 0,
    *,
    heldout_fraction: float = 0.1,
    codec: str = "pixel",
    codec_channels: int = 16,
    vae_path: Optional[str] = None,
    text_encoder: str = "hash",
    text_encoder_path: Optional[str] = None,
    raw: bool = False,
    motion_only_clips: int = 0,
    latent_dtype: str = "float16",
    num_frames: int = NUM_FRAMES,
    fps: float = FPS,
    height: int = HEIGHT,
    width: int = WIDTH,
    batch_size: int = 16,
    progress: bool = True,
) -> dict[str, Any]:
    """Write HuMoVe-mini under `out` and return what dataset.json records (see docs/data.md for the layout).

    codec: "pixel" (exact), "wan-vae" (`vae_path`), or "pca": the pixel tokens' top `codec_channels` principal
    components, fitted on the training clips (`PCACodec`; written to `out`/video_codec.pt)."""
    if clips < 1:
        raise ValueError(f"--clips must be >= 1, got {clips}")
    out = Path(out)
    for name in ("train", "heldout", "motion_only", "raw"):
        if (out / name).exists() and any((out / name).iterdir()):
            raise FileExistsError(f"{out / name} already holds files; pick a new --out folder or delete it first")
    smpl_path = out / "smpl_synthetic.pkl"
    if not smpl_path.exists():
        write_synthetic_smpl_model(smpl_path)
    layer = SMPLLayer(smpl_path)
    shape = dict(num_frames=num_frames, fps=fps, height=height, width=width)
    if codec == "pca":
        vcodec: VideoCodec = _fit_pca_codec(clips, seed, heldout_fraction, layer, shape, codec_channels)
        vcodec.save(out / PCA_CODEC_FILE)
    else:
        vcodec = build_video_codec(codec, vae_path)
    tenc: TextEncoder = build_text_encoder(text_encoder, text_encoder_path)
    tally = _Tally()
    with tqdm(total=clips + motion_only_clips, desc="humove-mini", unit="clip", disable=not progress) as bar:
        train_features = _write_video_clips(out, clips, seed, heldout_fraction, raw, layer, vcodec, tenc, latent_dtype,
                                            batch_size, shape, tally, bar)
        if motion_only_clips > 0:
            _write_motion_only(out, motion_only_clips, seed, layer, tenc, latent_dtype, batch_size, shape, tally, bar)
    if train_features:
        MotionStats.compute(train_features).save(out / "motion_stats.json")
    torch.save(tenc.encode([""])[0], out / "null_text.pt")
    info = {
        "name": "humove-mini",
        "schema_version": SCHEMA_VERSION,
        "seed": seed,
        "fps": fps,
        "num_frames": num_frames,
        "height": height,
        "width": width,
        "video_codec": vcodec.describe(),
        "latent_shape": list(vcodec.latent_shape(num_frames, height, width)),
        "latent_dtype": latent_dtype,
        "text_encoder": tenc.describe(),
        "text_dim": tenc.dim,
        "counts": tally.counts,
        "actions": tally.actions,
        "heldout_fraction": heldout_fraction,
        "smpl_model": smpl_path.name,
        "motion_stats": "motion_stats.json" if train_features else None,
        "null_text": "null_text.pt",
        "raw_manifest": "raw/manifest.jsonl" if raw else None,
    }
    (out / "dataset.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


PCA_FIT_CLIPS = 256  # training clips a PCA codec is fitted on: ~65k tokens at 32 x 32, 5 frames; plenty for 48 values


def _fit_pca_codec(clips: int, seed: int, heldout_fraction: float, layer: SMPLLayer, shape: dict[str, Any],
                   channels: int) -> PCACodec:
    """A PCA codec fitted on (up to PCA_FIT_CLIPS of) the training clips, rendered once more here: held-out clips stay
    unseen, so their decoding error is an honest measure of the codec."""
    heldout = _heldout_indices(clips, heldout_fraction, seed)
    train = [i for i in range(clips) if i not in heldout][:PCA_FIT_CLIPS]
    frames = []
    for i in train:
        spec = _clip_spec(seed, 0, i)
        motion = make_motion(layer, spec, shape["num_frames"], shape["fps"])
        frames.append(render_clip(motion.joints, spec.shirt, spec.trousers, spec.background, shape["height"],
                                  shape["width"]))
    return PCACodec.fit(np.stack(frames), channels)


def _write_video_clips(out: Path, clips: int, seed: int, heldout_fraction: float, raw: bool, layer: SMPLLayer,
                       vcodec: VideoCodec, tenc: TextEncoder, latent_dtype: str, batch_size: int,
                       shape: dict[str, Any], tally: _Tally, bar: tqdm) -> list[torch.Tensor]:
    """The paired clips into train/ and heldout/ (and raw/); returns the train split's motion features."""
    heldout = _heldout_indices(clips, heldout_fraction, seed)
    writers = {"train": _open_writer(out / "train"), "heldout": _open_writer(out / "heldout")}
    if raw:
        (out / "raw" / "clips").mkdir(parents=True, exist_ok=True)
    manifest = open(out / "raw" / "manifest.jsonl", "w") if raw else None
    train_features = []
    try:
        for start in range(0, clips, batch_size):
            idx = list(range(start, min(clips, start + batch_size)))
            specs = [_clip_spec(seed, 0, i) for i in idx]
            motions = [make_motion(layer, s, shape["num_frames"], shape["fps"]) for s in specs]
            frames = np.stack([render_clip(m.joints, s.shirt, s.trousers, s.background, shape["height"],
                                           shape["width"]) for m, s in zip(motions, specs)])
            latents = vcodec.encode(frames)
            texts = tenc.encode([s.caption() for s in specs])
            for i, s, m, fr, lat, txt in zip(idx, specs, motions, frames, latents, texts):
                clip_id, split = f"hm-{i:06d}", "heldout" if i in heldout else "train"
                sample = _sample(clip_id, s.action, s.caption(), m, lat, txt, **shape)
                writers[split].write(encode_sample(sample, latent_dtype))
                tally.add(split, s.action)
                if split == "train":
                    train_features.append(sample.features())
                if manifest is not None:
                    _write_raw_clip(out / "raw" / "clips", clip_id, fr, m, shape["fps"])
                    manifest.write(json.dumps({"clip_id": clip_id, "video": f"clips/{clip_id}.mp4",
                                               "smpl": f"clips/{clip_id}.npz", "caption": s.caption(),
                                               "category": s.action, "source": SOURCE, "split": split}) + "\n")
            bar.update(len(idx))
    finally:
        if manifest is not None:
            manifest.close()
    for writer in writers.values():
        writer.finish()
    return train_features


def _write_motion_only(out: Path, clips: int, seed: int, layer: SMPLLayer, tenc: TextEncoder, latent_dtype: str,
                       batch_size: int, shape: dict[str, Any], tally: _Tally, bar: tqdm) -> None:
    """Motion-only samples (has_video = 0) with motion-only captions, from their own random stream."""
    writer = _open_writer(out / "motion_only")
    no_video = {**shape, "height": 0, "width": 0}
    for start in range(0, clips, batch_size):
        idx = list(range(start, min(clips, start + batch_size)))
        specs = [_clip_spec(seed, 1, i) for i in idx]
        texts = tenc.encode([s.motion_caption() for s in specs])
        for i, s, txt in zip(idx, specs, texts):
            m = make_motion(layer, s, shape["num_frames"], shape["fps"])
            writer.write(encode_sample(_sample(f"hm-mo-{i:06d}", s.action, s.motion_caption(), m, None, txt,
                                               **no_video), latent_dtype))
            tally.add("motion_only", s.action)
        bar.update(len(idx))
    writer.finish()


def _sample(clip_id: str, action: str, caption: str, m: SMPLMotion, latent: Optional[torch.Tensor],
            text: torch.Tensor, *, fps: float, num_frames: int, height: int, width: int) -> Sample:
    return Sample(clip_id=clip_id, source=SOURCE, category=action, caption=caption, fps=fps, num_frames=num_frames,
                  height=height, width=width, video_latent=latent, text_embedding=text, betas=m.betas,
                  global_orient=m.global_orient, body_pose=m.body_pose, transl=m.transl, joints=m.joints)
