"""Held-out evaluation on HuMoVe-mini: does each task follow its conditioning, and better than a trivial answer?

Because HuMoVe-mini videos are a pure function of the motion and the caption's colours (`synthetic.render_clip`), every
task can be scored against an exact reference:

- `v2m_mpjpe`: motion sampled from the clean video latent (task v2m), denormalized, decoded to SMPL parameters and posed by
  forward kinematics through the dataset's SMPL file, vs the ground-truth joints. Root-relative MPJPE: the pelvis is
  subtracted per frame, then the Euclidean joint error is averaged over frames and joints and multiplied by 1000. Lengths
  in HuMoVe-mini are metres, so the value is in millimetres ("mm-equivalent": for other data it is 1000 x its length
  unit). Baseline `v2m_mpjpe_mean_pose`: the dataset's mean pose for every frame, i.e. the training motion's mean joint
  positions (`mean_pose_joints`). `v2m_mpjpe_tokens` scores the model's directly predicted joint-position tokens instead of FK (a diagnostic: the
  two should agree when the model is self-consistent). `v2m_mpjpe_depth_unknown` is a reference, not a baseline: the
  ground truth with every joint's depth (camera axis, z) set to the pelvis's, i.e. the score of a reader that gets every
  joint's image position exactly but cannot tell depth. HuMoVe-mini's camera is orthographic, so depth shows only through
  occlusion order and bone lengths; the value says how much of the metric is depth.
- `m2v_error`: video sampled from the ground-truth motion + caption (m2v), decoded with the dataset's codec to uint8, vs
  `render_clip(gt joints, caption colours)`; mean absolute pixel error on [0, 255]. Baseline `m2v_error_shuffled`: the
  same videos vs renderings of other clips' motions (a fixed derangement) in the generated clip's colours, so only the
  motion differs.
- `t2vm_consistency`: video + motion sampled jointly from the caption (t2vm); the generated motion is rendered with the
  caption's colours (FK joints, as for v2m: the SMPL body the parameters describe, not the auxiliary joint tokens) and
  compared with the generated video (mean absolute pixel error). Baseline `t2vm_consistency_mismatched`: generated video i
  vs the rendering of generated motion j (the derangement), in clip i's colours.

Every metric is lower-is-better; a clip-level value is averaged over its frames, the reported value over clips.
`checks` records the reference's own error (render of the ground-truth joints vs the decoded ground-truth video, FK of
the ground-truth parameters vs the stored joints): both are 0 for pixel-codec HuMoVe-mini, and anything else means the
references above are off by that much.

Sampling is batched over consecutive clips (all clips share one shape: the baselines compare clips pairwise). The noise
of each (task, batch) comes from its own generator seeded by (seed, task, batch index), so results are deterministic for a
seed and batch size.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .config import Config, SampleConfig
from .data.encoders import PixelCodec, VideoCodec, build_video_codec, pad_text
from .data.shards import iter_samples, motion_features
from .data.synthetic import COLOURS, render_clip
from .diffusion.sampler import SOLVERS, sample
from .motion import MotionStats, SMPLLayer, SMPLMotion

MM_PER_UNIT = 1000.0
MPJPE_UNITS = ("mm-equivalent: root-relative MPJPE (pelvis subtracted per frame) in the data's length unit x 1000; "
               "HuMoVe-mini lengths are metres, so millimetres")
PIXEL_UNITS = "mean absolute pixel error of uint8 RGB frames, on [0, 255]"
# metric -> its baseline; every metric and baseline is lower-is-better.
BASELINES: dict[str, str] = {
    "v2m_mpjpe": "v2m_mpjpe_mean_pose",
    "v2m_mpjpe_tokens": "v2m_mpjpe_mean_pose",
    "m2v_error": "m2v_error_shuffled",
    "t2vm_consistency": "t2vm_consistency_mismatched",
}
METRICS: tuple[str, ...] = (
    "v2m_mpjpe", "v2m_mpjpe_tokens", "v2m_mpjpe_mean_pose", "v2m_mpjpe_depth_unknown",
    "m2v_error", "m2v_error_shuffled", "t2vm_consistency", "t2vm_consistency_mismatched",
)
UNITS: dict[str, str] = {m: MPJPE_UNITS if m.startswith("v2m") else PIXEL_UNITS for m in METRICS}
CHECKS: tuple[str, ...] = ("render_vs_gt_video_error", "fk_vs_gt_joints_mpjpe")
TASK_ORDER: tuple[str, ...] = ("v2m", "m2v", "t2vm")

_CAPTION = re.compile(
    r"^a person in an? (?P<shirt>\w+) shirt and (?P<trousers>\w+) trousers .+ on an? (?P<background>\w+) background$"
)


class EvaluationError(ValueError):
    """The data or model cannot be evaluated; the message says what is wrong and what to pass instead."""


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
        keys = ("steps", "shift", "solver", "text_guidance", "condition_guidance", "seed")
        base = {k: getattr(sample_cfg, k) for k in keys}
        return cls(**{**base, **{k: v for k, v in overrides.items() if v is not None}})

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
# Metric functions


def root_relative_mpjpe(pred: Tensor | np.ndarray, gt: Tensor | np.ndarray, root: int = 0) -> float:
    """Mean per-joint position error after subtracting joint `root` (the pelvis) per frame, x 1000 (mm-equivalent).

    pred and gt are [F, J, 3] (pred may be [1, J, 3], one pose for every frame). Root-relative, so a global translation of
    either does not change it: V2M is judged on the pose, not on where the body stands.
    """
    p, g = np.asarray(pred, np.float64), np.asarray(gt, np.float64)
    if p.ndim != 3 or g.ndim != 3 or p.shape[1:] != g.shape[1:] or p.shape[-1] != 3 or p.shape[0] not in (1, g.shape[0]):
        raise ValueError(f"joints must be [F, J, 3] (pred [1, J, 3] allowed), got pred {p.shape} and gt {g.shape}")
    p = p - p[:, root : root + 1]
    g = g - g[:, root : root + 1]
    return float(np.linalg.norm(p - g, axis=-1).mean() * MM_PER_UNIT)


def without_depth(joints: Tensor, root: int = 0) -> Tensor:
    """Joints [F, J, 3] with each joint's z (the camera axis of HuMoVe-mini's fixed camera) replaced by the root's."""
    flat = joints.clone()
    flat[..., 2] = joints[:, root : root + 1, 2]
    return flat


def mean_abs_pixel_error(a: np.ndarray, b: np.ndarray) -> float:
    """Mean |a - b| of two uint8 videos [F, H, W, 3], on [0, 255] (computed in a wide type: uint8 would wrap around)."""
    if a.shape != b.shape:
        raise ValueError(f"videos differ in shape: {a.shape} vs {b.shape}")
    if a.dtype != np.uint8 or b.dtype != np.uint8:
        raise ValueError(f"videos must be uint8, got {a.dtype} and {b.dtype}")
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


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


def parse_caption_colours(caption: str) -> tuple[str, str, str]:
    """(shirt, trousers, background) named by a HuMoVe-mini caption; the reference renderer needs them."""
    m = _CAPTION.match(caption.strip())
    if m is None:
        raise EvaluationError(
            f"caption {caption!r} is not a HuMoVe-mini caption ('a person in a <colour> shirt and <colour> trousers "
            "<verb> on a <colour> background'): this evaluation renders reference videos from the caption's colours, so it "
            "needs HuMoVe-mini data (tools/make_humove_mini.py)"
        )
    colours = (m["shirt"], m["trousers"], m["background"])
    unknown = [c for c in colours if c not in COLOURS]
    if unknown:
        raise EvaluationError(
            f"caption {caption!r} names unknown colours {unknown}; HuMoVe-mini colours are {sorted(COLOURS)}"
        )
    return colours


# ---------------------------------------------------------------------------------------------------------------------
# Data


@dataclass
class Clip:
    """One held-out clip as the evaluation uses it."""

    clip_id: str
    caption: str
    colours: tuple[str, str, str]
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
class EvalData:
    """A dataset folder's held-out clips plus what scoring needs: motion statistics, SMPL layer, codec, null text."""

    root: Path
    split: str
    clips: list[Clip]
    stats: MotionStats
    layer: SMPLLayer
    codec: VideoCodec
    null_text: Tensor  # [text_len, D] float32

    @classmethod
    def load(cls, root: str | Path, split: str, text_len: int, max_clips: Optional[int] = None,
             vae_path: Optional[str] = None) -> "EvalData":
        root = Path(root)
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
        stats = MotionStats.load(root / info["motion_stats"])
        null = pad_text(torch.load(root / info["null_text"], weights_only=True), text_len).float()
        layer = SMPLLayer(root / info["smpl_model"])
        codec = _codec(info["video_codec"], vae_path)
        clips: list[Clip] = []
        for s in iter_samples(root / split):
            if max_clips is not None and len(clips) >= max_clips:
                break
            if s.video_latent is None:
                raise EvaluationError(f"{root / split}: sample {s.clip_id!r} has no video; evaluate a paired split")
            features = motion_features(s).float()
            clips.append(Clip(
                clip_id=s.clip_id, caption=s.caption, colours=parse_caption_colours(s.caption), height=s.height,
                width=s.width, latent=s.video_latent.float(), motion=stats.normalize(features).float(),
                features=features, joints=s.joints.float(), text=pad_text(s.text_embedding, text_len).float(),
            ))
        if len(clips) < 2:
            raise EvaluationError(f"{root / split} has {len(clips)} paired clips; the evaluation needs at least 2")
        shapes = sorted({c.shape_key for c in clips})
        if len(shapes) > 1:
            raise EvaluationError(
                f"{root / split} mixes clip shapes {shapes} (latent C, F, H, W, frames, height, width): the baselines "
                "compare clips pairwise, so evaluate one shape bucket at a time"
            )
        return cls(root, split, clips, stats, layer, codec, null)


def _codec(desc: dict[str, Any], vae_path: Optional[str]) -> VideoCodec:
    """Rebuild the dataset's video codec from its dataset.json description (a moved Wan VAE: pass vae_path)."""
    if desc.get("name") == "pixel":
        return PixelCodec(int(desc.get("spatial", 2)))
    return build_video_codec(desc.get("name", "?"), vae_path or desc.get("path"))


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
    """Per clip, what the model produced: v2m motion, m2v video latent, t2vm video latent + motion (normalized motion)."""

    v2m_motion: list[Tensor]
    m2v_video: list[Tensor]
    t2vm_video: list[Tensor]
    t2vm_motion: list[Tensor]


def _generator(seed: int, task: str, batch: int) -> torch.Generator:
    """Independent noise per (seed, task, batch): a task's samples do not depend on which other tasks ran."""
    state = np.random.SeedSequence([seed, TASK_ORDER.index(task), batch]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


@torch.no_grad()
def generate(model: nn.Module, data: EvalData, settings: EvalSettings, device: torch.device | str = "cpu",
             progress: bool = False) -> Generated:
    """Sample all three tasks for every clip, batched over consecutive clips."""
    device = torch.device(device)
    batches = clip_batches(len(data.clips), settings.batch_size)
    out = Generated([], [], [], [])
    kw = dict(steps=settings.steps, shift=settings.shift, solver=settings.solver, text_guidance=settings.text_guidance,
              condition_guidance=settings.condition_guidance)
    null = data.null_text.to(device)
    bar = tqdm(total=len(batches) * len(TASK_ORDER), desc="evaluate", unit="batch", disable=not progress)
    try:
        for b, idx in enumerate(batches):
            clips = [data.clips[i] for i in idx]
            video = torch.stack([c.latent for c in clips]).to(device)
            motion = torch.stack([c.motion for c in clips]).to(device)
            text = torch.stack([c.text for c in clips]).to(device)
            frames = motion.shape[1]
            _, v2m = sample(model, "v2m", None, null, video_cond=video, motion_frames=frames,
                            generator=_generator(settings.seed, "v2m", b), **kw)
            bar.update()
            m2v, _ = sample(model, "m2v", text, null, video_shape=video.shape, motion_cond=motion,
                            generator=_generator(settings.seed, "m2v", b), **kw)
            bar.update()
            t2v, t2m = sample(model, "t2vm", text, null, video_shape=video.shape, motion_frames=frames,
                              generator=_generator(settings.seed, "t2vm", b), **kw)
            bar.update()
            for results, batch in ((out.v2m_motion, v2m), (out.m2v_video, m2v), (out.t2vm_video, t2v),
                                   (out.t2vm_motion, t2m)):
                results.extend(batch.float().cpu().unbind(0))
    finally:
        bar.close()
    return out


def _finite(x: Tensor, what: str, clip_id: str) -> Tensor:
    if not bool(torch.isfinite(x).all()):
        raise EvaluationError(f"the model generated non-finite {what} for clip {clip_id!r}; check the checkpoint")
    return x


def score(data: EvalData, gen: Generated, seed: int) -> tuple[dict[str, float], dict[str, float], list[dict[str, Any]]]:
    """(metrics, checks, per-clip records): each metric is the mean over clips of its per-clip value."""
    clips = data.clips
    perm = derangement(len(clips), seed)
    mean_pose = mean_pose_joints(data.stats)

    def decode(latent: Tensor) -> np.ndarray:
        return data.codec.decode(latent[None])[0]

    m2v_video = [decode(_finite(z, "m2v video", c.clip_id)) for z, c in zip(gen.m2v_video, clips)]
    t2vm_video = [decode(_finite(z, "t2vm video", c.clip_id)) for z, c in zip(gen.t2vm_video, clips)]
    t2vm_joints = [fk_joints(data.layer, data.stats.denormalize(_finite(m, "t2vm motion", c.clip_id)))
                   for m, c in zip(gen.t2vm_motion, clips)]

    def render(joints: Tensor, colours_of: Clip) -> np.ndarray:
        return render_clip(joints, *colours_of.colours, colours_of.height, colours_of.width)

    records: list[dict[str, Any]] = []
    checks: dict[str, list[float]] = {k: [] for k in CHECKS}
    for i, c in enumerate(clips):
        j = int(perm[i])
        v2m = data.stats.denormalize(_finite(gen.v2m_motion[i], "v2m motion", c.clip_id))
        gt_render = render(c.joints, c)
        records.append({
            "clip_id": c.clip_id,
            "caption": c.caption,
            "v2m_mpjpe": root_relative_mpjpe(fk_joints(data.layer, v2m), c.joints),
            "v2m_mpjpe_tokens": root_relative_mpjpe(SMPLMotion.from_features(v2m).joints, c.joints),
            "v2m_mpjpe_mean_pose": root_relative_mpjpe(mean_pose, c.joints),
            "v2m_mpjpe_depth_unknown": root_relative_mpjpe(without_depth(c.joints), c.joints),
            "m2v_error": mean_abs_pixel_error(m2v_video[i], gt_render),
            "m2v_error_shuffled": mean_abs_pixel_error(m2v_video[i], render(clips[j].joints, c)),
            "t2vm_consistency": mean_abs_pixel_error(t2vm_video[i], render(t2vm_joints[i], c)),
            "t2vm_consistency_mismatched": mean_abs_pixel_error(t2vm_video[i], render(t2vm_joints[j], c)),
        })
        checks["render_vs_gt_video_error"].append(mean_abs_pixel_error(gt_render, decode(c.latent)))
        checks["fk_vs_gt_joints_mpjpe"].append(root_relative_mpjpe(fk_joints(data.layer, c.features), c.joints))
    metrics = {m: float(np.mean([r[m] for r in records])) for m in METRICS}
    return metrics, {k: float(np.mean(v)) for k, v in checks.items()}, records


def build_report(data: EvalData, settings: EvalSettings, metrics: dict[str, float], checks: dict[str, float],
                 records: list[dict[str, Any]], checkpoint: Optional[str] = None) -> dict[str, Any]:
    """The JSON report: metrics, their baselines and whether each beats its baseline, counts, settings, units, checks."""
    return {
        "checkpoint": checkpoint,
        "data": str(data.root),
        "split": data.split,
        "settings": asdict(settings),
        "counts": {"clips": len(data.clips), "frames": sum(c.motion.shape[0] for c in data.clips),
                   "batches": len(clip_batches(len(data.clips), settings.batch_size))},
        "metrics": metrics,
        "baselines": BASELINES,
        "better_than_baseline": {m: metrics[m] < metrics[b] for m, b in BASELINES.items()},
        "units": {**UNITS, **{k: MPJPE_UNITS if "mpjpe" in k else PIXEL_UNITS for k in CHECKS}},
        "lower_is_better": True,
        "checks": checks,
        "per_clip": records,
    }


def evaluate(model: nn.Module, cfg: Config, data_dir: str | Path, settings: EvalSettings, *, split: str = "heldout",
             device: torch.device | str = "cpu", checkpoint: Optional[str] = None, vae_path: Optional[str] = None,
             progress: bool = False) -> dict[str, Any]:
    """Sample v2m / m2v / t2vm on a split's clips and score them; returns the report (see the module docstring).

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
