"""The EchoMotion dual-modality DiT: Wan's video expert plus a motion expert per dual layer, one joint self-attention.

Shapes (B batch; Wan's latent layout for video; 235 normalized SMPL features per motion frame, see echomotion.motion.smpl):
- `video` [B, C, F, H, W], `video_timestep` [B] or per-token [B, F*H*W / prod(patch)] in Wan's 0..1000 scale (0 = clean),
  `video_mask` [B] bool (False = the video of that sample is dropped: its tokens are hidden from the other modality).
- `motion` [B, F_m, 235], `motion_timestep` [B] or per-frame [B, F_m], `motion_mask` [B, F_m] bool (False = padded or dropped
  frame; its tokens are hidden as keys).
- `text` [B, L_text, text_dim] (padded as the caller likes; Wan does not mask text padding), `task` [B] long (Task ids).
A video-only call returns the video velocity [B, C, F, H, W]; any call with motion returns `Prediction(video, motion)` with
motion [B, F_m, 235] and video None when no video was given.
"""
from __future__ import annotations

from enum import IntEnum
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from ..config import ModelConfig, dual_layer_indices
from ..motion.smpl import MOTION_TOKENS_PER_FRAME
from .attention import get_attention
from .motion_tokens import MotionEmbed, MotionHead
from .rope import motion_positions, rope_cos_sin, sincos_embedding, video_positions
from .wan import (
    Head,
    TimeCond,
    WanBlock,
    check_timesteps,
    init_wan_weights,
    patchify_grid,
    time_conditioning,
    unpatchify,
    xavier_conv_,
)


class Task(IntEnum):
    """Task-hint ids (paper Sec. 3.2); T2M is Phase 1's motion-only text->motion."""

    T2M = 0
    JOINT = 1
    M2V = 2
    V2M = 3


class Stream(NamedTuple):
    """One modality's tokens and what travels with them (sliced together under sequence parallelism).

    A named tuple rather than a dataclass: wrappers that look for the tensors in a block's inputs and outputs (FSDP2's and
    DeepSpeed ZeRO-3's backward hooks) walk tuples, and ZeRO-3 does not walk dataclasses.
    """

    x: Tensor  # [B, L, dim] residual stream
    cond: TimeCond  # timestep modulation rows + token -> row index
    rope: tuple[Tensor, Tensor]  # cos, sin [L, head_dim // 2]
    key_mask: Optional[Tensor]  # [B, L] bool, True = visible as a key; None = all visible

    def with_x(self, x: Tensor) -> "Stream":
        return self._replace(x=x)


class Prediction(NamedTuple):
    video: Optional[Tensor]
    motion: Optional[Tensor]


class VideoBlock(WanBlock):
    """A video-only layer (the Wan2.2-5B hybrid's non-dual half): motion tokens pass through unchanged."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, eps: float, attention_backend: str):
        super().__init__(dim, ffn_dim, num_heads, eps)
        self.attend = get_attention(attention_backend)

    def forward(self, video: Optional[Stream], motion: Optional[Stream], context: Tensor):
        if video is None:
            return video, motion
        mod, q, k, v = self.pre_attention(video.x, video.cond, video.rope)
        out = self.attend(q, k, v, video.key_mask)
        return video.with_x(self.post_attention(video.x, out, mod, context)), motion


class DualBlock(VideoBlock):
    """A dual layer: modality-specific experts (`self` is the video expert, `self.motion` the motion expert) around one
    joint self-attention over [video; motion] (paper Eq. 1)."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, eps: float, attention_backend: str):
        super().__init__(dim, ffn_dim, num_heads, eps, attention_backend)
        self.motion = WanBlock(dim, ffn_dim, num_heads, eps)

    def forward(self, video: Optional[Stream], motion: Optional[Stream], context: Tensor):
        pairs = [(expert, s) for expert, s in ((self, video), (self.motion, motion)) if s is not None]
        pre = [expert.pre_attention(s.x, s.cond, s.rope) for expert, s in pairs]
        q, k, v = (join_tokens([p[i] for p in pre]) for i in (1, 2, 3))
        out = self.attend(q, k, v, joint_key_mask([s for _, s in pairs]))
        outs = out.split([s.x.shape[1] for _, s in pairs], dim=1)
        new = [s.with_x(expert.post_attention(s.x, o, p[0], context)) for (expert, s), o, p in zip(pairs, outs, pre)]
        if video is None:
            return None, new[0]
        return new[0], (new[1] if motion is not None else None)


def join_tokens(parts: list[Tensor]) -> Tensor:
    """[video; motion] along the token axis; a lone modality passes through without a copy."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def joint_key_mask(streams: list[Stream]) -> Optional[Tensor]:
    if all(s.key_mask is None for s in streams):
        return None
    return torch.cat(
        [s.key_mask if s.key_mask is not None else s.x.new_ones(s.x.shape[:2], dtype=torch.bool) for s in streams], dim=1
    )


class WholeSequence:
    """The token-sharding seam: which of a modality's tokens this process runs through the blocks.

    One process holds every token. `parallel.ulysses.UlyssesSequence` replaces it to give each sequence-parallel rank a slice
    of each modality (positions, RoPE and timestep rows are computed for the whole sequence first, then sliced) and to
    gather the slices again before the output heads.
    """

    def shard(self, stream: Optional[Stream]) -> Optional[Stream]:
        return stream

    def gather(self, x: Tensor, length: int) -> Tensor:
        return x


class TaskHint(nn.Module):
    """Learned task embedding -> small MLP, added to every token once at the input (zero-initialized output layer, so a
    freshly added hint leaves the pretrained Wan function unchanged)."""

    def __init__(self, dim: int, num_tasks: int = len(Task)):
        super().__init__()
        self.embedding = nn.Embedding(num_tasks, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, task: Tensor) -> Tensor:
        return self.mlp(self.embedding(task))[:, None, :]


MOTION_PREFIXES = ("motion_embed.", "motion_head.", "task_hint.")


def is_motion_parameter(name: str) -> bool:
    """Parameters trained in Phase 1: motion experts, the motion tokenizer/decoder and the task hint."""
    return name.startswith(MOTION_PREFIXES) or ".motion." in name


class EchoMotionDiT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c = config
        self.patch_size = tuple(c.patch_size)
        self.head_dim = c.dim // c.num_heads
        dual = set(dual_layer_indices(c))
        hidden = c.motion.mlp_hidden or c.dim

        self.patch_embedding = nn.Conv3d(c.in_channels, c.dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(c.text_dim, c.dim), nn.GELU(approximate="tanh"), nn.Linear(c.dim, c.dim))
        self.time_embedding = nn.Sequential(nn.Linear(c.freq_dim, c.dim), nn.SiLU(), nn.Linear(c.dim, c.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(c.dim, c.dim * 6))
        self.blocks = nn.ModuleList(
            (DualBlock if i in dual else VideoBlock)(c.dim, c.ffn_dim, c.num_heads, c.eps, c.attention_backend)
            for i in range(c.num_layers)
        )
        self.head = Head(c.dim, c.out_channels * self.patch_size[0] * self.patch_size[1] * self.patch_size[2], c.eps)
        self.motion_embed = MotionEmbed(c.dim, hidden)
        self.motion_head = MotionHead(c.dim, hidden, c.eps)
        self.task_hint = TaskHint(c.dim) if c.task_hint else None
        self.sequence = WholeSequence()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Wan's init for the video path; zero output layers for the video head, motion decoder and task hint."""
        init_wan_weights(self)
        xavier_conv_(self.patch_embedding)
        for seq in (self.text_embedding, self.time_embedding):
            for m in seq:
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)
        self.motion_head.reset_output()
        if self.task_hint is not None:
            nn.init.zeros_(self.task_hint.mlp[2].weight)

    @property
    def dual_layers(self) -> list[int]:
        return [i for i, b in enumerate(self.blocks) if isinstance(b, DualBlock)]

    # ---------------------------------------------------------------------------------------------------------- forward
    def forward(
        self,
        video: Optional[Tensor] = None,
        video_timestep: Optional[Tensor] = None,
        text: Optional[Tensor] = None,
        motion: Optional[Tensor] = None,
        motion_timestep: Optional[Tensor] = None,
        motion_mask: Optional[Tensor] = None,
        video_mask: Optional[Tensor] = None,
        task: Optional[Tensor] = None,
    ) -> Tensor | Prediction:
        if text is None:
            raise ValueError("text is required: pass the text-encoder embedding, or the empty-prompt embedding for a dropped text")
        if video is None and motion is None:
            raise ValueError("give video, motion, or both")
        if motion is not None and not self.dual_layers:
            raise ValueError("this model has no dual layers (model.dual_layers=none), so it cannot take motion")
        batch = text.shape[0]
        context = self.text_embedding(text)
        hint = self.task_hint(task) if (task is not None and self.task_hint is not None) else None

        grid = patchify_grid(video.shape, self.patch_size) if video is not None else None
        vs = self.embed_video(video, video_timestep, video_mask, hint, batch) if video is not None else None
        ms = None
        if motion is not None:
            ms = self.embed_motion(motion, motion_timestep, motion_mask, hint, batch, grid[1:] if grid else (0, 0))

        video_in, motion_in = vs, ms
        vs, ms = self.sequence.shard(vs), self.sequence.shard(ms)
        for block in self.blocks:
            vs, ms = block(vs, ms, context)

        v_out = None
        if vs is not None:
            x = self.sequence.gather(vs.x, video_in.x.shape[1])
            v_out = unpatchify(self.head(x, video_in.cond), grid, self.patch_size, self.config.out_channels).float()
        if motion is None:
            return v_out
        x = self.sequence.gather(ms.x, motion_in.x.shape[1])
        return Prediction(v_out, self.motion_head(x, motion_in.cond, motion.shape[1]).float())

    def embed_video(
        self, video: Tensor, timestep: Optional[Tensor], mask: Optional[Tensor], hint: Optional[Tensor], batch: int
    ) -> Stream:
        grid = patchify_grid(video.shape, self.patch_size)
        # contiguous: a transposed residual stream would make every norm and linear copy it again, forward and backward
        x = self.patch_embedding(video).flatten(2).transpose(1, 2).contiguous()
        tokens = x.shape[1]
        t = check_timesteps(timestep, batch, tokens, "video_timestep")
        cond = time_conditioning(t, self.config.freq_dim, self.time_embedding, self.time_projection, batch)
        pos = video_positions(*grid).to(x.device)
        x = self.add_abs_pos(x, pos)
        key_mask = None
        if mask is not None and not bool(mask.all()):
            key_mask = mask.to(torch.bool)[:, None].expand(batch, tokens)
        if hint is not None:
            x = x + hint
        return Stream(x, cond, rope_cos_sin(pos, self.head_dim, self.config.rope.theta), key_mask)

    def embed_motion(
        self,
        motion: Tensor,
        timestep: Optional[Tensor],
        mask: Optional[Tensor],
        hint: Optional[Tensor],
        batch: int,
        grid_hw: tuple[int, int],
    ) -> Stream:
        """Motion tokens placed by MVS-RoPE next to the video grid (H, W); with no video, the motion tokens' relative
        positions (all RoPE can see) do not depend on H, W."""
        frames = motion.shape[1]
        x = self.motion_embed(motion)
        t = check_timesteps(timestep, batch, frames, "motion_timestep")
        if t.dim() == 2:
            t = t.repeat_interleave(MOTION_TOKENS_PER_FRAME, dim=1)
        cond = time_conditioning(t, self.config.freq_dim, self.time_embedding, self.time_projection, batch)
        r = self.config.rope
        pos = motion_positions(frames, MOTION_TOKENS_PER_FRAME, grid_hw, r.motion_layout, r.temporal_ratio).to(x.device)
        # the absolute embedding must not depend on whether a video is present (Phase 1 has none): (f / ratio, i, i)
        x = self.add_abs_pos(x, motion_positions(frames, MOTION_TOKENS_PER_FRAME, (0, 0), "mvs", r.temporal_ratio))
        key_mask = None
        if mask is not None:
            if mask.shape != (batch, frames):
                raise ValueError(f"motion_mask has shape {tuple(mask.shape)}; expected [{batch}, {frames}]")
            key_mask = mask.to(torch.bool).repeat_interleave(MOTION_TOKENS_PER_FRAME, dim=1)
        if hint is not None:
            x = x + hint
        return Stream(x, cond, rope_cos_sin(pos, self.head_dim, r.theta), key_mask)

    def add_abs_pos(self, x: Tensor, positions: Tensor) -> Tensor:
        """`model.abs_pos=sincos`: the toy-scale absolute position aid, added to the embedded tokens (before any sequence
        sharding, so every rank adds the embedding of its own tokens); "none" (Wan) leaves x untouched."""
        if self.config.abs_pos == "none":
            return x
        return x + sincos_embedding(positions, x.shape[-1]).to(device=x.device, dtype=x.dtype)

    # ---------------------------------------------------------------------------------------------- pretrained weights
    def copy_video_experts_to_motion(self) -> None:
        """Initialize every motion expert as a copy of its layer's video expert (paper A.8.2)."""
        with torch.no_grad():
            for i in self.dual_layers:
                block = self.blocks[i]
                video_state = {k: v for k, v in block.state_dict().items() if not k.startswith("motion.")}
                block.motion.load_state_dict(video_state)
