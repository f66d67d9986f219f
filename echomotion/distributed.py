"""Process-group setup shared by every entry point (torchrun, the deepspeed launcher, or a plain single process)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Optional

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


def enable_flight_recorder(folder: Path, entries: int = 2000) -> None:
    """PyTorch's flight recorder: every rank keeps its last `entries` collectives, and a collective that times out makes
    each rank dump them to folder/rank_<r> (op, group, sequence number, which ranks joined): the dump names the stuck
    collective and the rank that never came. Must run before the process group exists; variables the operator set win."""
    folder.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCH_FR_BUFFER_SIZE", str(entries))
    os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
    os.environ.setdefault("TORCH_FR_DUMP_TEMP_FILE", str(folder / "rank_"))


def init_distributed(timeout_s: float = 1800.0, flight_recorder: Optional[Path] = None) -> DistEnv:
    """Join the process group the launcher describes (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR env, as torchrun and
    the deepspeed launcher set them); NCCL on CUDA, gloo on CPU. Without those variables this is one process.
    `timeout_s`: how long a collective waits for the other ranks before it fails; `flight_recorder`: where a timeout's
    dump goes (`enable_flight_recorder`)."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        if flight_recorder is not None:
            enable_flight_recorder(flight_recorder)
        if "MASTER_ADDR" not in os.environ:
            raise RuntimeError(f"WORLD_SIZE={world} but MASTER_ADDR is not set: launch with torchrun or the deepspeed launcher")
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=timeout_s),
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


def first_problem(problem: Optional[str], env: DistEnv) -> Optional[str]:
    """Collective: the lowest rank's start-up problem (None if no rank has one), on every rank, so that all ranks stop
    together with the same message when one of them (rank 0 alone takes the run-directory lock) cannot start."""
    if env.world_size == 1:
        return problem
    found: list[Optional[str]] = [None] * env.world_size
    dist.all_gather_object(found, problem)
    rank, first = next(((r, p) for r, p in enumerate(found) if p is not None), (0, None))
    return first if first is None or rank == 0 else f"rank {rank}: {first}"
