"""Wan's DiT pieces, exactly as the pretrained weights expect them (Wan2.1/2.2 `wan/modules/model.py` semantics).

Parameter names are Wan's original names (`self_attn.q`, `norm3`, `ffn.0`, `modulation`, `head.head`, ...), so an original
checkpoint loads without renaming. Modulation, norms and the time embedding run in fp32; RoPE angles in float64.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import AttentionFn, sdpa_attention
from .rope import apply_rope


class WanRMSNorm(nn.Module):
    """RMSNorm over the full width (all heads together), computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back (no affine unless asked, as in Wan)."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = False):
        super().__init__(dim, eps=eps, elementwise_affine=elementwise_affine)

    def forward(self, x: Tensor) -> Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).type_as(x)


def sinusoidal_embedding(timesteps: Tensor, dim: int) -> Tensor:
    """Wan's float64 sinusoid, cos first: [N] -> [N, dim]."""
    half = dim // 2
    pos = timesteps.to(torch.float64)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=pos.device) / half)
    arg = pos[:, None] * freqs[None, :]
    return torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)


class TimeCond(NamedTuple):
    """A modality's timestep conditioning, one row per distinct timestep (a segment), not per token.

    `e` [U, dim] feeds the head's 2-way modulation and `e0` [U, 6, dim] every block's 6-way modulation; `index` maps each
    token to its row ([B, L], or [B, 1] when one timestep covers the whole sample), so per-token modulation never
    materializes [B, L, 6, dim].
    """

    e: Tensor
    e0: Tensor
    index: Tensor

    def rows(self, table: Tensor, k: int) -> Tensor:
        """Chunk k of a [U, n, dim] modulation table, gathered for every token: [B, L or 1, dim]."""
        return table[:, k][self.index]


class WanAttentionProjections(nn.Module):
    """Wan's q/k/v/o projections with q/k RMSNorm over the full width (all heads together); shared by both attentions.

    Heads are counted from the projection width (`head_dim` is fixed), so tensor parallelism may narrow q/k/v to a subset
    of heads from outside.
    """

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6):
        super().__init__()
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps)
        self.norm_k = WanRMSNorm(dim, eps)


class WanSelfAttention(WanAttentionProjections):
    """Self-attention projections with RoPE; the attention itself happens in the block (joint over modalities or not)."""

    def project(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """[B, L, dim] -> rotated q, k and v as [B, L, heads, head_dim]."""
        heads = (-1, self.head_dim)
        q = apply_rope(self.norm_q(self.q(x)).unflatten(-1, heads), *rope)
        k = apply_rope(self.norm_k(self.k(x)).unflatten(-1, heads), *rope)
        return q, k, self.v(x).unflatten(-1, heads)


class WanCrossAttention(WanAttentionProjections):
    """Text cross-attention (no RoPE; Wan does not mask zero-padded text tokens, and neither do we)."""

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6):
        super().__init__(dim, num_heads, eps)
        self.attend: AttentionFn = sdpa_attention

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        heads = (-1, self.head_dim)
        q = self.norm_q(self.q(x)).unflatten(-1, heads)
        k = self.norm_k(self.k(context)).unflatten(-1, heads)
        v = self.v(context).unflatten(-1, heads)
        return self.o(self.attend(q, k, v, None).flatten(2))


class WanBlock(nn.Module):
    """One Wan attention block: the video expert of a layer, and (as `DualBlock.motion`) the motion expert.

    `pre_attention` and `post_attention` are the halves around self-attention, so a dual block can run one joint
    attention over both modalities in between.
    """

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, eps: float = 1e-6):
        super().__init__()
        self.norm1 = WanLayerNorm(dim, eps)
        self.self_attn = WanSelfAttention(dim, num_heads, eps)
        self.norm3 = WanLayerNorm(dim, eps, elementwise_affine=True)
        self.cross_attn = WanCrossAttention(dim, num_heads, eps)
        self.norm2 = WanLayerNorm(dim, eps)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def pre_attention(self, x: Tensor, cond: TimeCond, rope: tuple[Tensor, Tensor]) -> tuple[list[Tensor], Tensor, Tensor, Tensor]:
        """Modulated norm and q/k/v. Returns the 6 modulation chunks (shift, scale, gate for attention, then for FFN)."""
        table = self.modulation.float()[0] + cond.e0
        mod = [cond.rows(table, i) for i in range(6)]
        return (mod, *self.self_attn.project(modulate(self.norm1(x), mod[0], mod[1]), rope))

    def post_attention(self, x: Tensor, attn_out: Tensor, mod: list[Tensor], context: Tensor) -> Tensor:
        """The three residual lines of a Wan block, given the self-attention output [B, L, heads, head_dim].

        `torch.addcmul(x, y, gate)` is `x + y * gate` in one pass over the activations.
        """
        x = torch.addcmul(x, self.self_attn.o(attn_out.flatten(2)), mod[2])
        x = x + self.cross_attn(self.norm3(x), context)
        return torch.addcmul(x, self.ffn(modulate(self.norm2(x), mod[3], mod[4])), mod[5])


class Head(nn.Module):
    """Wan's output head: fp32 norm with 2-way modulation from the time embedding `e` (not `e0`), then a linear."""

    def __init__(self, dim: int, out_features: int, eps: float = 1e-6):
        super().__init__()
        self.norm = WanLayerNorm(dim, eps)
        self.head = nn.Linear(dim, out_features)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x: Tensor, cond: TimeCond) -> Tensor:
        return self.head(head_modulate(self.norm, self.modulation, x, cond))


def modulate(normed: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """`normed * (1 + scale) + shift` in fp32, as one fused pass (addcmul) over the activations."""
    return torch.addcmul(shift, normed.float(), 1 + scale)


def head_modulate(norm: nn.Module, modulation: Tensor, x: Tensor, cond: TimeCond) -> Tensor:
    """The output heads' fp32 norm with (shift, scale) from the time embedding `e`."""
    table = modulation.float()[0] + cond.e[:, None, :]
    return modulate(norm(x), cond.rows(table, 0), cond.rows(table, 1))


def patchify_grid(shape: tuple[int, ...], patch: tuple[int, int, int]) -> tuple[int, int, int]:
    """Token grid (F, H, W) of a latent [.., F, H, W]; a clear error when it does not divide by the patch."""
    f, h, w = shape[-3:]
    if f % patch[0] or h % patch[1] or w % patch[2]:
        raise ValueError(f"video latent frames/height/width {(f, h, w)} must be divisible by model.patch_size {tuple(patch)}")
    return f // patch[0], h // patch[1], w // patch[2]


def unpatchify(x: Tensor, grid: tuple[int, int, int], patch: tuple[int, int, int], channels: int) -> Tensor:
    """Head output [B, F*H*W, pt*ph*pw*C] -> [B, C, F*pt, H*ph, W*pw] (channel fastest, as Wan lays it out)."""
    b = x.shape[0]
    f, h, w = grid
    pt, ph, pw = patch
    x = x.view(b, f, h, w, pt, ph, pw, channels)
    return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, channels, f * pt, h * ph, w * pw)


def init_wan_weights(module: nn.Module) -> None:
    """Wan's init: xavier-uniform linears with zero bias, N(0, .02) embedding MLPs, a zero output head."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)


def time_conditioning(
    timesteps: Tensor, freq_dim: int, time_embedding: nn.Module, time_projection: nn.Module, batch: int
) -> TimeCond:
    """Embed each distinct timestep once: [B] or [B, L] timesteps -> TimeCond with a token->row index."""
    values, inverse = torch.unique(timesteps, return_inverse=True)
    index = inverse.view(batch, 1) if timesteps.dim() == 1 else inverse
    weight = time_embedding[0].weight
    with torch.autocast(weight.device.type, enabled=False):  # in the parameters' dtype: fp32 unless sharded as bf16
        e = time_embedding(sinusoidal_embedding(values, freq_dim).to(weight.dtype)).float()
        e0 = time_projection(e.to(weight.dtype)).float().unflatten(1, (6, -1))
    return TimeCond(e=e, e0=e0, index=index)


def check_timesteps(t: Optional[Tensor], batch: int, tokens: int, name: str) -> Tensor:
    """Timesteps in Wan's 0..1000 scale, [B] or [B, tokens]; anything else is a caller error worth naming."""
    if t is None:
        raise ValueError(f"{name} is required when its modality is given (Wan scale: 0 = clean, 1000 = pure noise)")
    if t.dim() == 0:
        t = t.expand(batch)
    if t.shape not in ((batch,), (batch, tokens)):
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected [{batch}] or per-token [{batch}, {tokens}]")
    return t


def xavier_conv_(conv: nn.Conv3d) -> None:
    nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
    nn.init.zeros_(conv.bias)


__all__ = [
    "WanRMSNorm",
    "WanLayerNorm",
    "WanSelfAttention",
    "WanCrossAttention",
    "WanBlock",
    "Head",
    "head_modulate",
    "modulate",
    "TimeCond",
    "sinusoidal_embedding",
    "time_conditioning",
    "patchify_grid",
    "unpatchify",
    "init_wan_weights",
    "xavier_conv_",
    "check_timesteps",
]
