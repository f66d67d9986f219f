"""Run the real training step of the tiny model under one parallel layout on a fixed global batch; rank 0 writes losses,
gradient norms, the full gradients after step 1 and per-rank state bytes to a .pt file.

    torchrun --nproc_per_node=N tests/distributed/layout_worker.py OUT.pt --steps 3 [--save-at K] [--resume CKPT] key=value...

Every layout sees the same global batch each step (GLOBAL_BATCH samples, built from a seed); data-parallel rank r takes
its contiguous share, as the loader's replication gives the TP x SP ranks of a group the same samples. Run without
torchrun it is the single-process reference.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from echomotion.config import load_config  # noqa: E402
from echomotion.data.batch import Batch  # noqa: E402
from echomotion.distributed import init_distributed, shutdown  # noqa: E402
from echomotion.motion.smpl import MOTION_FEATURE_DIM  # noqa: E402
from echomotion.train import Trainer  # noqa: E402

GLOBAL_BATCH = 4
MOTION_FRAMES = 5  # 255 motion tokens: not a multiple of sp, so the pads are exercised
VIDEO_LATENT = (48, 3, 3, 5)  # 45 video tokens with the tiny config's 1x1x1 patch
REAL_FRAMES = (5, 3, 4, 5)


def global_batch(step: int, phase: int, cfg) -> Batch:
    g = torch.Generator().manual_seed(1000 + step)
    b = GLOBAL_BATCH
    text_len, text_dim = cfg.model.text_len, cfg.model.text_dim
    motion_mask = torch.arange(MOTION_FRAMES)[None, :] < torch.tensor(REAL_FRAMES)[:, None]
    return Batch(
        video=torch.randn(b, *VIDEO_LATENT, generator=g) if phase == 2 else None,
        motion=torch.randn(b, MOTION_FRAMES, MOTION_FEATURE_DIM, generator=g) * motion_mask[..., None],
        motion_mask=motion_mask,
        text=torch.randn(b, text_len, text_dim, generator=g),
        text_lengths=torch.full((b,), text_len),
        has_video=torch.full((b,), phase == 2),
        clip_ids=[f"clip-{step}-{i}" for i in range(b)],
        captions=[""] * b,
    )


def share(batch: Batch, rank: int, ranks: int) -> Batch:
    per = GLOBAL_BATCH // ranks
    part = slice(rank * per, (rank + 1) * per)
    return Batch(
        video=None if batch.video is None else batch.video[part],
        motion=batch.motion[part],
        motion_mask=batch.motion_mask[part],
        text=batch.text[part],
        text_lengths=batch.text_lengths[part],
        has_video=batch.has_video[part],
        clip_ids=batch.clip_ids[part],
        captions=batch.captions[part],
    )


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def local_bytes(tensors) -> int:
    """Bytes of the storage this rank holds for these tensors (a DTensor's local shard, padding included)."""
    seen, total = set(), 0
    for t in tensors:
        local = t.to_local() if isinstance(t, DTensor) else t
        storage = local.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--save-at", type=int, default=0, help="write a checkpoint after this step")
    ap.add_argument("--phases", default="", help="comma-separated phases run one after another in this process group "
                    "(each in run_dir/phase<N>); OUT then maps phase -> record. Default: the config's phase alone")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    env = init_distributed()
    if args.phases:
        record = {}
        for phase in map(int, args.phases.split(",")):
            overrides = [f"{o}/phase{phase}" if o.startswith("train.run_dir=") else o for o in args.overrides]
            record[phase] = run(load_config(ROOT / "configs/tiny.yaml", [*overrides, f"train.phase={phase}"]), env, args)
    else:
        record = run(load_config(ROOT / "configs/tiny.yaml", args.overrides), env, args)
    if env.is_main:
        torch.save(record, args.out)
    print(f"rank {env.rank} done", flush=True)
    shutdown()


def run(cfg, env, args: argparse.Namespace) -> dict:
    """The steps of one training run under this process group: its record (complete on rank 0)."""
    trainer = Trainer(cfg, env)
    ranks = trainer.par.layout.dp
    record: dict = {"loss": {}, "grad_norm": {}, "tasks": set(), "layout": trainer.par.layout}

    def full_gradient(p: torch.nn.Parameter):
        if cfg.parallel.engine == "deepspeed":
            if cfg.parallel.zero_stage < 3 or trainer.engine.ds.zero_cpu_offload():
                return None  # ZeRO-1/2 and ZeRO-Offload finish gradients in engine.step(): no full gradient before it
            from parallel.deepspeed_engine import full_gradient as zero_gradient

            return zero_gradient(p)
        return None if p.grad is None else full(p.grad).clone()  # a copy: clipping scales p.grad in place

    forward_backward = trainer.forward_backward

    def capture(batches):  # the gradients of step 1, reduced but not yet clipped or applied
        acc = forward_backward(batches)
        if trainer.step == 0:
            grads = {n: full_gradient(p) for n, p in trainer.model.named_parameters() if p.requires_grad}
            record["grads"] = {n: g for n, g in grads.items() if g is not None}
            params = list(trainer.model.parameters())
            record["param_grad_bytes"] = local_bytes(params) + local_bytes([p.grad for p in params if p.grad is not None])
        return acc

    trainer.forward_backward = capture
    batches = (share(global_batch(s, cfg.train.phase, cfg), trainer.par.dp_rank, ranks) for s in range(10**6))
    for _ in range(trainer.step):  # resumed: skip the batches already trained on
        next(batches)
    while trainer.step < args.steps:
        rec = trainer.train_step(batches)
        record["loss"][rec["step"]] = rec["loss"]
        record["grad_norm"][rec["step"]] = rec["grad_norm"]
        record.setdefault("lr", {})[rec["step"]] = rec["lr"]
        record.setdefault("skipped", {})[rec["step"]] = rec["skipped_steps"]
        record["tasks"] |= {k.split("/")[1] for k in rec if k.startswith("loss/") and k.count("/") == 2}
        record.setdefault("logs", {})[rec["step"]] = {k: v for k, v in rec.items() if k.startswith("loss/")}
        if rec["step"] == 1:
            record["comm"] = {k: v for k, v in rec.items() if k.startswith("comm/")}
        if trainer.evaluate(rec):  # the held-out losses of the eval steps (train.eval_every and the last step)
            record.setdefault("eval", {})[rec["step"]] = {k: v for k, v in rec.items() if k.startswith("eval/loss/")}
        if rec["step"] == args.save_at:
            trainer.save()
            trainer.ckpt.wait()
    state = [s for st in trainer.optimizer.state.values() for s in st.values() if torch.is_tensor(s) and s.dim() > 0]
    mine = record.get("param_grad_bytes", 0) + local_bytes(state)
    if env.world_size > 1:  # the largest rank's parameter + gradient + optimizer bytes
        every = [0] * env.world_size
        torch.distributed.all_gather_object(every, mine)
        mine = max(every)
    record["state_bytes"] = mine
    return record


if __name__ == "__main__":
    main()
