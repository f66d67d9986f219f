"""Activation checkpointing and torch.compile per block, applied to the plain model from outside (after TP / SP / FP8,
before FSDP2, as torchtitan orders them).

Why not `checkpoint_wrapper`: it puts the block inside a wrapper module, so `named_parameters()` gains a
`_checkpoint_wrapped_module.` segment (state_dict() and DCP's get_state_dict strip it, but the trainer's EMA, optimizer groups
and TP/FP8 plans address parameters by name) and `isinstance(block, DualBlock)` turns False, which hides the dual layers from
`EchoMotionDiT.dual_layers` (measured with torch 2.14). Instead each chosen block's class becomes a subclass whose forward
runs the original one under non-reentrant `torch.utils.checkpoint` (the way FSDP2 itself retypes the modules it shards):
module tree, parameter names and isinstance checks stay as they were. Blocks take and return `Stream` named tuples (or None);
non-reentrant checkpointing accepts any Python inputs and outputs.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from echomotion.models.echomotion import EchoMotionDiT

AC_MODES = ("none", "full", "every_k")
_CHECKPOINTED: dict[type, type] = {}


def checkpointed_class(cls: type) -> type:
    """`cls` with its forward recomputed in backward instead of keeping its activations (one subclass per block type)."""
    if issubclass(cls, tuple(_CHECKPOINTED.values())):
        return cls
    if cls not in _CHECKPOINTED:

        def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            return checkpoint(super(sub, self).forward, *args, use_reentrant=False, **kwargs)

        sub = type(f"Checkpointed{cls.__name__}", (cls,), {"forward": forward, "__module__": __name__})
        _CHECKPOINTED[cls] = sub
    return _CHECKPOINTED[cls]


def checkpointed_blocks(num_blocks: int, mode: str, every: int) -> list[int]:
    """Indices of the blocks `mode` checkpoints: none, all ("full"), or those with i % every == 0 ("every_k")."""
    if mode not in AC_MODES:
        raise ValueError(f"parallel.activation_checkpointing={mode!r}: choose one of {', '.join(AC_MODES)}")
    if mode == "every_k" and every < 1:
        raise ValueError(f"parallel.ac_every={every} must be >= 1")
    if mode == "none":
        return []
    return [i for i in range(num_blocks) if mode == "full" or i % every == 0]


def apply_activation_checkpointing(model: EchoMotionDiT, mode: str, every: int = 2) -> list[int]:
    """Checkpoint the chosen blocks in place; returns their indices."""
    chosen = checkpointed_blocks(len(model.blocks), mode, every)
    for i in chosen:
        block = model.blocks[i]
        block.__class__ = checkpointed_class(type(block))
    return chosen


def apply_compile(model: EchoMotionDiT) -> None:
    """torch.compile each block in place (`Module.compile`, so no `_orig_mod.` enters the parameter names); the embeddings
    and heads around them stay eager.

    Measured on CPU (torch 2.14): blocks of one class with one input pattern share a graph (four dual blocks, one graph),
    but every other class (video-only, checkpointed) and every other pattern of None-or-tensor masks and streams adds
    graphs to the same cache, which Dynamo caps at `torch._dynamo.config.recompile_limit` (8) before running eagerly."""
    # Every block of a kind shares one code cache, and each kind (dual, video-only, checkpointed) x mask pattern (None or
    # a tensor) adds a graph: Dynamo's default limit of 8 would silently leave blocks eager in larger models.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for block in model.blocks:
        block.compile()
