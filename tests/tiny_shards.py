"""Tiny HuMoVe-schema MDS datasets for data-loading tests: random tensors, many small shards, motion stats beside them."""
from __future__ import annotations

import zlib
from pathlib import Path
from typing import Optional, Sequence

import torch

from echomotion.data.schema import COLUMNS, Sample, encode_sample
from echomotion.motion.smpl import MotionStats, SMPLMotion


def tiny_sample(
    clip_id: str, *, frames: int, latent_shape: Optional[Sequence[int]], text_tokens: int, text_dim: int, seed: int
) -> Sample:
    g = torch.Generator().manual_seed(seed)
    return Sample(
        clip_id=clip_id,
        source="test",
        category="test",
        caption=f"caption of {clip_id}",
        fps=24.0,
        num_frames=frames,
        height=64,
        width=64,
        video_latent=None if latent_shape is None else torch.randn(*latent_shape, generator=g),
        text_embedding=torch.randn(text_tokens, text_dim, generator=g),
        betas=torch.randn(10, generator=g).expand(frames, 10),
        global_orient=torch.randn(frames, 3, generator=g) * 0.3,
        body_pose=torch.randn(frames, 23, 3, generator=g) * 0.3,
        transl=torch.randn(frames, 3, generator=g),
        joints=torch.randn(frames, 24, 3, generator=g),
    )


def write_tiny_shards(
    out: str | Path,
    num: int,
    *,
    prefix: str = "clip",
    frames: int | Sequence[int] = 17,
    latent_shape: Optional[Sequence[int]] = (16, 5, 8, 8),
    text_tokens: int = 7,
    text_dim: int = 32,
    samples_per_shard: int = 2,
    hashes: Optional[list[str]] = None,
    with_stats: bool = True,
) -> list[Sample]:
    """Write `num` samples as MDS shards of about `samples_per_shard` each (latent_shape None = motion-only);
    also motion_stats.json when `with_stats`. Returns the samples in write order."""
    from streaming import MDSWriter

    out = Path(out)
    frame_counts = [frames] * num if isinstance(frames, int) else list(frames)
    samples = [
        tiny_sample(
            f"{prefix}{i:04d}",
            frames=frame_counts[i],
            latent_shape=latent_shape,
            text_tokens=text_tokens,
            text_dim=text_dim,
            seed=zlib.crc32(prefix.encode()) % 1000 + i,
        )
        for i in range(num)
    ]
    records = [encode_sample(s) for s in samples]
    smpl_floats = 10 + 3 + 23 * 3 + 3 + 24 * 3
    per_sample = max(len(r["video_latent"]) for r in records) + 4 * smpl_floats * max(frame_counts)
    per_sample += 2 * text_tokens * text_dim + 1024  # + strings, scalars, MDS size headers
    size_limit = per_sample * samples_per_shard + per_sample // 2
    with MDSWriter(out=str(out), columns=COLUMNS, hashes=hashes, size_limit=size_limit) as w:
        for r in records:
            w.write(r)
    if with_stats:
        feats = [SMPLMotion(s.betas, s.global_orient, s.body_pose, s.transl, s.joints).to_features() for s in samples]
        MotionStats.compute(feats).save(out / "motion_stats.json")
    return samples


# A three-source mixture: two paired buckets of different latent shapes and a motion-only source of varying lengths.
# name (also the clip id prefix) -> (kind, samples, latent shape, frames)
MIXTURE: dict[str, tuple[str, int, Optional[tuple[int, ...]], int | list[int]]] = {
    "big": ("paired", 16, (16, 5, 8, 8), 17),
    "small": ("paired", 12, (16, 3, 4, 4), 9),
    "mo": ("motion_only", 12, None, [9 + i % 7 for i in range(12)]),
}


def write_mixture(root: Path) -> None:
    """The MIXTURE sources as folders root/<name>, each with its motion_stats.json."""
    for name, (_, num, latent, frames) in MIXTURE.items():
        write_tiny_shards(root / name, num, prefix=name, latent_shape=latent, frames=frames)


def mixture_override(root: Path, weights: Optional[dict[str, float]] = None) -> str:
    """The data.sources override listing the MIXTURE folders under root (with these weights, if given)."""
    entries = [f"{{path: {root / name}, kind: {kind}" + (f", weight: {weights[name]}}}" if weights else "}")
               for name, (kind, *_) in MIXTURE.items()]
    return f"data.sources=[{', '.join(entries)}]"


def mixture_source(clip_id: str) -> str:
    """The MIXTURE source a clip id comes from."""
    return next(name for name in MIXTURE if clip_id.startswith(name))
