"""The FLOPs model behind MFU and the parallel planner; it lives next to the model it describes.

FLOPs (forward, per sample) are counted analytically from the config: every matmul is 2·m·n·k. Per layer, for each
modality stream with L_s tokens that has an expert in that layer: q/k/v/o 8·D²·L_s, cross-attention q/o 4·D²·L_s and k/v
over the text 4·D²·L_t, FFN 4·D·F·L_s, cross-attention scores and values 4·L_s·L_t·D; plus the joint self-attention scores
and values 4·L²·D over all L = L_v + L_m tokens of the layer. Embeddings, heads and the motion MLPs are added. Training
costs 3× the forward (backward ≈ 2× forward; frozen Phase 1 weights still back-propagate activations, so this is kept).
"""
from __future__ import annotations

from ..config import ModelConfig, dual_layer_indices
from ..motion.smpl import MOTION_TOKENS_PER_FRAME, NUM_POS_TOKENS, NUM_ROT_TOKENS, POS_DIM, ROT_DIM, SHAPE_DIM


def forward_flops(m: ModelConfig, video_tokens: int, motion_tokens: int, text_tokens: int) -> float:
    """Forward FLOPs of one sample (see the module docstring for the formula)."""
    d, f = m.dim, m.ffn_dim
    dual = set(dual_layer_indices(m))
    total = 0.0
    for layer in range(m.num_layers):
        streams = [video_tokens] + ([motion_tokens] if layer in dual else [])
        streams = [s for s in streams if s > 0]
        for ls in streams:
            total += 8 * d * d * ls + 4 * d * d * ls + 4 * d * d * text_tokens + 4 * d * f * ls + 4 * ls * text_tokens * d
        joint = sum(streams)
        total += 4 * joint * joint * d
    patch = m.patch_size[0] * m.patch_size[1] * m.patch_size[2]
    hidden = m.motion.mlp_hidden or d
    total += 2 * video_tokens * d * (m.in_channels * patch + m.out_channels * patch)  # patch embedding + head
    total += 2 * text_tokens * (m.text_dim * d + d * d)  # text embedding
    if motion_tokens:
        frames = motion_tokens / MOTION_TOKENS_PER_FRAME
        per_frame_in = NUM_POS_TOKENS * POS_DIM + NUM_ROT_TOKENS * ROT_DIM + SHAPE_DIM
        total += 2 * 2 * frames * (per_frame_in * hidden + MOTION_TOKENS_PER_FRAME * hidden * d)  # in + out MLPs
    return total


def training_flops(m: ModelConfig, video_tokens: int, motion_tokens: int, text_tokens: int) -> float:
    return 3.0 * forward_flops(m, video_tokens, motion_tokens, text_tokens)
