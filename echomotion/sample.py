"""Sampling CLI: text -> video + motion, text -> motion, motion -> video, video -> motion, from an exported checkpoint.

    python -m echomotion.sample --checkpoint model.safetensors --task t2vm --prompt "a person ..."
    python -m echomotion.sample --checkpoint model.safetensors --data data/humove-mini --task m2v --clip hm-000005

Each sample gets a folder with `video.mp4` (decoded), `motion.npz` (SMPL), `skeleton.mp4` (the motion rendered),
`side_by_side.mp4`, `preview.gif` (the last two side by side, for reports) and `caption.txt`. The folder is named after the
clip id or the prompt (a slug of its first 60 characters); a name already taken in the run (a repeated --clip or prompt,
or two prompts that start alike) gets `-2`, `-3`, ... The export carries the codec and text-encoder identity, motion
statistics and null text of the data the model was trained with (`echomotion.export.DataAssets`), so t2vm and t2m need
nothing else; `--data` (the dataset folder) supplies the clips of m2v and v2m, and those files for an export written
before exports carried them.
"""
from __future__ import annotations

import argparse
import functools
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

import imageio.v3 as iio
import numpy as np
import torch

from .cli import user_errors
from .config import Config
from .data.encoders import TextEncoder, pad_text, text_encoder_from
from .data.schema import Sample
from .data.shards import iter_samples, motion_features
from .diffusion.sampler import GENERATED, TASKS, Request, sample
from .export import DataAssets, load_exported, read_data_assets
from .motion import SMPLMotion, render_skeleton, side_by_side


class UnknownClipError(KeyError):
    """A requested clip id is not in the split; the message lists some that are."""


@dataclass
class Generated:
    name: str
    caption: str
    video: Optional[np.ndarray]  # uint8 [F, H, W, 3]
    motion: Optional[SMPLMotion]
    given_video: Optional[np.ndarray] = None  # the condition, for side-by-side views
    given_motion: Optional[SMPLMotion] = None


class InferenceContext:
    """An exported model plus what its training data used: video codec, text encoder, motion stats, null text."""

    def __init__(self, checkpoint: str | Path, data: str | Path | None = None, device: str = "cpu",
                 vae_path: Optional[str] = None, text_encoder_path: Optional[str] = None):
        """`data`: the dataset folder, for clips (m2v, v2m); the export's own data files win over the folder's, since
        they are what the model was trained with. An old export without them needs `data`."""
        assets = read_data_assets(checkpoint) or (DataAssets.from_folder(data) if data is not None else None)
        if assets is None:
            raise ValueError(f"{checkpoint} was exported without its dataset's files (motion stats, null text, codec): "
                             "pass --data <dataset folder>, or re-export it with tools/export_checkpoint.py --data")
        model, cfg = load_exported(checkpoint, device=device)
        self._attach(model, cfg, assets, data, device, vae_path, text_encoder_path)

    @classmethod
    def for_model(cls, model: torch.nn.Module, cfg: Config, data: str | Path, device: str = "cpu") -> "InferenceContext":
        """A context around a model in memory (the trainer's sampling during training) instead of an exported file."""
        ctx = cls.__new__(cls)
        ctx._attach(model, cfg, DataAssets.from_folder(data), data, device, None, None)
        return ctx

    def _attach(self, model: torch.nn.Module, cfg: Config, assets: DataAssets, data: str | Path | None, device: str,
                vae_path: Optional[str], text_encoder_path: Optional[str]) -> None:
        self.assets, self.data = assets, None if data is None else Path(data)
        self.info = assets.info
        self.model, self.cfg = model, cfg
        self.device = torch.device(device)
        self.codec = assets.codec(vae_path, device=device)
        self._text_encoder_path = text_encoder_path
        self.stats = assets.stats()
        self.text_len = self.cfg.text_len
        self.null_text = self.pad_text([assets.null_text()])[0]
        self.fps = float(self.info["fps"])

    @functools.cached_property
    def text_encoder(self) -> TextEncoder:
        """Loaded on first use: sampling from stored embeddings (held-out clips) never needs it (umT5 is large)."""
        return text_encoder_from(self.info["text_encoder"], self._text_encoder_path, device=self.device)

    def pad_text(self, embeddings: Sequence[torch.Tensor]) -> torch.Tensor:
        """True-length embeddings -> [B, text_len, D], zero-padded like training batches (Wan leaves padding unmasked)."""
        return torch.stack([pad_text(e, self.text_len).float() for e in embeddings]).to(self.device)

    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.pad_text(self.text_encoder.encode(list(prompts)))

    def clips(self, split: str, ids: Optional[Sequence[str]] = None) -> list[Sample]:
        """Samples of a shard split, in id order (all of them, or the given ids; unknown ids are an error)."""
        if self.data is None:
            raise ValueError(f"clips come from a dataset folder: pass --data <dataset folder> (with its {split}/ split)")
        found = {s.clip_id: s for s in iter_samples(self.data / split)}
        if ids is None:
            return [found[k] for k in sorted(found)]
        missing = [i for i in ids if i not in found]
        if missing:
            raise UnknownClipError(f"clip ids {missing} not in {self.data / split}; available e.g. {sorted(found)[:5]}")
        return [found[i] for i in ids]

    def check_clip_frames(self, task: str, clips: Sequence[Sample]) -> None:
        """m2v takes its motion from the clips but the video shape from dataset.json; v2m its video from the clips but
        the motion length from dataset.json. A clip of another length would put the motion off the video in time."""
        want = int(self.info["num_frames"])
        got = {c.clip_id: int(c.joints.shape[0]) if task == "m2v" else int(c.num_frames) for c in clips}
        bad = {k: n for k, n in got.items() if n != want}
        if bad:
            raise ValueError(
                f"{task}: clips {bad} (id: {'motion' if task == 'm2v' else 'video'} frames) do not have the "
                f"num_frames={want} of {self.assets.source}'s dataset.json, which sets the other modality's length; pick clips "
                f"of {want} frames, or pass --data the dataset folder those clips came from"
            )

    def motion_of(self, s: Sample) -> torch.Tensor:
        return self.stats.normalize(motion_features(s)).float()

    def to_smpl(self, features: torch.Tensor) -> SMPLMotion:
        return SMPLMotion.from_features(self.stats.denormalize(features.float().cpu()), fps=self.fps)

    def stored_text(self, clips: Sequence[Sample]) -> torch.Tensor:
        """The clips' caption embeddings as stored in their shards, padded like training batches."""
        return self.pad_text([c.text_embedding for c in clips])

    def generate(self, task: str, *, prompts: Sequence[str] = (), clips: Sequence[Sample] = (), seed: int = 0,
                 overrides: Optional[dict] = None, text: Optional[torch.Tensor] = None) -> list[Generated]:
        """One batched sampling run. t2vm/t2m take prompts; m2v takes clips (their motion + caption); v2m takes clips
        (their video latent). `overrides`: SampleConfig fields replacing the config's `sample` section. `text`: the
        prompts' (t2vm, t2m) or clips' (m2v) embeddings [B, L, D] when already encoded (`stored_text`), so the text
        encoder is not needed."""
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}: choose one of {sorted(TASKS)}")
        settings = replace(self.cfg.sample, **(overrides or {}))
        frames = int(self.info["num_frames"])
        latent_shape = list(self.info["latent_shape"])
        if task in ("t2vm", "t2m"):
            if not prompts:
                raise ValueError(f"task {task} needs --prompt or --prompts")
            text = self.encode_text(prompts) if text is None else text
            request = Request(task, text, motion_frames=frames,
                              video_shape=[len(prompts), *latent_shape] if task == "t2vm" else None)
            names, captions, given = _unique([_slug(p) for p in prompts]), list(prompts), [None] * len(prompts)
        else:
            if not clips:
                raise ValueError(f"task {task} needs input clips (--clip ID)")
            self.check_clip_frames(task, clips)
            if task == "m2v":
                text = self.encode_text([c.caption for c in clips]) if text is None else text
                motion_cond = torch.stack([self.motion_of(c) for c in clips]).to(self.device)
                request = Request(task, text, motion_cond=motion_cond, video_shape=[len(clips), *latent_shape])
            else:
                missing = [c.clip_id for c in clips if c.video_latent is None]
                if missing:
                    raise ValueError(f"v2m needs clips with video; {missing} are motion-only")
                video_cond = torch.stack([c.video_latent.float() for c in clips]).to(self.device)
                request = Request(task, video_cond=video_cond, motion_frames=frames)
            names, captions, given = _unique([c.clip_id for c in clips]), [c.caption for c in clips], list(clips)
        generator = torch.Generator().manual_seed(seed)
        video, motion = sample(self.model, request, self.null_text, settings, generator=generator)
        out = []
        for i, name in enumerate(names):
            g = given[i]
            out.append(Generated(
                name=name,
                caption=captions[i],
                video=self.codec.decode(video[i : i + 1].float().cpu())[0] if video is not None else None,
                motion=self.to_smpl(motion[i]) if motion is not None else None,
                given_video=self.codec.decode(g.video_latent[None].float())[0] if (g is not None and task == "v2m") else None,
                given_motion=SMPLMotion(g.betas, g.global_orient, g.body_pose, g.transl, g.joints) if (g is not None and task == "m2v") else None,
            ))
        return out


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "prompt"


def _unique(names: Sequence[str]) -> list[str]:
    """Folder names, one per sample: a name seen before gets the first free `-2`, `-3`, ... suffix, so a repeated clip
    or prompt (another sample of it) or two prompts alike in their first 60 characters never overwrite each other."""
    taken: set[str] = set()
    out = []
    for name in names:
        unique, n = name, 1
        while unique in taken:
            n += 1
            unique = f"{name}-{n}"
        taken.add(unique)
        out.append(unique)
    return out


def skeleton_frames(motion: SMPLMotion, height: int, width: int) -> np.ndarray:
    return render_skeleton(motion.joints, height, width, background=(0, 0, 0))


def write_outputs(g: Generated, out_dir: Path, fps: float, scale: int = 4) -> Path:
    """video.mp4, motion.npz, skeleton.mp4, side_by_side.mp4 and preview.gif for one sample."""
    d = out_dir / g.name
    d.mkdir(parents=True, exist_ok=True)
    video = g.video if g.video is not None else g.given_video
    motion = g.motion if g.motion is not None else g.given_motion
    h, w = (video.shape[1], video.shape[2]) if video is not None else (64, 64)
    if g.video is not None:
        _write_video(d / "video.mp4", g.video, fps, scale)
    if g.motion is not None:
        g.motion.to_npz(d / "motion.npz")
    panels = []
    if video is not None:
        panels.append(video)
    if motion is not None:
        skel = skeleton_frames(motion, h, w)
        _write_video(d / "skeleton.mp4", skel, fps, scale)
        panels.append(skel)
    both = panels[0] if len(panels) == 1 else side_by_side(panels[0], panels[1])
    _write_video(d / "side_by_side.mp4", both, fps, scale)
    iio.imwrite(d / "preview.gif", _upscale(both, scale), duration=1000 / fps, loop=0)
    (d / "caption.txt").write_text(g.caption + "\n")
    return d


def _upscale(frames: np.ndarray, scale: int) -> np.ndarray:
    return frames.repeat(scale, axis=1).repeat(scale, axis=2)


def _write_video(path: Path, frames: np.ndarray, fps: float, scale: int) -> None:
    iio.imwrite(path, _upscale(frames, scale), fps=fps, codec="libx264")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Sample EchoMotion from an exported checkpoint")
    p.add_argument("--checkpoint", required=True, help="exported .safetensors (tools/export_checkpoint.py)")
    p.add_argument("--data", help="dataset folder: the clips of m2v and v2m (--split); for an export without its "
                                  "dataset's files also dataset.json, motion_stats.json, null_text.pt")
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--prompt", action="append", default=[], help="text prompt (t2vm, t2m); repeatable")
    p.add_argument("--prompts", help="file with one prompt per line")
    p.add_argument("--clip", action="append", default=[], help="clip id from --split (m2v, v2m); repeatable")
    p.add_argument("--split", default="heldout")
    p.add_argument("--out", default="samples")
    p.add_argument("--steps", type=int)
    p.add_argument("--shift", type=float)
    p.add_argument("--solver", choices=["euler", "heun"])
    p.add_argument("--text-guidance", type=float, help="omega_1")
    p.add_argument("--condition-guidance", type=float, help="omega_2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--vae-path")
    p.add_argument("--text-encoder-path")
    a = p.parse_args(argv)
    # ValueError: a missing or unusable input (--prompt, --clip, clip lengths, the checkpoint).
    with user_errors("sample", ValueError, UnknownClipError, FileNotFoundError):
        ctx = InferenceContext(a.checkpoint, a.data, a.device, a.vae_path, a.text_encoder_path)
        prompts = list(a.prompt) + ([ln.strip() for ln in Path(a.prompts).read_text().splitlines() if ln.strip()] if a.prompts else [])
        overrides = {k: v for k, v in dict(steps=a.steps, shift=a.shift, solver=a.solver, text_guidance=a.text_guidance,
                                           condition_guidance=a.condition_guidance).items() if v is not None}
        clips = ctx.clips(a.split, a.clip) if a.task in ("m2v", "v2m") else []
        generated = ctx.generate(a.task, prompts=prompts, clips=clips, seed=a.seed, overrides=overrides)
    for g in generated:
        print(f"{a.task}: {write_outputs(g, Path(a.out) / a.task, ctx.fps)}  ({', '.join(GENERATED[a.task])} generated)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
