"""Process-group setup shared by every entry point (torchrun, the deepspeed launcher, or a plain single process)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_minutes: float = 30.0) -> DistEnv:
    """Join the process group the launcher describes (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR env, as torchrun and
    the deepspeed launcher set them); NCCL on CUDA, gloo on CPU. Without those variables this is one process."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            raise RuntimeError(f"WORLD_SIZE={world} but MASTER_ADDR is not set: launch with torchrun or the deepspeed launcher")
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            rank=rank,
            world_size=world,
            timeout=timedelta(minutes=timeout_minutes),
        )
    return DistEnv(rank, world, local_rank, device)


def shutdown(clean: bool = True) -> None:
    """Barrier + destroy, so no rank leaves while another still talks to it; after a failure (clean=False) destroy only,
    since the other ranks may never reach the barrier."""
    if dist.is_available() and dist.is_initialized():
        try:
            if clean:
                dist.barrier()
        finally:
            dist.destroy_process_group()


def any_rank(flag: bool, world_size: int, device: torch.device) -> bool:
    """True on every rank if it is true on any rank (so all ranks take the same branch)."""
    if world_size == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
