"""Held-out evaluation on HuMoVe-mini: does each task follow its conditioning, and better than a trivial answer?

Because HuMoVe-mini videos are a pure function of the motion and the caption's colours (`synthetic.render_clip`), every
task can be scored against an exact reference. Two families of metrics: errors against that exact reference (MPJPE,
mean pixel error), and "what a person sees" (is the shirt the colour the caption names, is the body where the motion
says, which action is it): coarse, but they do not reward a blurry average.

Video -> motion (v2m; the motion is denormalized, decoded to SMPL parameters and posed by forward kinematics (FK)
through the dataset's SMPL file):
- `v2m_mpjpe` [lower]: root-relative MPJPE vs the ground-truth joints (pelvis subtracted per frame, Euclidean error
  averaged over frames and joints, x 1000: millimetres for HuMoVe-mini's metres, "mm-equivalent" in general). Baseline
  `v2m_mpjpe_mean_pose`: the training motion's mean joint positions for every frame (`mean_pose_joints`).
  `v2m_mpjpe_tokens` scores the model's directly predicted joint-position tokens instead of FK (a diagnostic: the two
  agree when the model is self-consistent). `v2m_mpjpe_depth_unknown` is a reference, not a baseline: the ground truth
  with every joint's depth (z) set to the pelvis's, the score of a reader that gets every image position exactly but
  cannot tell depth (HuMoVe-mini's camera is orthographic: depth shows only through occlusion and bone lengths).
- `v2m_2d_error` [lower]: the FK joints and the true joints projected with the renderer's camera
  (`synthetic.project_joints`), mean Euclidean distance in output pixels over frames and joints. Absolute, not
  root-relative: the video shows where the body is. Baselines `v2m_2d_error_mean_pose` (the mean joint positions,
  including the mean root translation, projected) and `v2m_2d_error_other_video` (the motion generated from another
  clip's video, the derangement below, scored against this clip's truth: a model that ignores its video ties it).

Motion -> video (m2v; the video is decoded with the dataset's codec to uint8):
- `m2v_error` [lower]: mean absolute pixel error on [0, 255] vs `render_clip(gt joints, caption colours)`. Baseline
  `m2v_error_shuffled`: the same video vs the rendering of another clip's motion in this clip's colours.
- `m2v_silhouette_iou` [higher]: the video's foreground (below) vs the silhouette of the given motion
  (`synthetic.render_labels(joints) > 0`). Baseline `m2v_silhouette_iou_shuffled`: vs the other clip's silhouette.
- `m2v_pair_acc` [higher]: 1 if the video's foreground overlaps the given motion's silhouette more (IoU) than the
  other clip's, 0.5 on a tie, else 0. Baseline `chance_pair` = 0.5.

Text -> video + motion (t2vm; the motion is posed by FK as for v2m):
- `t2vm_consistency` [lower]: the generated motion rendered in the caption's colours vs the generated video (mean
  absolute pixel error). Baseline `t2vm_consistency_mismatched`: video i vs the rendering of generated motion j.
- `t2vm_background_acc`, `t2vm_shirt_acc`, `t2vm_trousers_acc` [higher]: the per-channel median colour of the video's
  background pixels (outside the generated motion's silhouette dilated by one pixel (3 x 3), in the wall rows above the
  ground line), of its shirt pixels and of its trouser pixels (the slots of `render_labels(generated motion)`), over
  all frames, snapped to the nearest palette colour (Euclidean RGB over `COLOURS`); 1 if it is the caption's colour,
  else 0 (also 0 when the slot has no pixel). Baseline `chance_palette` = 1 / len(COLOURS). Uniform chance is not the
  best blind answer: an untrained model's grey mush snaps to "grey" and scores every grey caption (0.25 background
  accuracy on the demo's 20 held-out clips, 5 of them on grey), so a small margin over chance on few clips means little.
- `t2vm_silhouette_iou` [higher]: the video's foreground vs the generated motion's silhouette. Baseline
  `t2vm_silhouette_iou_mismatched`: vs the silhouette of generated motion j. `t2vm_pair_acc` [higher]: 1 / 0.5 / 0 as
  for m2v, own motion against motion j. Baseline `chance_pair`.

Text -> motion (t2m, a fourth sampled task):
- `t2m_action_acc` [higher]: the generated motion's action by nearest neighbour among the dataset's training motions
  (splits `train` and, if present, `motion_only`; each sample's category is its action): joints made relative to the
  first frame's pelvis and turned about the vertical axis so that the first frame faces +z, the facing taken from the
  hip vector (left hip - right hip, whose horizontal part is the body's left; facing = left x up), then L2 over all
  frames and joints. 1 if the neighbour's action is the caption's verb. Baseline `chance_action` = 1 / len(ACTIONS).

Foreground of a video: the wall colour is the per-channel median of its wall rows (entirely above the ground line) and
the floor colour that of its floor rows (entirely below), both over all frames, estimated from the video itself (the
body covers well under half of them); the row the ground line crosses expects their blend (`synthetic.wall_fraction`).
A pixel is foreground when some channel differs from that expected background by more than FOREGROUND_THRESHOLD = 48
(of 255). Why 48: a pixel covered to a fraction c by a body colour of contrast K (its largest channel difference to
the background) differs by about c K, so a fixed threshold T marks it when c > T / K. Against the palette walls K is
at least 50 (skin on pink) except for the shoes on black (35), and mostly 90-230, so T = 48 finds fully covered body
pixels and, for typical contrasts, the ones covered about half or more, which is the silhouette's 50% rule; a lower T
also takes in thinly covered edge pixels of high-contrast clothes, a higher one drops low-contrast limbs, and either way
sampling noise or codec blur under ~20% of the range stays background. Measured on 80 exact renderings (HuMoVe-mini
training clips, 32 x 32), the mean IoU of foreground vs silhouette is 0.79 / 0.82 / 0.85 / 0.88 / 0.90 / 0.90 / 0.84
for T = 16 / 24 / 32 / 40 / 48 / 64 / 80. It is not 1 (edge pixels): `checks["gt_silhouette_iou"]` reports this
ceiling for the evaluated clips. IoU over all frames together: (sum of intersections) / (sum of unions); an empty
union (no foreground and no silhouette in any frame) scores 0: nothing was shown, so nothing was matched.

Every per-clip value is averaged over clips; chance levels are reported as metrics too (`chance_*`). `checks` scores the
ground truth as if it had been generated: the references' own error (render of the ground-truth joints vs the decoded
ground-truth video, FK of the ground-truth parameters vs the stored joints; both 0 for pixel-codec HuMoVe-mini, anything
else means the references are off) and the ceilings of the perception metrics (`gt_silhouette_iou`, and
`gt_action_acc`: the true motion classified among the training motions, ~0.95 on the demo's 20 held-out clips with 280
references: the actions' phases are random, so a nearest neighbour can be another action caught mid-cycle).

The derangement: a fixed, seeded permutation without fixed points pairs each clip i with another clip j = perm[i]
(all clips share one shape). Sampling is batched over consecutive clips; the noise of each (task, batch) comes from its
own generator seeded by (seed, task, batch index), so results are deterministic for a seed and batch size.

The report (`build_report`), all derived from METRIC_TABLE: `metrics` (every metric, baseline and chance level),
`baselines` (metric -> list of baseline names), `higher_is_better` (every name in `metrics`), `better_than_baseline`
(metric -> True when it strictly beats every one of its baselines in its direction), `units`, `descriptions`, plus
checkpoint, data, split, settings, counts, checks and per-clip values.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .config import Config, SampleConfig
from .data.encoders import VideoCodec, pad_text, video_codec_from
from .data.shards import iter_samples, motion_features
from .data.synthetic import ACTIONS, COLOURS, project_joints, render_clip, render_labels, wall_fraction
from .diffusion.sampler import SOLVERS, Request, sample
from .motion import MotionStats, SMPLLayer, SMPLMotion

MM_PER_UNIT = 1000.0
FOREGROUND_THRESHOLD = 48  # max-channel |pixel - expected background| above which a pixel is foreground (module doc)
REFERENCE_SPLITS: tuple[str, ...] = ("train", "motion_only")  # the action classifier's labelled motions
MPJPE_UNITS = ("mm-equivalent: root-relative MPJPE (pelvis subtracted per frame) in the data's length unit x 1000; "
               "HuMoVe-mini lengths are metres, so millimetres")
PIXEL_UNITS = "mean absolute pixel error of uint8 RGB frames, on [0, 255]"
PIXELS_2D_UNITS = "mean Euclidean distance of projected joints, in pixels of the output video (absolute positions)"
IOU_UNITS = "intersection over union of pixel masks, summed over all frames, on [0, 1]"
ACC_UNITS = "fraction of clips, on [0, 1]"
PAIR_UNITS = "fraction of clips whose own pairing wins, on [0, 1] (a tie counts 0.5)"


@dataclass(frozen=True)
class MetricDef:
    """One row of the metric table: the reported value's name, direction, the baselines it must beat, units, meaning."""

    name: str
    higher_is_better: bool
    baselines: tuple[str, ...]
    units: str
    description: str
    constant: Optional[float] = None  # a chance level: the same for every model and data


_PAL, _PAIR, _ACT = ("chance_palette",), ("chance_pair",), ("chance_action",)
# Every reported value, metrics and their baselines alike; the module docstring defines each one.
METRIC_TABLE: tuple[MetricDef, ...] = (
    MetricDef("v2m_mpjpe", False, ("v2m_mpjpe_mean_pose",), MPJPE_UNITS, "v2m FK joints vs truth, root-relative"),
    MetricDef("v2m_mpjpe_tokens", False, ("v2m_mpjpe_mean_pose",), MPJPE_UNITS, "v2m joint tokens vs truth"),
    MetricDef("v2m_mpjpe_mean_pose", False, (), MPJPE_UNITS, "the training mean pose vs truth"),
    MetricDef("v2m_mpjpe_depth_unknown", False, (), MPJPE_UNITS, "reference: truth with depth flattened"),
    MetricDef("v2m_2d_error", False, ("v2m_2d_error_mean_pose", "v2m_2d_error_other_video"), PIXELS_2D_UNITS,
              "v2m FK joints vs truth, projected by the renderer's camera"),
    MetricDef("v2m_2d_error_mean_pose", False, (), PIXELS_2D_UNITS, "the mean joint positions, projected"),
    MetricDef("v2m_2d_error_other_video", False, (), PIXELS_2D_UNITS, "motion from another clip's video, projected"),
    MetricDef("m2v_error", False, ("m2v_error_shuffled",), PIXEL_UNITS, "m2v video vs the exact rendering"),
    MetricDef("m2v_error_shuffled", False, (), PIXEL_UNITS, "m2v video vs another clip's motion rendered"),
    MetricDef("m2v_silhouette_iou", True, ("m2v_silhouette_iou_shuffled",), IOU_UNITS,
              "m2v video foreground vs the given motion's silhouette"),
    MetricDef("m2v_silhouette_iou_shuffled", True, (), IOU_UNITS, "m2v foreground vs another clip's silhouette"),
    MetricDef("m2v_pair_acc", True, _PAIR, PAIR_UNITS, "own motion's silhouette fits the video better than another's"),
    MetricDef("t2vm_consistency", False, ("t2vm_consistency_mismatched",), PIXEL_UNITS,
              "t2vm video vs its own motion rendered in the caption's colours"),
    MetricDef("t2vm_consistency_mismatched", False, (), PIXEL_UNITS, "t2vm video vs another sample's motion rendered"),
    MetricDef("t2vm_background_acc", True, _PAL, ACC_UNITS, "video background is the caption's colour"),
    MetricDef("t2vm_shirt_acc", True, _PAL, ACC_UNITS, "video shirt (motion's shirt pixels) is the caption's colour"),
    MetricDef("t2vm_trousers_acc", True, _PAL, ACC_UNITS, "video trousers are the caption's colour"),
    MetricDef("t2vm_silhouette_iou", True, ("t2vm_silhouette_iou_mismatched",), IOU_UNITS,
              "t2vm video foreground vs its own motion's silhouette"),
    MetricDef("t2vm_silhouette_iou_mismatched", True, (), IOU_UNITS, "t2vm foreground vs another sample's silhouette"),
    MetricDef("t2vm_pair_acc", True, _PAIR, PAIR_UNITS, "own motion's silhouette fits the video better than another's"),
    MetricDef("t2m_action_acc", True, _ACT, ACC_UNITS, "t2m motion's nearest training motion has the caption's action"),
    MetricDef("chance_palette", True, (), ACC_UNITS, "1 / number of palette colours", 1 / len(COLOURS)),
    MetricDef("chance_pair", True, (), PAIR_UNITS, "a coin flip between two pairings", 0.5),
    MetricDef("chance_action", True, (), ACC_UNITS, "1 / number of actions", 1 / len(ACTIONS)),
)
METRICS: tuple[str, ...] = tuple(d.name for d in METRIC_TABLE)
BASELINES: dict[str, tuple[str, ...]] = {d.name: d.baselines for d in METRIC_TABLE if d.baselines}
HIGHER_IS_BETTER: dict[str, bool] = {d.name: d.higher_is_better for d in METRIC_TABLE}
UNITS: dict[str, str] = {d.name: d.units for d in METRIC_TABLE}
CHANCE: dict[str, float] = {d.name: d.constant for d in METRIC_TABLE if d.constant is not None}
# The references' own error (~0) and the ceilings a perfect model reaches (the ground truth scored as if generated).
CHECKS: tuple[str, ...] = ("render_vs_gt_video_error", "fk_vs_gt_joints_mpjpe", "gt_silhouette_iou", "gt_action_acc")
CHECK_UNITS: dict[str, str] = {"render_vs_gt_video_error": PIXEL_UNITS, "fk_vs_gt_joints_mpjpe": MPJPE_UNITS,
                               "gt_silhouette_iou": IOU_UNITS, "gt_action_acc": ACC_UNITS}
TASK_ORDER: tuple[str, ...] = ("v2m", "m2v", "t2vm", "t2m")  # new tasks go last: a task's noise seed is its index

_CAPTION = re.compile(
    r"^a person in an? (?P<shirt>\w+) shirt and (?P<trousers>\w+) trousers (?P<verb>\w+)\b.* "
    r"on an? (?P<background>\w+) background$"
)
_VERB_TO_ACTION = {verb: action for action, verb in ACTIONS.items()}


class EvaluationError(ValueError):
    """The data or model cannot be evaluated; the message says what is wrong and what to pass instead."""


_SAMPLE_KEYS = tuple(f.name for f in fields(SampleConfig))  # EvalSettings carries each of them


@dataclass(frozen=True)
class EvalSettings:
    """Sampling settings of one evaluation (defaults: the exported config's `sample` section)."""

    steps: int = SampleConfig.steps
    shift: float = SampleConfig.shift
    solver: str = SampleConfig.solver
    text_guidance: float = SampleConfig.text_guidance
    condition_guidance: float = SampleConfig.condition_guidance
    seed: int = SampleConfig.seed
    batch_size: int = 8
    max_clips: Optional[int] = None

    @classmethod
    def from_config(cls, sample_cfg: SampleConfig, **overrides: Any) -> "EvalSettings":
        """The config's sampling settings, with every override that is not None applied."""
        base = {k: getattr(sample_cfg, k) for k in _SAMPLE_KEYS}
        return cls(**{**base, **{k: v for k, v in overrides.items() if v is not None}})

    def sample_config(self) -> SampleConfig:
        """The sampler's settings (the sampler takes a SampleConfig; batching and clip count stay here)."""
        return SampleConfig(**{k: getattr(self, k) for k in _SAMPLE_KEYS})

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise EvaluationError(f"steps must be >= 1, got {self.steps}")
        if self.solver not in SOLVERS:
            raise EvaluationError(f"unknown solver {self.solver!r}: choose one of {SOLVERS}")
        if self.batch_size < 1:
            raise EvaluationError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_clips is not None and self.max_clips < 2:
            raise EvaluationError(
                f"max_clips must be >= 2 (the baselines pair each clip with another), got {self.max_clips}"
            )


# ---------------------------------------------------------------------------------------------------------------------
# Metric functions: poses


def root_relative_mpjpe(pred: Tensor | np.ndarray, gt: Tensor | np.ndarray, root: int = 0) -> float:
    """Mean per-joint position error after subtracting joint `root` (the pelvis) per frame, x 1000 (mm-equivalent).

    pred and gt are [F, J, 3] (pred may be [1, J, 3], one pose for every frame). Root-relative, so a global translation of
    either does not change it: V2M is judged on the pose, not on where the body stands.
    """
    p, g = _check_joints(pred, gt)
    p = p - p[:, root : root + 1]
    g = g - g[:, root : root + 1]
    return float(np.linalg.norm(p - g, axis=-1).mean() * MM_PER_UNIT)


def _check_joints(pred: Tensor | np.ndarray, gt: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both as float64 numpy; pred [F, J, 3] or [1, J, 3] and gt [F, J, 3], else a ValueError naming the shapes."""
    p, g = np.asarray(pred, np.float64), np.asarray(gt, np.float64)
    if p.ndim != 3 or g.ndim != 3 or p.shape[1:] != g.shape[1:] or p.shape[-1] != 3 or p.shape[0] not in (1, g.shape[0]):
        raise ValueError(f"joints must be [F, J, 3] (pred [1, J, 3] allowed), got pred {p.shape} and gt {g.shape}")
    return p, g


def joint_error_2d(pred: Tensor | np.ndarray, gt: Tensor | np.ndarray, height: int, width: int) -> float:
    """Mean Euclidean distance in output pixels between pred and gt joints [F, 24, 3] (pred may be [1, 24, 3]), both
    projected by the renderer's camera. Not root-relative: where the body stands is part of what the video shows."""
    p, g = _check_joints(pred, gt)
    d = project_joints(p, height, width) - project_joints(g, height, width)
    return float(np.linalg.norm(d, axis=-1).mean())


def without_depth(joints: Tensor, root: int = 0) -> Tensor:
    """Joints [F, J, 3] with each joint's z (the camera axis of HuMoVe-mini's fixed camera) replaced by the root's."""
    flat = joints.clone()
    flat[..., 2] = joints[:, root : root + 1, 2]
    return flat


def canonical_joints(joints: Tensor | np.ndarray) -> np.ndarray:
    """Joints [F, 24, 3] relative to the first frame's pelvis and turned about y so that the first frame faces +z.

    The facing comes from the hip vector (left hip 1 - right hip 2): SMPL's rest body faces +z with its left at +x,
    so facing = left x up = (-hip_z, 0, hip_x). Joints only, so stored joints and FK joints are treated alike, and a
    pelvis tilt (bow) does not change the yaw the way the root orientation's forward axis would.
    """
    j = np.asarray(joints, np.float64)
    j = j - j[:1, :1]
    hip = j[0, 1] - j[0, 2]
    yaw = np.arctan2(-hip[2], hip[0])  # atan2(facing_x, facing_z)
    c, s = np.cos(yaw), np.sin(yaw)
    out = j.copy()
    out[..., 0] = c * j[..., 0] - s * j[..., 2]
    out[..., 2] = s * j[..., 0] + c * j[..., 2]
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Metric functions: pixels


def mean_abs_pixel_error(a: np.ndarray, b: np.ndarray) -> float:
    """Mean |a - b| of two uint8 videos [F, H, W, 3], on [0, 255] (computed in a wide type: uint8 would wrap around)."""
    if a.shape != b.shape:
        raise ValueError(f"videos differ in shape: {a.shape} vs {b.shape}")
    if a.dtype != np.uint8 or b.dtype != np.uint8:
        raise ValueError(f"videos must be uint8, got {a.dtype} and {b.dtype}")
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def nearest_colour(rgb: np.ndarray) -> str:
    """The palette colour (`COLOURS`) nearest to an RGB triple in Euclidean distance."""
    names = list(COLOURS)
    dist = np.linalg.norm(np.array([COLOURS[n] for n in names], np.float64) - np.asarray(rgb, np.float64), axis=1)
    return names[int(dist.argmin())]


def median_colour(video: np.ndarray, mask: np.ndarray) -> Optional[np.ndarray]:
    """Per-channel median [3] of video [F, H, W, 3] over the pixels of mask [F, H, W] (None when it selects none)."""
    pixels = video[mask]
    return None if pixels.shape[0] == 0 else np.median(pixels.astype(np.float64), axis=0)


def dilate(mask: np.ndarray) -> np.ndarray:
    """mask [F, H, W] grown by one pixel in each frame (3 x 3 neighbourhood, diagonals included)."""
    padded = np.pad(mask, ((0, 0), (1, 1), (1, 1)))
    h, w = mask.shape[1:]
    return np.any([padded[:, dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)], axis=0)


def expected_background(video: np.ndarray) -> np.ndarray:
    """The background [H, 3] a video shows per row, estimated from the video [F, H, W, 3] itself: the median of its
    wall rows, the median of its floor rows, and their blend on the row the ground line crosses."""
    wall_frac = wall_fraction(video.shape[1])
    wall = median_colour(video, np.broadcast_to((wall_frac == 1)[None, :, None], video.shape[:3]))
    floor = median_colour(video, np.broadcast_to((wall_frac == 0)[None, :, None], video.shape[:3]))
    wall = floor if wall is None else wall
    floor = wall if floor is None else floor
    if wall is None:
        raise ValueError(f"a video of height {video.shape[1]} has no whole wall or floor row")
    return wall_frac[:, None] * wall + (1 - wall_frac[:, None]) * floor


def foreground_mask(video: np.ndarray, threshold: float = FOREGROUND_THRESHOLD) -> np.ndarray:
    """bool [F, H, W]: pixels of the uint8 video [F, H, W, 3] whose colour differs from the video's own background
    estimate (`expected_background`) by more than `threshold` in some channel."""
    diff = np.abs(video.astype(np.float64) - expected_background(video)[None, :, None, :])
    return diff.max(axis=-1) > threshold


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks [F, H, W] over all frames together (sums, not a mean of per-frame
    ratios, so empty frames weigh nothing); 0 when both are empty everywhere."""
    if a.shape != b.shape:
        raise ValueError(f"masks differ in shape: {a.shape} vs {b.shape}")
    union = int(np.logical_or(a, b).sum())
    return 0.0 if union == 0 else int(np.logical_and(a, b).sum()) / union


def pair_score(own: float, other: float) -> float:
    """1 if the own pairing scores higher, 0.5 on a tie, else 0."""
    return 1.0 if own > other else 0.5 if own == other else 0.0


def colour_accuracies(video: np.ndarray, labels: np.ndarray, colours: tuple[str, str, str]) -> dict[str, float]:
    """{"background", "shirt", "trousers"} -> 1.0 if the video's median colour there snaps to the named colour, else 0.

    Where: shirt / trousers pixels of the label map [F, H, W] (`render_labels`, 1 and 2) and background pixels outside
    its silhouette dilated by one pixel, in the wall rows (whole rows above the ground line). No pixel -> 0.
    """
    shirt, trousers, background = colours
    wall_rows = (wall_fraction(video.shape[1]) == 1)[None, :, None]
    masks = {"background": ~dilate(labels > 0) & wall_rows, "shirt": labels == 1, "trousers": labels == 2}
    named = {"background": background, "shirt": shirt, "trousers": trousers}
    out = {}
    for part, mask in masks.items():
        rgb = median_colour(video, mask)
        out[part] = float(rgb is not None and nearest_colour(rgb) == named[part])
    return out


def derangement(n: int, seed: int) -> np.ndarray:
    """A seeded permutation of range(n) with no fixed points (Sattolo's algorithm: one random n-cycle)."""
    if n < 2:
        raise EvaluationError(f"the baselines pair each clip with another one: need >= 2 clips, got {n}")
    perm = np.arange(n)
    rng = np.random.default_rng([seed, 7])
    for i in range(n - 1, 0, -1):
        j = int(rng.integers(0, i))  # j < i: never swaps an element with itself, so the result is a single cycle
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def _match_caption(caption: str) -> re.Match:
    m = _CAPTION.match(caption.strip())
    if m is None:
        raise EvaluationError(
            f"caption {caption!r} is not a HuMoVe-mini caption ('a person in a <colour> shirt and <colour> trousers "
            "<verb> on a <colour> background'): this evaluation renders reference videos from the caption's colours, so it "
            "needs HuMoVe-mini data (tools/make_humove_mini.py)"
        )
    return m


def parse_caption_colours(caption: str) -> tuple[str, str, str]:
    """(shirt, trousers, background) named by a HuMoVe-mini caption; the reference renderer needs them."""
    m = _match_caption(caption)
    colours = (m["shirt"], m["trousers"], m["background"])
    unknown = [c for c in colours if c not in COLOURS]
    if unknown:
        raise EvaluationError(
            f"caption {caption!r} names unknown colours {unknown}; HuMoVe-mini colours are {sorted(COLOURS)}"
        )
    return colours


def parse_caption_action(caption: str) -> str:
    """The action (a key of `ACTIONS`) whose verb a HuMoVe-mini caption uses."""
    verb = _match_caption(caption)["verb"]
    if verb not in _VERB_TO_ACTION:
        raise EvaluationError(f"caption {caption!r} uses the verb {verb!r}; HuMoVe-mini verbs are "
                              f"{sorted(_VERB_TO_ACTION)}")
    return _VERB_TO_ACTION[verb]


# ---------------------------------------------------------------------------------------------------------------------
# Data


@dataclass
class Clip:
    """One held-out clip as the evaluation uses it."""

    clip_id: str
    caption: str
    colours: tuple[str, str, str]
    action: str  # the action the caption's verb names
    height: int
    width: int
    latent: Tensor  # [C, F_lat, H_lat, W_lat] float32
    motion: Tensor  # [F, 235] normalized float32
    features: Tensor  # [F, 235] raw (denormalized) features of the ground truth
    joints: Tensor  # [F, 24, 3] ground-truth joints
    text: Tensor  # [text_len, D] float32, padded

    @property
    def shape_key(self) -> tuple[int, ...]:
        return (*self.latent.shape, self.motion.shape[0], self.height, self.width)


@dataclass
class ActionReferences:
    """The labelled motions t2m_action_acc classifies against: canonical joints (`canonical_joints`) and actions."""

    joints: np.ndarray  # [N, F, 24, 3] float64
    actions: list[str]
    clip_ids: list[str]

    @classmethod
    def load(cls, root: Path, frames: int, splits: tuple[str, ...] = REFERENCE_SPLITS) -> "ActionReferences":
        """Every sample of the splits that exist under root, with `frames` frames (the classifier compares frame by
        frame); an EvaluationError when there is none."""
        joints, actions, ids = [], [], []
        for split in splits:
            if not (root / split / "index.json").is_file():
                continue
            for s in iter_samples(root / split):
                if s.joints.shape[0] == frames and s.category in ACTIONS:
                    joints.append(canonical_joints(s.joints.float()))
                    actions.append(s.category)
                    ids.append(s.clip_id)
        if not joints:
            raise EvaluationError(
                f"{root} has no {frames}-frame training motion labelled with a HuMoVe-mini action in {list(splits)}: "
                "t2m_action_acc classifies generated motion against them; evaluate a dataset made by "
                "tools/make_humove_mini.py"
            )
        return cls(np.stack(joints), actions, ids)

    def classify(self, joints: Tensor | np.ndarray) -> str:
        """The action of the reference nearest to joints [F, 24, 3] (L2 over all frames and joints, canonicalized)."""
        q = canonical_joints(joints)
        if q.shape != self.joints.shape[1:]:
            raise ValueError(f"joints {q.shape} do not match the references' {self.joints.shape[1:]}")
        return self.actions[int(((self.joints - q[None]) ** 2).sum(axis=(1, 2, 3)).argmin())]


@dataclass
class EvalData:
    """A dataset folder's held-out clips plus what scoring needs: motion statistics, SMPL layer, codec, null text, and
    the training motions the action classifier compares against."""

    root: Path
    split: str
    clips: list[Clip]
    stats: MotionStats
    layer: SMPLLayer
    codec: VideoCodec
    null_text: Tensor  # [text_len, D] float32
    references: ActionReferences

    @classmethod
    def load(cls, root: str | Path, split: str, text_len: int, max_clips: Optional[int] = None,
             vae_path: Optional[str] = None) -> "EvalData":
        root = Path(root)
        info = _dataset_info(root, split)
        stats = MotionStats.load(root / info["motion_stats"])
        null = pad_text(torch.load(root / info["null_text"], weights_only=True), text_len).float()
        layer = SMPLLayer(root / info["smpl_model"])
        codec = video_codec_from(info["video_codec"], root, vae_path)
        clips = _load_clips(root / split, stats, text_len, max_clips)
        references = ActionReferences.load(root, clips[0].motion.shape[0])
        return cls(root, split, clips, stats, layer, codec, null, references)


def _dataset_info(root: Path, split: str) -> dict[str, Any]:
    """dataset.json, after checking that it and the split hold what the evaluation reads."""
    info_path = root / "dataset.json"
    if not info_path.is_file():
        raise EvaluationError(
            f"{info_path} not found: pass --data the dataset folder written by tools/make_humove_mini.py"
        )
    info = json.loads(info_path.read_text())
    if not (root / split / "index.json").is_file():
        raise EvaluationError(
            f"{root / split} holds no shards (no index.json); choose a split that exists, e.g. heldout"
        )
    for key in ("motion_stats", "null_text", "smpl_model", "video_codec"):
        if not info.get(key):
            raise EvaluationError(
                f"{info_path} records no {key!r}; regenerate the dataset with tools/make_humove_mini.py"
            )
    return info


def _load_clips(split_dir: Path, stats: MotionStats, text_len: int, max_clips: Optional[int]) -> list[Clip]:
    """The split's first max_clips paired clips, all of one shape (the baselines compare clips pairwise)."""
    clips: list[Clip] = []
    for s in iter_samples(split_dir):
        if max_clips is not None and len(clips) >= max_clips:
            break
        if s.video_latent is None:
            raise EvaluationError(f"{split_dir}: sample {s.clip_id!r} has no video; evaluate a paired split")
        features = motion_features(s).float()
        clips.append(Clip(
            clip_id=s.clip_id, caption=s.caption, colours=parse_caption_colours(s.caption),
            action=parse_caption_action(s.caption), height=s.height, width=s.width, latent=s.video_latent.float(),
            motion=stats.normalize(features).float(), features=features, joints=s.joints.float(),
            text=pad_text(s.text_embedding, text_len).float(),
        ))
    if len(clips) < 2:
        raise EvaluationError(f"{split_dir} has {len(clips)} paired clips; the evaluation needs at least 2")
    shapes = sorted({c.shape_key for c in clips})
    if len(shapes) > 1:
        raise EvaluationError(
            f"{split_dir} mixes clip shapes {shapes} (latent C, F, H, W, frames, height, width): the baselines "
            "compare clips pairwise, so evaluate one shape bucket at a time"
        )
    return clips


def fk_joints(layer: SMPLLayer, features: Tensor) -> Tensor:
    """Raw (denormalized) features [F, 235] -> joints [F, 24, 3] by SMPL forward kinematics of the decoded parameters."""
    m = SMPLMotion.from_features(features.float())
    return layer.joints(m.betas, m.global_orient, m.body_pose, m.transl).float()


def mean_pose_joints(stats: MotionStats) -> Tensor:
    """The dataset's mean pose for MPJPE, [1, 24, 3]: the mean joint positions of the training motion (the joint tokens'
    mean in motion_stats; root-relative, it is the mean root-relative pose, the best constant guess in squared error).
    Posing the mean *features* by FK instead would average the 6-D root orientations of every facing into an arbitrary
    one: a weaker guess that depends on how facings happen to be spread (276.5 against 227.0 mm on the demo's held-out
    clips)."""
    return SMPLMotion.from_features(stats.mean[None].float()).joints.float()


def clip_batches(num_clips: int, batch_size: int) -> list[range]:
    """Consecutive clips, at most `batch_size` per batch, in clip order."""
    return [range(s, min(num_clips, s + batch_size)) for s in range(0, num_clips, batch_size)]


# ---------------------------------------------------------------------------------------------------------------------
# Generation and scoring


@dataclass
class Generated:
    """Per clip, what the model produced (motion normalized): v2m motion, m2v video latent, t2vm video latent + motion,
    t2m motion."""

    v2m_motion: list[Tensor]
    m2v_video: list[Tensor]
    t2vm_video: list[Tensor]
    t2vm_motion: list[Tensor]
    t2m_motion: list[Tensor]


def _generator(seed: int, task: str, batch: int) -> torch.Generator:
    """Independent noise per (seed, task, batch): a task's samples do not depend on which other tasks ran."""
    state = np.random.SeedSequence([seed, TASK_ORDER.index(task), batch]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


@torch.no_grad()
def generate(model: nn.Module, data: EvalData, settings: EvalSettings, device: torch.device | str = "cpu",
             progress: bool = False) -> Generated:
    """Sample all four tasks for every clip, batched over consecutive clips."""
    device = torch.device(device)
    batches = clip_batches(len(data.clips), settings.batch_size)
    out = Generated([], [], [], [], [])
    cfg = settings.sample_config()
    null = data.null_text.to(device)
    bar = tqdm(total=len(batches) * len(TASK_ORDER), desc="evaluate", unit="batch", disable=not progress)
    try:
        for b, idx in enumerate(batches):
            clips = [data.clips[i] for i in idx]
            video = torch.stack([c.latent for c in clips]).to(device)
            motion = torch.stack([c.motion for c in clips]).to(device)
            text = torch.stack([c.text for c in clips]).to(device)
            frames = motion.shape[1]
            requests = {"v2m": Request("v2m", video_cond=video, motion_frames=frames),
                        "m2v": Request("m2v", text, video_shape=video.shape, motion_cond=motion),
                        "t2vm": Request("t2vm", text, video_shape=video.shape, motion_frames=frames),
                        "t2m": Request("t2m", text, motion_frames=frames)}
            got = {}
            for task, request in requests.items():
                got[task] = sample(model, request, null, cfg, generator=_generator(settings.seed, task, b))
                bar.update()
            (_, v2m), (m2v, _), (t2v, t2m), (_, t2m_only) = got["v2m"], got["m2v"], got["t2vm"], got["t2m"]
            for results, batch in ((out.v2m_motion, v2m), (out.m2v_video, m2v), (out.t2vm_video, t2v),
                                   (out.t2vm_motion, t2m), (out.t2m_motion, t2m_only)):
                results.extend(batch.float().cpu().unbind(0))
    finally:
        bar.close()
    return out


def _finite(x: Tensor, what: str, clip_id: str) -> Tensor:
    if not bool(torch.isfinite(x).all()):
        raise EvaluationError(f"the model generated non-finite {what} for clip {clip_id!r}; check the checkpoint")
    return x


@dataclass
class _Decoded:
    """The generated outputs as scoring reads them: uint8 videos, denormalized v2m features, FK joints, and label maps
    (each rendered once: the derangement reuses them)."""

    m2v_video: list[np.ndarray]
    t2vm_video: list[np.ndarray]
    v2m_features: list[Tensor]
    v2m_joints: list[Tensor]
    t2vm_joints: list[Tensor]
    t2m_joints: list[Tensor]
    gt_labels: list[np.ndarray]
    t2vm_labels: list[np.ndarray]

    @classmethod
    def of(cls, data: EvalData, gen: Generated) -> "_Decoded":
        clips = data.clips

        def video(latents: list[Tensor], what: str) -> list[np.ndarray]:
            return [data.codec.decode(_finite(z, what, c.clip_id)[None])[0] for z, c in zip(latents, clips)]

        def features(motions: list[Tensor], what: str) -> list[Tensor]:
            return [data.stats.denormalize(_finite(m, what, c.clip_id)) for m, c in zip(motions, clips)]

        v2m = features(gen.v2m_motion, "v2m motion")
        t2vm_joints = [fk_joints(data.layer, f) for f in features(gen.t2vm_motion, "t2vm motion")]
        h, w = clips[0].height, clips[0].width
        return cls(
            m2v_video=video(gen.m2v_video, "m2v video"), t2vm_video=video(gen.t2vm_video, "t2vm video"),
            v2m_features=v2m, v2m_joints=[fk_joints(data.layer, f) for f in v2m], t2vm_joints=t2vm_joints,
            t2m_joints=[fk_joints(data.layer, f) for f in features(gen.t2m_motion, "t2m motion")],
            gt_labels=[render_labels(c.joints, h, w) for c in clips],
            t2vm_labels=[render_labels(j, h, w) for j in t2vm_joints],
        )


def _v2m_record(data: EvalData, dec: _Decoded, i: int, j: int) -> dict[str, float]:
    """Clip i's video -> motion scores; j is the clip the derangement pairs it with."""
    c, mean_pose = data.clips[i], mean_pose_joints(data.stats)
    return {
        "v2m_mpjpe": root_relative_mpjpe(dec.v2m_joints[i], c.joints),
        "v2m_mpjpe_tokens": root_relative_mpjpe(SMPLMotion.from_features(dec.v2m_features[i]).joints, c.joints),
        "v2m_mpjpe_mean_pose": root_relative_mpjpe(mean_pose, c.joints),
        "v2m_mpjpe_depth_unknown": root_relative_mpjpe(without_depth(c.joints), c.joints),
        "v2m_2d_error": joint_error_2d(dec.v2m_joints[i], c.joints, c.height, c.width),
        "v2m_2d_error_mean_pose": joint_error_2d(mean_pose, c.joints, c.height, c.width),
        "v2m_2d_error_other_video": joint_error_2d(dec.v2m_joints[j], c.joints, c.height, c.width),
    }


def _render(joints: Tensor, colours_of: Clip) -> np.ndarray:
    return render_clip(joints, *colours_of.colours, colours_of.height, colours_of.width)


def _m2v_record(data: EvalData, dec: _Decoded, i: int, j: int) -> dict[str, float]:
    """Clip i's motion -> video scores against its own motion and clip j's."""
    c, video = data.clips[i], dec.m2v_video[i]
    fg = foreground_mask(video)
    own, other = mask_iou(fg, dec.gt_labels[i] > 0), mask_iou(fg, dec.gt_labels[j] > 0)
    return {
        "m2v_error": mean_abs_pixel_error(video, _render(c.joints, c)),
        "m2v_error_shuffled": mean_abs_pixel_error(video, _render(data.clips[j].joints, c)),
        "m2v_silhouette_iou": own,
        "m2v_silhouette_iou_shuffled": other,
        "m2v_pair_acc": pair_score(own, other),
    }


def _t2vm_record(data: EvalData, dec: _Decoded, i: int, j: int) -> dict[str, float]:
    """Clip i's caption -> video + motion: the video against its own motion (and sample j's), and the caption."""
    c, video = data.clips[i], dec.t2vm_video[i]
    fg = foreground_mask(video)
    own, other = mask_iou(fg, dec.t2vm_labels[i] > 0), mask_iou(fg, dec.t2vm_labels[j] > 0)
    colours = colour_accuracies(video, dec.t2vm_labels[i], c.colours)
    return {
        "t2vm_consistency": mean_abs_pixel_error(video, _render(dec.t2vm_joints[i], c)),
        "t2vm_consistency_mismatched": mean_abs_pixel_error(video, _render(dec.t2vm_joints[j], c)),
        **{f"t2vm_{part}_acc": colours[part] for part in ("background", "shirt", "trousers")},
        "t2vm_silhouette_iou": own,
        "t2vm_silhouette_iou_mismatched": other,
        "t2vm_pair_acc": pair_score(own, other),
    }


def score(data: EvalData, gen: Generated, seed: int) -> tuple[dict[str, float], dict[str, float], list[dict[str, Any]]]:
    """(metrics, checks, per-clip records): each metric is the mean over clips of its per-clip value; the chance levels
    are constants."""
    clips = data.clips
    perm = derangement(len(clips), seed)
    dec = _Decoded.of(data, gen)
    records: list[dict[str, Any]] = []
    checks: dict[str, list[float]] = {k: [] for k in CHECKS}
    for i, c in enumerate(clips):
        j = int(perm[i])
        records.append({
            "clip_id": c.clip_id,
            "caption": c.caption,
            **_v2m_record(data, dec, i, j),
            **_m2v_record(data, dec, i, j),
            **_t2vm_record(data, dec, i, j),
            "t2m_action": data.references.classify(dec.t2m_joints[i]),
        })
        records[-1]["t2m_action_acc"] = float(records[-1]["t2m_action"] == c.action)
        gt_video = data.codec.decode(c.latent[None])[0]
        checks["render_vs_gt_video_error"].append(mean_abs_pixel_error(_render(c.joints, c), gt_video))
        checks["fk_vs_gt_joints_mpjpe"].append(root_relative_mpjpe(fk_joints(data.layer, c.features), c.joints))
        checks["gt_silhouette_iou"].append(mask_iou(foreground_mask(gt_video), dec.gt_labels[i] > 0))
        checks["gt_action_acc"].append(float(data.references.classify(c.joints) == c.action))
    metrics = {m: CHANCE[m] if m in CHANCE else float(np.mean([r[m] for r in records])) for m in METRICS}
    return metrics, {k: float(np.mean(v)) for k, v in checks.items()}, records


def beats(value: float, baseline: float, higher_is_better: bool) -> bool:
    """Strictly better in the metric's direction (a tie does not beat its baseline)."""
    return bool(value > baseline) if higher_is_better else bool(value < baseline)


def build_report(data: EvalData, settings: EvalSettings, metrics: dict[str, float], checks: dict[str, float],
                 records: list[dict[str, Any]], checkpoint: Optional[str] = None) -> dict[str, Any]:
    """The JSON report: metrics (with baselines and chance levels), each metric's baselines and whether it beats all of
    them in its direction, directions, units, counts, settings, reference checks and per-clip values."""
    return {
        "checkpoint": checkpoint,
        "data": str(data.root),
        "split": data.split,
        "settings": asdict(settings),
        "counts": {"clips": len(data.clips), "frames": sum(c.motion.shape[0] for c in data.clips),
                   "batches": len(clip_batches(len(data.clips), settings.batch_size)),
                   "action_references": len(data.references.actions)},
        "metrics": metrics,
        "baselines": {m: list(b) for m, b in BASELINES.items()},
        "higher_is_better": dict(HIGHER_IS_BETTER),
        "better_than_baseline": {m: all(beats(metrics[m], metrics[b], HIGHER_IS_BETTER[m]) for b in bs)
                                 for m, bs in BASELINES.items()},
        "units": {**UNITS, **CHECK_UNITS},
        "descriptions": {d.name: d.description for d in METRIC_TABLE},
        "checks": checks,
        "per_clip": records,
    }


def evaluate(model: nn.Module, cfg: Config, data_dir: str | Path, settings: EvalSettings, *, split: str = "heldout",
             device: torch.device | str = "cpu", checkpoint: Optional[str] = None, vae_path: Optional[str] = None,
             progress: bool = False) -> dict[str, Any]:
    """Sample v2m / m2v / t2vm / t2m on a split's clips and score them; returns the report (see the module docstring).

    The model is put in eval mode (the sampler needs it).
    """
    data = EvalData.load(data_dir, split, cfg.text_len, settings.max_clips, vae_path)
    first = data.clips[0]
    if first.latent.shape[0] != cfg.model.in_channels:
        raise EvaluationError(f"the data's latents have {first.latent.shape[0]} channels but the model takes "
                              f"{cfg.model.in_channels}: evaluate with the dataset the model was trained on")
    if first.text.shape[-1] != cfg.model.text_dim:
        raise EvaluationError(f"the data's text embeddings are {first.text.shape[-1]}-d but the model takes "
                              f"{cfg.model.text_dim}-d: evaluate with the dataset the model was trained on")
    gen = generate(model.eval(), data, settings, device, progress)
    metrics, checks, records = score(data, gen, settings.seed)
    return build_report(data, settings, metrics, checks, records, checkpoint)
