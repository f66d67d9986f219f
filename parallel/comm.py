"""Collective bytes per step, by kind: a dispatch mode that sees every collective the step issues.

Why a `TorchDispatchMode`: `torch.distributed`'s calls (`all_reduce`, `all_gather_into_tensor`, ...), FSDP2's parameter
all-gathers and gradient reduce-scatters, functional collectives and DTensor redistributions all reach the dispatcher as
`c10d::*`, `_c10d_functional::*` or `_dtensor::*` ops, so one mode counts them whoever issues them (measured with torch 2.14
on gloo, forward and backward, in tests/distributed/test_comm.py). A mode runs before tensor subclasses and the op it
forwards does not re-enter it, so a redistribution DTensor decides on inside its own dispatch would go unseen: ops on
DTensors are handed back to DTensor (`NotImplemented`), which runs them and issues plain-tensor ops (and collectives) that
do come back here. Nothing is counted twice.

Convention, the same for every kind: the bytes a rank counts are the sizes (numel x element size) of the tensors it gives the
collective as *input*, summed over calls, on every rank:
- all_gather: this rank's shard (the output is world x that);
- reduce_scatter: this rank's full-size input (world x its output);
- all_to_all: this rank's whole input, including the chunk it keeps for itself;
- all_reduce: the tensor;
- broadcast: the tensor, on the source and on every receiver alike.
This is what the API moves, not what travels on the wire (a ring all-reduce sends about 2 x (world-1)/world of it; gloo runs
some collectives as others). FSDP2 pads every parameter's dim 0 to a multiple of the shard-group size, so its counts are of
the padded sizes. Gather, scatter, reduce-to-one and point-to-point ops (set-up only, none in a training step) are not counted.

Cost: nothing unless enabled. When on, every aten op passes through one Python call (~4.5 us more per op on CPU), and
torch.compile'd code runs eagerly while any dispatch mode is active (measured, torch 2.14): count a sampled step (say
every log step), never every step of a timed or compiled run.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

KINDS = ("all_gather", "reduce_scatter", "all_to_all", "all_reduce", "broadcast")
_NAMESPACES = frozenset({"c10d", "_c10d_functional", "_dtensor"})

# op (namespace::name) -> (kind, index of the input argument in its schema)
_OPS: dict[str, tuple[str, int]] = {
    "c10d::allgather_": ("all_gather", 1),
    "c10d::_allgather_base_": ("all_gather", 1),
    "c10d::allgather_coalesced_": ("all_gather", 1),
    "c10d::allgather_into_tensor_coalesced_": ("all_gather", 1),
    "c10d::reduce_scatter_": ("reduce_scatter", 1),
    "c10d::_reduce_scatter_base_": ("reduce_scatter", 1),
    "c10d::reduce_scatter_tensor_coalesced_": ("reduce_scatter", 1),
    "c10d::alltoall_": ("all_to_all", 1),
    "c10d::alltoall_base_": ("all_to_all", 1),
    "c10d::allreduce_": ("all_reduce", 0),
    "c10d::allreduce_coalesced_": ("all_reduce", 0),
    "c10d::broadcast_": ("broadcast", 0),
    "_c10d_functional::all_gather_into_tensor": ("all_gather", 0),
    "_c10d_functional::all_gather_into_tensor_out": ("all_gather", 0),
    "_c10d_functional::all_gather_into_tensor_coalesced": ("all_gather", 0),
    "_c10d_functional::reduce_scatter_tensor": ("reduce_scatter", 0),
    "_c10d_functional::reduce_scatter_tensor_out": ("reduce_scatter", 0),
    "_c10d_functional::reduce_scatter_tensor_coalesced": ("reduce_scatter", 0),
    "_c10d_functional::all_to_all_single": ("all_to_all", 0),
    "_c10d_functional::all_reduce": ("all_reduce", 0),
    "_c10d_functional::all_reduce_": ("all_reduce", 0),
    "_c10d_functional::all_reduce_coalesced": ("all_reduce", 0),
    "_c10d_functional::all_reduce_coalesced_": ("all_reduce", 0),
    "_c10d_functional::broadcast": ("broadcast", 0),
    "_c10d_functional::broadcast_": ("broadcast", 0),
    "_dtensor::shard_dim_alltoall": ("all_to_all", 0),
}


def tensor_bytes(value: Any) -> int:
    """Bytes of a tensor, or of every tensor in a (nested) list of them."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


class CommCounter(TorchDispatchMode):
    """`with CommCounter() as cc: step()`, then `cc.bytes_by_kind` / `cc.calls_by_kind`; `cc.reset()` between steps.

    With `enabled=False` entering and leaving do nothing, so a trainer can always write `with counter:`.
    """

    def __init__(self, enabled: bool = True):
        super().__init__()
        self.enabled = enabled
        self.bytes_by_kind: dict[str, int] = {}
        self.calls_by_kind: dict[str, int] = {}
        self.reset()

    def reset(self) -> None:
        self.bytes_by_kind = dict.fromkeys(KINDS, 0)
        self.calls_by_kind = dict.fromkeys(KINDS, 0)

    def __enter__(self) -> "CommCounter":
        if self.enabled:
            super().__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs: Optional[dict] = None):
        kwargs = kwargs or {}
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # let DTensor run: the plain-tensor ops and collectives it issues come back here
        if isinstance(func, torch._ops.OpOverload) and func.namespace in _NAMESPACES:
            entry = _OPS.get(func._schema.name)
            if entry is not None:
                kind, index = entry
                payload = args[index] if index < len(args) else kwargs[func._schema.arguments[index].name]
                self.bytes_by_kind[kind] += tensor_bytes(payload)
                self.calls_by_kind[kind] += 1
        return func(*args, **kwargs)
