"""Gradient-norm clipping over parameters that may be DTensors on different meshes (FSDP shards, TP shards) or plain
replicated tensors: each group's norm is reduced over its own mesh, so every rank gets the same global norm."""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor


def global_grad_norm(params: Iterable[torch.nn.Parameter]) -> float:
    """The 2-norm of all gradients as one vector, identical on every rank."""
    groups: dict[tuple, list[Tensor]] = {}
    for p in params:
        if p.grad is None:
            continue
        g = p.grad
        key = (g.device_mesh, g.placements) if isinstance(g, DTensor) else (None, None)
        groups.setdefault(key, []).append(g)
    squares = 0.0
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        squares += float(norm) ** 2
    return math.sqrt(squares)


def clip_grad_norm_(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Scale the gradients in place so their global norm is at most `max_norm`; returns the norm before clipping."""
    total = global_grad_norm(params)
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef)
    return total
