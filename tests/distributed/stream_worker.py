"""torchrun worker for test_streaming_dist.py: reads HuMoVe shards with build_dataloader and records what each rank saw.

    torchrun --nproc_per_node=2 tests/distributed/stream_worker.py spec.json

spec.json: {"out": folder, "phases": [phase, ...]}; each phase builds a fresh loader and reads one epoch (or part of one):
  name            output file <out>/<name>.rank<r>.json: {"batches": [[clip ids], ...], "has_video": [...], "shapes": [...]}
  overrides       config dotlist (data.path=..., data.batch_size=..., ...)
  replication     consecutive ranks that see the same samples (default 1)
  load_state      a state_dict() JSON to resume from
  save_state      (path, k): rank 0 writes state_dict() after k batches, and reading goes on
  stop_after      stop after this many batches
  pause_after     after this many batches write <out>/<name>.rank<r>.paused and wait until <out>/<name>.go exists
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch.distributed as dist

from echomotion.config import load_config
from echomotion.data.loader import build_dataloader


def run_phase(phase: dict, out: Path, rank: int, world_size: int) -> None:
    cfg = load_config(None, phase["overrides"])
    _, loader = build_dataloader(cfg, rank=rank, world_size=world_size, replication=phase.get("replication", 1))
    if phase.get("load_state"):
        loader.load_state_dict(json.loads(Path(phase["load_state"]).read_text()))
    name = phase["name"]
    record: dict[str, list] = {"batches": [], "has_video": [], "shapes": []}
    for step, batch in enumerate(loader, start=1):
        record["batches"].append(batch.clip_ids)
        record["has_video"].append(bool(batch.has_video.all()))
        record["shapes"].append([list(batch.motion.shape), None if batch.video is None else list(batch.video.shape)])
        if phase.get("save_state") and phase["save_state"][1] == step and rank == 0:
            Path(phase["save_state"][0]).write_text(json.dumps(loader.state_dict()))
        if phase.get("pause_after") == step:
            (out / f"{name}.rank{rank}.paused").touch()
            while not (out / f"{name}.go").exists():
                time.sleep(0.1)
        if phase.get("stop_after") == step:
            break
    (out / f"{name}.rank{rank}.json").write_text(json.dumps(record))
    dist.barrier()


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo")
    for phase in spec["phases"]:
        run_phase(phase, Path(spec["out"]), rank, world_size)
    dist.barrier()
    dist.destroy_process_group()
    print(f"rank {rank} done", flush=True)


if __name__ == "__main__":
    main()
