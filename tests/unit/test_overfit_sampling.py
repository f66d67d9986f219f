"""Sampling reproduces what training learned: the real trainer overfits two HuMoVe-mini clips (16 x 16 pixels, 5 frames,
the demo's PCA codec and position aid), the export is sampled with each clip's own conditions (t2vm from its caption, m2v
from its motion, v2m from its video), and the samples must match the clips: pixels within a few levels, motion far
below the mean pose.

The reference is the training data itself (each clip's stored latents, decoded). The thresholds were measured (see
docs/PERFORMANCE.md, "the sampling-level test"): each sits between what the trained path gives and what a broken one
gives, and the test shows the broken side too: the same model sampled with the timestep scale forgotten (sigma where the
model expects 1000 * sigma, a classic sampler bug) fails every threshold. A tiny model without the position aid
(`model.abs_pos=none`, RoPE only) fails the video thresholds as well (measured, not run here: it doubles the cost).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from echomotion.config import load_config
from echomotion.data.synthetic import generate_humove_mini
from echomotion.distributed import DistEnv
from echomotion.evaluate import joint_error_2d, mean_pose_joints
from echomotion.export import export_checkpoint
from echomotion.sample import InferenceContext
from echomotion.train import Trainer
import echomotion.diffusion.sampler as sampler

ROOT = Path(__file__).resolve().parents[2]
SIZE, FRAMES, STEPS = 16, 5, 600  # 16 x 16 pixels, 5 frames: 128 video + 255 motion tokens per clip
SAMPLING = dict(steps=12, text_guidance=1.0, condition_guidance=1.0)
# Measured (docs/PERFORMANCE.md): trained 4.8-5.3 pixel levels and 0.17-0.19x the mean pose's 2-D error; the broken
# sampler below 10.5-12.7 levels and 0.43-0.64x; the same model with RoPE only (model.abs_pos=none) fails too.
VIDEO_MAX_ERROR = 8.0  # mean abs pixel error on [0, 255] against the clip's decoded video
MOTION_MAX_FRACTION = 0.35  # 2-D joint error as a fraction of the mean pose's (the issue asks <= 0.5x for v2m)


@pytest.fixture(scope="module")
def overfit(tmp_path_factory: pytest.TempPathFactory) -> InferenceContext:
    return train_and_export(tmp_path_factory.mktemp("overfit"))


def train_and_export(root: Path, *overrides: str) -> InferenceContext:
    """Overfit the two clips with the real Trainer in this process; the exported model in an inference context."""
    data = root / "data"
    generate_humove_mini(data, clips=2, num_frames=FRAMES, height=SIZE, width=SIZE, heldout_fraction=0.0, codec="pca",
                         progress=False)
    cfg = load_config(ROOT / "configs/tiny.yaml", [
        f"data.path={data / 'train'}", f"data.stats_path={data / 'motion_stats.json'}",
        f"data.null_text_path={data / 'null_text.pt'}", "data.batch_size=2", "data.num_workers=0",
        "model.in_channels=16", "model.out_channels=16",  # the demo's PCA codec
        f"train.run_dir={root / 'run'}", "train.phase=2", f"train.steps={STEPS}", "train.lr=3e-3",
        "train.warmup_steps=20", "train.schedule=cosine", "train.min_lr_ratio=0.05", "train.checkpoint_every=100000",
        "train.progress=false", "diffusion.shift=1", *overrides,
    ])
    Trainer(cfg, DistEnv(0, 1, 0, torch.device("cpu"))).run()
    checkpoint = sorted((root / "run" / "checkpoints").glob("step-*[0-9]"))[-1]
    return InferenceContext(export_checkpoint(checkpoint, root / "model.safetensors"), data)  # the export round trip


def _pixel_error(generated: np.ndarray, truth: np.ndarray) -> float:
    return float(np.abs(generated.astype(np.int16) - truth.astype(np.int16)).mean())


def sampling_errors(ctx: InferenceContext) -> dict[str, list[float]]:
    """Per clip: video pixel errors (t2vm, m2v) and 2-D joint errors in pixels (t2vm, v2m), with the mean pose's."""
    clips = ctx.clips("train")
    truth = [ctx.codec.decode(c.video_latent[None].float())[0] for c in clips]
    mean_pose = mean_pose_joints(ctx.stats)

    def error_2d(joints: torch.Tensor, clip) -> float:
        return joint_error_2d(joints, clip.joints, SIZE, SIZE)

    t2vm = ctx.generate("t2vm", prompts=[c.caption for c in clips], overrides=SAMPLING)
    m2v = ctx.generate("m2v", clips=clips, overrides=SAMPLING)
    v2m = ctx.generate("v2m", clips=clips, overrides=SAMPLING)
    return {
        "t2vm_video": [_pixel_error(g.video, t) for g, t in zip(t2vm, truth)],
        "m2v_video": [_pixel_error(g.video, t) for g, t in zip(m2v, truth)],
        "t2vm_motion": [error_2d(g.motion.joints, c) for g, c in zip(t2vm, clips)],
        "v2m_motion": [error_2d(g.motion.joints, c) for g, c in zip(v2m, clips)],
        "mean_pose": [error_2d(mean_pose, c) for c in clips],
    }


def test_samples_reproduce_the_overfit_clips(overfit: InferenceContext):
    e = sampling_errors(overfit)
    print({k: [round(v, 2) for v in vs] for k, vs in e.items()})
    assert max(e["t2vm_video"]) < VIDEO_MAX_ERROR and max(e["m2v_video"]) < VIDEO_MAX_ERROR, e
    for task in ("t2vm_motion", "v2m_motion"):
        assert all(err < MOTION_MAX_FRACTION * base for err, base in zip(e[task], e["mean_pose"])), e


def test_a_broken_sampler_fails_the_same_thresholds(overfit: InferenceContext, monkeypatch: pytest.MonkeyPatch):
    """The thresholds can fail: forgetting the timestep scale (the model sees sigma, not 1000 * sigma) breaks every task."""
    monkeypatch.setattr(sampler, "to_timestep", lambda sigma, num_train_timesteps=1000: sigma)
    e = sampling_errors(overfit)
    print({k: [round(v, 2) for v in vs] for k, vs in e.items()})
    assert min(e["t2vm_video"]) > VIDEO_MAX_ERROR and min(e["m2v_video"]) > VIDEO_MAX_ERROR, e
    for task in ("t2vm_motion", "v2m_motion"):
        assert all(err > MOTION_MAX_FRACTION * base for err, base in zip(e[task], e["mean_pose"])), e
