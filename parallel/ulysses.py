"""Ulysses sequence parallelism over the joint [video; motion] sequence.

Each of the `sp` ranks of a group holds a contiguous slice of the video tokens and a slice of the motion tokens (each
modality padded to a multiple of sp; pads are masked as keys). Self-attention needs every token: an all-to-all turns the
local q/k/v [B, L/sp, H, d] into [B, L, H/sp, d] (scatter heads, gather sequence), the local attention runs on whole
sequences for its heads, and a second all-to-all returns [B, L/sp, H, d]. Attention does not care about key order, so the
gathered sequence is rank-major ([v0; m0; v1; m1; ...]); the key mask is gathered in the same order. Text stays
replicated, so cross-attention needs no communication. Before the output heads the slices are gathered again.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from echomotion.models.attention import AttentionFn
from echomotion.models.echomotion import EchoMotionDiT, Stream
from echomotion.models.wan import TimeCond


def all_to_all(x: Tensor, scatter_dim: int, gather_dim: int, group: dist.ProcessGroup) -> Tensor:
    """Split `x` into world chunks along `scatter_dim`, send chunk j to rank j, and concatenate what arrives along
    `gather_dim` in rank order. Differentiable: the backward is the inverse all-to-all."""
    return _AllToAll.apply(x, scatter_dim, gather_dim, group)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scatter_dim: int, gather_dim: int, group: dist.ProcessGroup) -> Tensor:
        ctx.dims, ctx.group = (scatter_dim, gather_dim), group
        world = dist.get_world_size(group)
        send = torch.stack(x.chunk(world, dim=scatter_dim)).contiguous()  # [world, ...chunk]
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=group)
        return torch.cat(recv.unbind(0), dim=gather_dim)

    @staticmethod
    def backward(ctx, grad: Tensor):
        scatter_dim, gather_dim = ctx.dims
        return all_to_all(grad.contiguous(), gather_dim, scatter_dim, ctx.group), None, None, None


def gather_tokens(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """All-gather along the token axis (dim 1). The backward sums the gradient over the ranks and keeps this rank's slice
    (a reduce-scatter): every rank computes the heads and the loss on the gathered sequence, and the data-parallel loss
    scale accounts for it (see docs/parallelism.md)."""
    return _GatherTokens.apply(x, group)


class _GatherTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        world = dist.get_world_size(group)
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))  # rank-major along dim 0
        dist.all_gather_single(out, x.contiguous(), group=group)
        return torch.cat(out.chunk(world, dim=0), dim=1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        world = dist.get_world_size(ctx.group)
        chunks = torch.cat(grad.chunk(world, dim=1), dim=0).contiguous()
        out = chunks.new_empty((chunks.shape[0] // world, *chunks.shape[1:]))
        dist.reduce_scatter_single(out, chunks, group=ctx.group)
        return out, None


class UlyssesSequence:
    """The model's token-sharding seam (`EchoMotionDiT.sequence`) for one sequence-parallel group."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def shard(self, stream: Optional[Stream]) -> Optional[Stream]:
        """This rank's slice of a modality, padded to a multiple of sp; the stream always carries a key mask afterwards, so
        every rank of the group takes the same (masked) attention path."""
        if stream is None:
            return None
        b, length = stream.x.shape[:2]
        pad = -length % self.size
        local = (length + pad) // self.size
        part = slice(self.rank * local, (self.rank + 1) * local)

        mask = stream.key_mask if stream.key_mask is not None else stream.x.new_ones((b, length), dtype=torch.bool)
        cos, sin = stream.rope
        index = stream.cond.index
        if index.shape[1] != 1:
            index = F.pad(index, (0, pad))[:, part]
        return Stream(
            # a copy, not a view: a view would keep the whole sequence alive for as long as block 0 saves its input
            x=F.pad(stream.x, (0, 0, 0, pad))[:, part].clone(),
            cond=TimeCond(stream.cond.e, stream.cond.e0, index),
            rope=(F.pad(cos, (0, 0, 0, pad), value=1.0)[part], F.pad(sin, (0, 0, 0, pad))[part]),
            key_mask=F.pad(mask, (0, pad), value=False)[:, part],
        )

    def gather(self, x: Tensor, length: int) -> Tensor:
        return gather_tokens(x, self.group)[:, :length]


def ulysses_attention(local: AttentionFn, group: dist.ProcessGroup) -> AttentionFn:
    """Wrap a local attention function (SDPA or flash) in Ulysses' two all-to-alls."""

    def attend(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor]) -> Tensor:
        if key_mask is None:
            raise ValueError("Ulysses attention needs the key mask the sharded streams carry (pads are masked as keys)")
        q, k, v = (all_to_all(t, scatter_dim=2, gather_dim=1, group=group) for t in (q, k, v))
        world = dist.get_world_size(group)
        masks = key_mask.new_empty((world * key_mask.shape[0], key_mask.shape[1]), dtype=torch.uint8)  # gloo: no bool
        dist.all_gather_single(masks, key_mask.to(torch.uint8), group=group)
        out = local(q, k, v, torch.cat(masks.chunk(world, dim=0), dim=1).bool())
        return all_to_all(out, scatter_dim=1, gather_dim=2, group=group)

    return attend


def apply_sequence_parallel(model: EchoMotionDiT, group: dist.ProcessGroup) -> None:
    """Install the Ulysses seam and wrap every block's joint self-attention."""
    model.sequence = UlyssesSequence(group)
    for block in model.blocks:
        block.attend = ulysses_attention(block.attend, group)


__all__ = ["all_to_all", "gather_tokens", "UlyssesSequence", "ulysses_attention", "apply_sequence_parallel"]
