"""One HuMoVe training sample as MDS columns (mosaicml-streaming), and its typed in-memory form.

Video latents are stored as raw bytes + dtype + shape (MDS cannot hold bfloat16); motion-only samples (Phase 1 data such as
HumanML3D-style clips) carry an empty latent and `has_video = 0`. Version 2 adds the model's [F, 235] motion features,
computed once when the record is written, so the loader does not convert axis-angle to 6D rotations on every read (a
third of a Phase 1 sample's CPU cost); version 1 records are still read and their features computed on the fly. Every
record has `schema_version`; a reader meeting a version it does not know stops with an error instead of guessing.
Documented in docs/data.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from echomotion.motion.smpl import MOTION_FEATURE_DIM, SMPLMotion

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1: no motion_features column (computed when read)

COLUMNS: dict[str, str] = {
    "schema_version": "int",
    "clip_id": "str",
    "source": "str",
    "category": "str",
    "caption": "str",
    "fps": "float32",
    "num_frames": "int",
    "height": "int",
    "width": "int",
    "has_video": "int",
    "video_latent": "bytes",
    "video_latent_dtype": "str",
    "video_latent_shape": "str",
    "text_embedding": "ndarray:float16",
    "text_length": "int",
    "betas": "ndarray:float32",
    "global_orient": "ndarray:float32",
    "body_pose": "ndarray:float32",
    "transl": "ndarray:float32",
    "joints": "ndarray:float32",
    "motion_features": "ndarray:float32",
}

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class SchemaError(ValueError):
    """A record this code cannot read; the message says what and how to fix it."""


@dataclass
class Sample:
    """A decoded record. `video_latent` is [C, F_lat, H_lat, W_lat] or None; SMPL arrays are per frame."""

    clip_id: str
    source: str
    category: str
    caption: str
    fps: float
    num_frames: int
    height: int
    width: int
    video_latent: Optional[torch.Tensor]
    text_embedding: torch.Tensor  # [text_length, text_dim] (true length, unpadded)
    betas: torch.Tensor  # [F, 10]
    global_orient: torch.Tensor  # [F, 3] axis-angle
    body_pose: torch.Tensor  # [F, 23, 3] axis-angle
    transl: torch.Tensor  # [F, 3]
    joints: torch.Tensor  # [F, 24, 3]
    motion_features: Optional[torch.Tensor] = None  # [F, 235] float32; None: computed from the SMPL fields when needed

    def features(self) -> torch.Tensor:
        """The [F, 235] float32 motion features: the stored ones, else computed (and kept) from the SMPL fields."""
        if self.motion_features is None:
            motion = SMPLMotion(self.betas, self.global_orient, self.body_pose, self.transl, self.joints)
            self.motion_features = motion.to_features().float()
        return self.motion_features


def encode_sample(s: Sample, latent_dtype: str = "float16") -> dict[str, Any]:
    """Sample -> MDS record (latent cast to `latent_dtype`: float16, bfloat16 or float32)."""
    if latent_dtype not in _DTYPES:
        raise SchemaError(f"latent dtype {latent_dtype!r} not supported; choose one of {sorted(_DTYPES)}")
    if s.video_latent is not None:
        lat = s.video_latent.detach().to(_DTYPES[latent_dtype]).contiguous().cpu()
        raw = lat.view(torch.uint8).numpy().tobytes() if lat.dtype == torch.bfloat16 else lat.numpy().tobytes()
        shape = ",".join(str(d) for d in lat.shape)
    else:
        raw, shape = b"", ""
    return {
        "schema_version": SCHEMA_VERSION,
        "clip_id": s.clip_id,
        "source": s.source,
        "category": s.category,
        "caption": s.caption,
        "fps": np.float32(s.fps),
        "num_frames": int(s.num_frames),
        "height": int(s.height),
        "width": int(s.width),
        "has_video": int(s.video_latent is not None),
        "video_latent": raw,
        "video_latent_dtype": latent_dtype,
        "video_latent_shape": shape,
        "text_embedding": s.text_embedding.detach().to(torch.float16).cpu().numpy(),
        "text_length": int(s.text_embedding.shape[0]),
        "betas": _f32(s.betas),
        "global_orient": _f32(s.global_orient),
        "body_pose": _f32(s.body_pose),
        "transl": _f32(s.transl),
        "joints": _f32(s.joints),
        "motion_features": _f32(s.features()),
    }


def decode_sample(rec: dict[str, Any]) -> Sample:
    """MDS record -> Sample, rejecting unknown schema versions and inconsistent records with a clear error."""
    version = int(rec.get("schema_version", -1))
    if version not in READABLE_VERSIONS:
        raise SchemaError(
            f"sample {rec.get('clip_id', '?')!r} has schema_version {version}; this code reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}. Re-run the preparation tool (tools/prepare_humove.py, "
            "tools/prepare_motion.py, tools/make_humove_mini.py) with this version, or use the matching release of the "
            "code."
        )
    latent = None
    if int(rec["has_video"]):
        dtype = _DTYPES.get(rec["video_latent_dtype"])
        if dtype is None:
            raise SchemaError(f"sample {rec['clip_id']!r}: unknown latent dtype {rec['video_latent_dtype']!r}")
        shape = [int(d) for d in rec["video_latent_shape"].split(",")]
        buf = torch.frombuffer(bytearray(rec["video_latent"]), dtype=torch.uint8)
        if buf.numel() != int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size():
            raise SchemaError(f"sample {rec['clip_id']!r}: latent has {buf.numel()} bytes, which does not fit shape {shape}")
        latent = buf.view(dtype).reshape(shape)
    text = torch.from_numpy(np.asarray(rec["text_embedding"]).copy())
    if text.shape[0] != int(rec["text_length"]):
        raise SchemaError(f"sample {rec['clip_id']!r}: text_embedding has {text.shape[0]} rows but text_length says {rec['text_length']}")
    return Sample(
        clip_id=rec["clip_id"],
        source=rec["source"],
        category=rec["category"],
        caption=rec["caption"],
        fps=float(rec["fps"]),
        num_frames=int(rec["num_frames"]),
        height=int(rec["height"]),
        width=int(rec["width"]),
        video_latent=latent,
        text_embedding=text,
        betas=_t(rec["betas"]),
        global_orient=_t(rec["global_orient"]),
        body_pose=_t(rec["body_pose"]),
        transl=_t(rec["transl"]),
        joints=_t(rec["joints"]),
        motion_features=_features(rec) if version >= 2 else None,
    )


def _features(rec: dict[str, Any]) -> torch.Tensor:
    """The stored [F, 235] features, checked against the frame count (a wrong layout must not train silently)."""
    x = _t(rec["motion_features"])
    frames = np.shape(rec["global_orient"])[0]
    if x.shape != (frames, MOTION_FEATURE_DIM):
        raise SchemaError(f"sample {rec['clip_id']!r}: motion_features has shape {list(x.shape)}, expected "
                          f"[{frames}, {MOTION_FEATURE_DIM}]; re-run the preparation tool")
    return x


def _f32(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float32)


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(x, dtype=np.float32))
