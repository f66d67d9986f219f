"""Parallelism applied to the plain model from outside, in torchtitan's order: TP -> Ulysses SP -> FP8 -> activation
checkpointing -> compile -> FSDP2 (see docs/parallelism.md). `echomotion/` never imports this package's internals; the
trainer calls `build_parallel` and `parallelize`.
"""
from __future__ import annotations

import torch

from echomotion.config import Config
from echomotion.models.echomotion import EchoMotionDiT

from .mesh import Layout, ParallelContext, build_parallel, resolve_layout


def parallelize(model: EchoMotionDiT, ctx: ParallelContext, cfg: Config, device: torch.device) -> EchoMotionDiT:
    """Apply the configured layout to a model that every rank built identically (same seed or same weights), in place."""
    p = cfg.parallel
    if p.fp8 == "te":
        from .fp8 import check_fp8_available

        check_fp8_available(p, device)
        if ctx.layout.tp > 1:
            raise RuntimeError("parallel.fp8=te with parallel.tp > 1 is not supported (TE's own TP is not DTensor-based); "
                               "use parallel.tp=1 with FSDP/SP, or parallel.fp8=none")
    if ctx.tp_mesh is not None:
        from .tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(model, ctx.tp_mesh)
    if ctx.sp_mesh is not None:
        from .ulysses import apply_sequence_parallel

        apply_sequence_parallel(model, ctx.sp_mesh.get_group())
    if p.fp8 == "te":
        from .fp8 import convert_to_te

        convert_to_te(model, p.fp8_recipe)
    if p.activation_checkpointing != "none" or p.compile:
        from .activation import apply_activation_checkpointing, apply_compile

        if p.activation_checkpointing != "none":
            apply_activation_checkpointing(model, p.activation_checkpointing, p.ac_every)
        if p.compile:
            apply_compile(model)
    if ctx.fsdp_mesh is not None and p.engine == "fsdp":  # DeepSpeed partitions in its own engine (deepspeed_engine.py)
        from .fsdp import apply_fsdp

        apply_fsdp(model, ctx.fsdp_mesh, p)
    return model


__all__ = ["Layout", "ParallelContext", "build_parallel", "resolve_layout", "parallelize"]
