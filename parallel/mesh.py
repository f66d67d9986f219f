"""The device mesh: which ranks split the data, the tokens and the weights.

Dimensions, outermost first: (dp_replicate, dp_shard, sp, tp). TP is innermost so its all-reduces stay inside a node; the
TP x SP ranks of one group are consecutive and read the same samples (the loader's `replication`). FSDP2 shards over the
flattened (dp_shard, sp) ranks, replicating over dp_replicate (HSDP); the loss is normalized over (dp_replicate, dp_shard).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from echomotion.config import ConfigError, ModelConfig, ParallelConfig

DIMS = ("dp_replicate", "dp_shard", "sp", "tp")


@dataclass(frozen=True)
class Layout:
    """Degrees of every mesh dimension; their product is the world size."""

    dp_replicate: int = 1
    dp_shard: int = 1
    sp: int = 1
    tp: int = 1

    @property
    def world(self) -> int:
        return self.dp_replicate * self.dp_shard * self.sp * self.tp

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many distinct slices of the global batch exist."""
        return self.dp_replicate * self.dp_shard

    @property
    def replication(self) -> int:
        """Consecutive ranks that hold the same samples (one TP x SP group)."""
        return self.sp * self.tp

    @property
    def shard_group(self) -> int:
        """Ranks one FSDP2 parameter is sharded over (the sequence-parallel ranks shard too)."""
        return self.dp_shard * self.sp

    @property
    def fsdp(self) -> bool:
        """Whether FSDP2 applies at all (some rank shares parameters or gradients with another)."""
        return self.shard_group * self.dp_replicate > 1

    def describe(self) -> str:
        return " x ".join(f"{d}={getattr(self, d)}" for d in DIMS)


def resolve_layout(p: ParallelConfig, world_size: int, model: ModelConfig) -> Layout:
    """Fill `dp_shard=-1` and check the layout against the world size; errors name the constraint and valid choices."""
    fixed = p.dp_replicate * p.sp * p.tp
    if p.dp_shard == -1:
        if world_size % fixed:
            raise ConfigError(
                f"world size {world_size} is not divisible by parallel.dp_replicate x parallel.sp x parallel.tp = "
                f"{p.dp_replicate} x {p.sp} x {p.tp} = {fixed}; choose degrees whose product divides {world_size} "
                f"(divisors: {divisors(world_size)})"
            )
        layout = Layout(p.dp_replicate, world_size // fixed, p.sp, p.tp)
    else:
        layout = Layout(p.dp_replicate, p.dp_shard, p.sp, p.tp)
        if layout.world != world_size:
            raise ConfigError(
                f"parallel layout {layout.describe()} needs {layout.world} processes but the job has {world_size}; "
                "set parallel.dp_shard=-1 to fill the world size, or launch that many processes"
            )
    if model.num_heads % (layout.tp * layout.sp):
        pairs = [(t, s) for t in divisors(model.num_heads) for s in divisors(model.num_heads // t) if world_size % (t * s) == 0]
        raise ConfigError(
            f"model.num_heads={model.num_heads} is not divisible by parallel.tp x parallel.sp = {layout.tp} x {layout.sp}: "
            f"TP splits the heads and Ulysses scatters the rest; valid (tp, sp) on {world_size} processes: "
            + ", ".join(f"({t}, {s})" for t, s in pairs)
        )
    if p.engine == "deepspeed" and layout.tp > 1:
        raise ConfigError("parallel.engine=deepspeed does not combine with tensor parallel: set parallel.tp=1 or engine=fsdp")
    return layout


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass
class ParallelContext:
    """The mesh and the sub-meshes a training step talks to; every mesh is None for a single process.

    Sub-meshes are created once, here, on every rank: creating a process group is itself a collective.
    """

    layout: Layout
    rank: int
    mesh: Optional[DeviceMesh] = None
    dp_mesh: Optional[DeviceMesh] = None  # (dp_replicate, dp_shard) flattened: the loss normalization group
    fsdp_mesh: Optional[DeviceMesh] = None  # (dp_shard x sp), or (dp_replicate, dp_shard x sp) for HSDP
    sp_mesh: Optional[DeviceMesh] = None
    tp_mesh: Optional[DeviceMesh] = None

    @property
    def dp_rank(self) -> int:
        """This rank's slice of the global batch."""
        return self.rank // self.layout.replication

    def sum_over_dp(self, t: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over the data-parallel ranks (each TP x SP group counted once); no autograd."""
        if self.dp_mesh is None:
            return t
        t = t.clone()
        dist.all_reduce(t, group=self.dp_mesh.get_group())
        return t


def build_parallel(p: ParallelConfig, model: ModelConfig, rank: int, world_size: int, device: torch.device) -> ParallelContext:
    layout = resolve_layout(p, world_size, model)
    if world_size == 1:
        return ParallelContext(layout, rank)
    mesh = init_device_mesh(device.type, tuple(getattr(layout, d) for d in DIMS), mesh_dim_names=DIMS)
    ctx = ParallelContext(layout, rank, mesh)
    if layout.dp > 1:
        ctx.dp_mesh = mesh["dp_replicate", "dp_shard"]._flatten("dp")
    if layout.fsdp:
        shard = mesh["dp_shard", "sp"]._flatten("dp_shard_sp")
        ctx.fsdp_mesh = mesh["dp_replicate", "dp_shard_sp"] if layout.dp_replicate > 1 else shard
    if layout.sp > 1:
        ctx.sp_mesh = mesh["sp"]
    if layout.tp > 1:
        ctx.tp_mesh = mesh["tp"]
    return ctx
