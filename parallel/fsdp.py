"""FSDP2 (`fully_shard`) over the data-parallel x sequence-parallel ranks; HSDP when parallel.dp_replicate > 1.

One communication group per block (both experts of a dual layer: the block's forward calls their halves around the joint
attention, so they cannot have forward hooks of their own), then the root (embeddings, heads, task hint). Frozen Phase 1
parameters stay in their groups; they get no gradient and FSDP2 reduces only the gradients that exist. The sequence-parallel ranks shard parameters too: they see different tokens, so
their gradients differ and must be reduced anyway.
"""
from __future__ import annotations

import warnings

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from echomotion.config import ParallelConfig
from echomotion.models.echomotion import EchoMotionDiT

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# A block returns its streams' RoPE tables, masks and token->row indices unchanged (views), and nothing downstream writes
# into a block's or the model's outputs in place, which is the case this warning is about.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(\w+\) returned a view tensor")


def apply_fsdp(model: EchoMotionDiT, mesh: DeviceMesh, p: ParallelConfig) -> None:
    if p.cpu_offload and mesh.device_type != "cuda":
        raise RuntimeError(
            "parallel.cpu_offload=true moves FSDP shards from GPU memory to pinned host memory, which needs CUDA; on a CPU "
            "run everything already lives in host memory: set parallel.cpu_offload=false"
        )
    mp = MixedPrecisionPolicy(param_dtype=DTYPES[p.param_dtype], reduce_dtype=DTYPES[p.reduce_dtype])
    offload = CPUOffloadPolicy() if p.cpu_offload else OffloadPolicy()
    kwargs = dict(mesh=mesh, mp_policy=mp, offload_policy=offload)
    for block in model.blocks:
        fully_shard(block, reshard_after_forward=p.reshard_after_forward, **kwargs)
    # The root's parameters are needed again right away by the heads: keep them gathered through the forward.
    fully_shard(model, reshard_after_forward=False, **kwargs)
