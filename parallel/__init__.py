"""Parallelism applied to the plain model from outside, in torchtitan's order: TP -> Ulysses SP -> FP8 -> activation
checkpointing -> compile -> FSDP2 (see docs/parallelism.md); then the engine the trainer's loop drives (`build_engine`).
The trainer calls `build_parallel`, `parallelize` and `build_engine`; `echomotion.checkpoint` writes through the engine's
`StateIO`. This package imports only `echomotion.config` and `echomotion.models`.
"""
from __future__ import annotations

from typing import Optional

import torch

from echomotion.config import Config
from echomotion.models.echomotion import EchoMotionDiT

from .deepspeed_engine import DeepSpeedEngine
from .engine import DEEPSPEED_TAG, Engine, StateIO, TorchEngine
from .mesh import Layout, ParallelContext, build_parallel, resolve_layout


def parallelize(model: EchoMotionDiT, ctx: ParallelContext, cfg: Config, device: torch.device) -> EchoMotionDiT:
    """Apply the configured layout to a model that every rank built identically (same seed or same weights), in place."""
    p = cfg.parallel
    if p.fp8 != "none":  # the config check refused tp > 1 with FP8
        from .fp8 import check_fp8_available

        check_fp8_available(p, device)
    if ctx.tp_mesh is not None:
        from .tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(model, ctx.tp_mesh)
    if ctx.sp_mesh is not None:
        from .ulysses import apply_sequence_parallel

        apply_sequence_parallel(model, ctx.sp_mesh.get_group())
    if p.fp8 != "none":
        from .fp8 import convert_to_fp8

        convert_to_fp8(model, p)
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


def build_engine(model: EchoMotionDiT, optimizer: torch.optim.Optimizer, cfg: Config,
                 ema: Optional[dict[str, torch.Tensor]]) -> Engine:
    """The configured engine (parallel/engine.py) around a model `parallelize` has prepared and the trainer's optimizer."""
    if cfg.parallel.engine == "deepspeed":
        return DeepSpeedEngine(model, optimizer, cfg)
    return TorchEngine(model, optimizer, cfg.train.grad_clip, ema)


__all__ = ["DEEPSPEED_TAG", "Engine", "Layout", "StateIO", "ParallelContext", "build_engine", "build_parallel", "resolve_layout", "parallelize"]
