"""Batches: `Item`s -> one uniform, padded `Batch` (one latent shape, motion padded for sequence parallelism, text to the
batch's longest prompt; the trainer pads text to the model's length on the device)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from math import gcd
from typing import Callable, Optional

import torch

from ..motion.smpl import MOTION_FEATURE_DIM, MOTION_TOKENS_PER_FRAME
from .dataset import Item
from .encoders import pad_text
from .errors import DataError

log = logging.getLogger(__name__)

@dataclass
class Batch:
    """A training batch. Every sample shares one latent shape; motion and text are zero-padded with masks / lengths."""

    video: Optional[torch.Tensor]  # [B, C, F_lat, H_lat, W_lat] in the stored dtype, or None for a motion-only batch
    motion: torch.Tensor  # [B, F, 235] normalized float32, F padded to the longest clip (or
    # data.motion_frames for motion-only batches) and to the sp multiple
    motion_mask: torch.Tensor  # [B, F] bool, True = a real frame
    # [B, L, text_dim] stored dtype, zero-padded to the batch's longest prompt L <= text_len (cheaper to load and copy);
    # the consumer pads it to text_len on the device with `pad_text` (Wan pads text with zeros, unmasked)
    text: torch.Tensor
    text_lengths: torch.Tensor  # [B] long, true lengths (after truncation to text_len)
    has_video: torch.Tensor  # [B] bool
    clip_ids: list[str]
    captions: list[str]

    def __len__(self) -> int:
        return len(self.clip_ids)

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Batch":
        return Batch(
            video=None if self.video is None else fn(self.video),
            motion=fn(self.motion),
            motion_mask=fn(self.motion_mask),
            text=fn(self.text),
            text_lengths=fn(self.text_lengths),
            has_video=fn(self.has_video),
            clip_ids=self.clip_ids,
            captions=self.captions,
        )

    def pin_memory(self) -> "Batch":
        """Called by the DataLoader (pin_memory=True) so host-to-device copies can be asynchronous."""
        return self._map(torch.Tensor.pin_memory)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))


def motion_frame_multiple(sp_multiple: int) -> int:
    """Smallest frame count step that keeps frames x 51 tokens divisible by `sp_multiple`."""
    return sp_multiple // gcd(MOTION_TOKENS_PER_FRAME, sp_multiple)


class Collate:
    """Items -> Batch. Pads motion per modality for sequence parallelism (video token counts are fixed by the latent grid;
    parallel/ pads those at its token-sharding point); pads text to the batch's longest prompt, truncated to `text_len`."""

    def __init__(self, text_len: int, sp_multiple: int = 1, motion_frames: Optional[int] = None):
        self.text_len = text_len
        self.frame_step = motion_frame_multiple(sp_multiple)
        self.motion_frames = motion_frames
        self._warned_truncation = False

    def __call__(self, items: list[Item]) -> Batch:
        if not items:
            raise ValueError("collate got an empty batch")
        video = self._video(items)
        motion, motion_mask = self._motion(items, paired=video is not None)
        text, lengths = self._text(items)
        return Batch(
            video=video,
            motion=motion,
            motion_mask=motion_mask,
            text=text,
            text_lengths=lengths,
            has_video=torch.full((len(items),), video is not None),
            clip_ids=[it.clip_id for it in items],
            captions=[it.caption for it in items],
        )

    def _video(self, items: list[Item]) -> Optional[torch.Tensor]:
        """The stacked latents of a paired batch, None for a motion-only one; a batch holds one kind and one shape."""
        has_video = [it.video is not None for it in items]
        if any(has_video) and not all(has_video):
            raise DataError(
                f"batch mixes paired and motion-only samples ({_ids(items)}): a source must hold one kind; list "
                "motion-only samples as their own source (kind: motion_only)"
            )
        if not all(has_video):
            return None
        shapes = {tuple(it.video.shape) for it in items}  # type: ignore[union-attr]
        if len(shapes) > 1:
            raise DataError(
                f"batch mixes latent shapes {sorted(shapes)} ({_ids(items)}): each stream must hold one latent shape "
                "(write one source per resolution / duration bucket)"
            )
        return torch.stack([it.video for it in items])  # type: ignore[misc]

    def _motion(self, items: list[Item], paired: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Motion zero-padded to the longest clip (motion-only batches: to data.motion_frames) and the sp multiple."""
        most = max(it.motion.shape[0] for it in items)
        if self.motion_frames is not None and not paired and most > self.motion_frames:
            raise DataError(f"a motion-only clip has {most} frames, more than data.motion_frames={self.motion_frames}: "
                            "the dataset crops them (build it with motion_frames, as build_dataloader does)")
        frames = most if self.motion_frames is None or paired else self.motion_frames
        frames = -(-frames // self.frame_step) * self.frame_step
        motion = torch.zeros(len(items), frames, MOTION_FEATURE_DIM)
        motion_mask = torch.zeros(len(items), frames, dtype=torch.bool)
        for i, it in enumerate(items):
            motion[i, : it.motion.shape[0]] = it.motion
            motion_mask[i, : it.motion.shape[0]] = True
        return motion, motion_mask

    def _text(self, items: list[Item]) -> tuple[torch.Tensor, torch.Tensor]:
        """Text zero-padded to the batch's longest prompt, cut at text_len, and the true lengths."""
        text_dims = {it.text.shape[1] for it in items}
        if len(text_dims) > 1:
            raise DataError(f"batch mixes text embedding widths {sorted(text_dims)} ({_ids(items)})")
        longest = max(it.text.shape[0] for it in items)
        if longest > self.text_len and not self._warned_truncation:
            log.warning("text embeddings of %d tokens truncated to text_len=%d (shown once)", longest, self.text_len)
            self._warned_truncation = True
        length = min(longest, self.text_len)
        text = torch.stack([pad_text(it.text, length) for it in items])
        return text, torch.tensor([min(it.text.shape[0], length) for it in items], dtype=torch.long)


def _ids(items: list[Item]) -> str:
    ids = [it.clip_id for it in items]
    return ", ".join(ids[:4]) + (", ..." if len(ids) > 4 else "")
