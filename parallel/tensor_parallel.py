"""Tensor parallelism for every expert (Megatron's split, expressed as DTensor plans so checkpoints reshard).

Per expert (a layer's video expert, and the motion expert of a dual layer): q/k/v and FFN-in are column-parallel (each TP
rank computes a subset of heads / FFN channels), o and FFN-out row-parallel (partial sums all-reduced), in self- and
cross-attention alike. Wan's q/k RMSNorm normalizes over the full width, so its mean square is all-reduced across the TP
group (`TensorParallelRMSNorm`). Embeddings, modulation tables, LayerNorms and the output heads are replicated: each TP
rank computes them in full on the same inputs.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

from echomotion.models.echomotion import DualBlock, EchoMotionDiT
from echomotion.models.wan import WanBlock, WanRMSNorm


def all_reduce_sum(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Sum over the group. Differentiable: every rank's output depends on every rank's input, so the backward sums too."""
    return _AllReduceSum.apply(x, group)


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        return all_reduce_sum(grad.contiguous(), ctx.group), None


class TensorParallelRMSNorm(nn.Module):
    """`WanRMSNorm` over a column-parallel q or k: this rank holds width/tp channels and the matching slice of the weight
    (a DTensor sharded on dim 0, so the checkpoint key and content are unchanged)."""

    def __init__(self, norm: WanRMSNorm, mesh: DeviceMesh):
        super().__init__()
        self.eps = norm.eps
        self.width = norm.weight.numel()
        self.group = mesh.get_group()
        self.weight = nn.Parameter(distribute_tensor(norm.weight.detach(), mesh, [Shard(0)]), norm.weight.requires_grad)

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        mean_square = all_reduce_sum(xf.pow(2).sum(-1, keepdim=True), self.group) / self.width
        return (xf * torch.rsqrt(mean_square + self.eps)).type_as(x) * self.weight.to_local()


def expert_plan(prefix: str = "") -> dict[str, ParallelStyle]:
    """Module path -> TP style for one expert (a `WanBlock`)."""
    plan: dict[str, ParallelStyle] = {}
    for attn in ("self_attn", "cross_attn"):
        for name in ("q", "k", "v"):
            plan[f"{prefix}{attn}.{name}"] = ColwiseParallel()
        plan[f"{prefix}{attn}.o"] = RowwiseParallel()
    plan[f"{prefix}ffn.0"] = ColwiseParallel()
    plan[f"{prefix}ffn.2"] = RowwiseParallel()
    return plan


def experts(block: nn.Module) -> list[WanBlock]:
    return [block, block.motion] if isinstance(block, DualBlock) else [block]


def apply_tensor_parallel(model: EchoMotionDiT, mesh: DeviceMesh) -> None:
    """Split every expert's linears over `mesh` (the TP sub-mesh) and make the q/k norms TP-exact, in place.

    `parallelize_module` makes fresh trainable parameters, so each one's requires_grad (Phase 1 freezes the video experts)
    is restored afterwards.
    """
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    for block in model.blocks:
        plan = expert_plan()
        if isinstance(block, DualBlock):
            plan.update(expert_plan("motion."))
        parallelize_module(block, mesh, plan)
        for expert in experts(block):
            for attn in (expert.self_attn, expert.cross_attn):
                attn.norm_q = TensorParallelRMSNorm(attn.norm_q, mesh)
                attn.norm_k = TensorParallelRMSNorm(attn.norm_k, mesh)
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)


__all__ = ["apply_tensor_parallel", "expert_plan", "TensorParallelRMSNorm", "all_reduce_sum"]
