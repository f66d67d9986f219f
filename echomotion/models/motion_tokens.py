"""SMPL per frame <-> 51 motion tokens (paper Sec. 3.1): three input MLPs and three mirror output MLPs.

A frame's 235 normalized features (layout in `echomotion.motion.smpl`) split into 25 position tokens (3-D: root translation,
24 joints), 25 rotation tokens (6-D: global orientation, 24 joint rotations) and 1 shape token (10-D betas). Each group's MLP
is shared across the tokens of the group; MVS-RoPE (token index i -> spatial phase H+i, W+i) is what tells joints apart.
There is no temporal downsampling: one set of 51 tokens per frame.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..motion.smpl import (
    MOTION_TOKENS_PER_FRAME,
    NUM_POS_TOKENS,
    NUM_ROT_TOKENS,
    NUM_SHAPE_TOKENS,
    POS_DIM,
    ROT_DIM,
    SHAPE_DIM,
    merge_features,
    split_features,
)
from .wan import TimeCond, WanLayerNorm, head_modulate



def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.SiLU(), nn.Linear(hidden, d_out))


class MotionEmbed(nn.Module):
    """The motion tokenizer: [B, F, 235] -> [B, F * 51, dim], frame-major, tokens ordered position | rotation | shape."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.pos = _mlp(POS_DIM, hidden, dim)
        self.rot = _mlp(ROT_DIM, hidden, dim)
        self.shape = _mlp(SHAPE_DIM, hidden, dim)

    def forward(self, features: Tensor) -> Tensor:
        p, r, s = split_features(features)
        tokens = torch.cat([self.pos(p), self.rot(r), self.shape(s)], dim=2)
        return tokens.flatten(1, 2)


class MotionHead(nn.Module):
    """The motion decoder: Wan-style modulated norm (motion timestep), then three MLPs back to the 235 features."""

    def __init__(self, dim: int, hidden: int, eps: float = 1e-6):
        super().__init__()
        self.norm = WanLayerNorm(dim, eps)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)
        self.pos = _mlp(dim, hidden, POS_DIM)
        self.rot = _mlp(dim, hidden, ROT_DIM)
        self.shape = _mlp(dim, hidden, SHAPE_DIM)
        self.reset_output()

    def reset_output(self) -> None:
        """Zero the last layers, like Wan's head: a fresh decoder predicts zero velocity."""
        for mlp in (self.pos, self.rot, self.shape):
            nn.init.zeros_(mlp[2].weight)
            nn.init.zeros_(mlp[2].bias)

    def forward(self, x: Tensor, cond: TimeCond, frames: int) -> Tensor:
        h = head_modulate(self.norm, self.modulation, x, cond).unflatten(1, (frames, MOTION_TOKENS_PER_FRAME))
        p, r, s = h.split([NUM_POS_TOKENS, NUM_ROT_TOKENS, NUM_SHAPE_TOKENS], dim=2)
        return merge_features(self.pos(p), self.rot(r), self.shape(s))
