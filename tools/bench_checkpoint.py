"""How long training is blocked by a checkpoint save: synchronous against asynchronous, side by side in one run.

Two ranks (torchrun, gloo) train an EchoMotionDiT of about 100M parameters under FSDP2 with AdamW, through the trainer's
own engine and `CheckpointManager`, so the saves are the ones a run makes: model + both Adam moments, the `.partial` ->
meta -> rename protocol, fsync. Each repeat, for sync and then async: two training steps, a save, four more steps (the
write in flight during them), then the rest of the write. Per save, the slowest rank's:
- blocked: the time the training thread waits in checkpoint calls (for async: the set-up, and the optimizer step's wait
  for the host copy, which runs during the forward and backward);
- steps slower: how much longer the steps during the write took than the steps before it (threads competing for cores
  and memory bandwidth; on a GPU node the write competes only for host resources);
- duration: from the call until the folder is marked complete.

    python tools/bench_checkpoint.py                    # ~100M parameters, 3 repeats, 2 ranks
    python tools/bench_checkpoint.py --dim 512 --layers 4 --repeats 5 --dir /mnt/fast-disk/bench
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from echomotion.checkpoint import CheckpointManager, SaveResult, TrainState  # noqa: E402
from echomotion.config import Config, ModelConfig  # noqa: E402
from echomotion.diffusion.tasks import TrainingBatch, training_loss  # noqa: E402
from echomotion.motion.smpl import MOTION_FEATURE_DIM  # noqa: E402
from echomotion.distributed import init_distributed, shutdown  # noqa: E402
from echomotion.models import EchoMotionDiT  # noqa: E402
from echomotion.train import adamw  # noqa: E402
from parallel import build_engine, build_parallel, parallelize  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--layers", type=int, default=5, help="every layer dual (a video and a motion expert)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--dir", type=Path, default=None, help="where the checkpoints go (default: a temporary folder)")
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)  # set by the launcher: result file
    return p.parse_args(argv)


class NoLoader:
    """The data loader's place in a checkpoint: nothing to save here."""

    def state_dict(self) -> dict:
        return {}


def build(a: argparse.Namespace, rank: int, world: int):
    cfg = Config()
    cfg.model = ModelConfig(dim=a.dim, ffn_dim=4 * a.dim, num_heads=a.dim // 64, num_layers=a.layers, text_dim=4096)
    torch.manual_seed(0)
    model = EchoMotionDiT(cfg.model)
    n_params = sum(p.numel() for p in model.parameters())
    ctx = build_parallel(cfg.parallel, cfg.model, rank, world, torch.device("cpu"))
    engine = build_engine(parallelize(model, ctx, cfg, torch.device("cpu")), adamw(list(model.parameters()), cfg.train),
                          cfg, None)
    for p in model.parameters():  # one step on zero gradients gives Adam its two moments, as a run's optimizer has
        p.grad = torch.zeros_like(p)
    engine.optimizer.step()
    engine.optimizer.zero_grad(set_to_none=True)
    return engine, n_params, cfg


def train_steps(engine, ckpt: CheckpointManager, n: int, cfg: Config) -> list[float]:
    """`n` training steps on a fixed random batch; the optimizer step waits for an in-flight save's host copy."""
    m = cfg.model
    batch = TrainingBatch(text=torch.randn(1, m.text_len, m.text_dim), motion=torch.randn(1, 5, MOTION_FEATURE_DIM),
                          video=torch.randn(1, m.in_channels, 2, 8, 8))
    null = torch.zeros(m.text_len, m.text_dim)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        loss, _ = training_loss(engine.module, batch, 2, cfg.diffusion, null)
        engine.backward(loss)
        ckpt.before_update()
        engine.step(float(loss))
        times.append(time.perf_counter() - t0)
    return times


def one_save(engine, cfg: Config, folder: Path, rank: int, mode: str, step: int) -> dict:
    results: list[SaveResult] = []
    ckpt = CheckpointManager(folder, 0, rank, {"bench": True}, async_save=mode == "async", on_saved=results.append)
    before = train_steps(engine, ckpt, 2, cfg)
    ckpt.save(TrainState(step=step), engine.state, NoLoader())
    during = train_steps(engine, ckpt, 4, cfg)
    ckpt.wait()
    r = results[0]
    return {"mode": mode, "blocked_s": r.blocked_s, "duration_s": r.duration_s, "step_s": statistics.median(before),
            "slower_s": sum(during) - len(during) * statistics.median(before)}


def worker(a: argparse.Namespace) -> None:
    env = init_distributed(600.0, None)
    engine, n_params, cfg = build(a, env.rank, env.world_size)
    rows = []
    for repeat in range(a.repeats):
        for mode in ("sync", "async"):
            folder = a.dir / f"{mode}-{repeat}"
            rows.append({"repeat": repeat, **one_save(engine, cfg, folder, env.rank, mode, repeat + 1)})
            torch.distributed.barrier()
            if env.rank == 0:
                shutil.rmtree(folder)
    gathered = [None] * env.world_size
    torch.distributed.all_gather_object(gathered, rows)
    if env.rank == 0:
        slowest = [{**r, **{k: max(g[i][k] for g in gathered) for k in ("blocked_s", "duration_s", "slower_s", "step_s")}}
                   for i, r in enumerate(rows)]
        a.worker.write_text(json.dumps({"params": n_params, "rows": slowest}))
    shutdown()


def report(result: dict, a: argparse.Namespace) -> None:
    rows = result["rows"]
    state_gb = result["params"] * 4 * 3 / 1e9  # fp32 weights + two Adam moments
    print(f"EchoMotionDiT dim {a.dim} x {a.layers} dual layers: {result['params'] / 1e6:.1f}M parameters, "
          f"{state_gb:.2f} GB of checkpoint state over {a.ranks} ranks")
    print(f"{'repeat':>6} {'sync blocked s':>15} {'async blocked s':>16} {'async steps slower s':>21} "
          f"{'async duration s':>17}")
    for repeat in range(a.repeats):
        sync, asyn = (next(r for r in rows if r["repeat"] == repeat and r["mode"] == m) for m in ("sync", "async"))
        print(f"{repeat:>6} {sync['blocked_s']:>15.2f} {asyn['blocked_s']:>16.3f} {asyn['slower_s']:>21.2f} "
              f"{asyn['duration_s']:>17.2f}")
    print(f"a training step without a save in flight: median {statistics.median(r['step_s'] for r in rows):.2f} s")
    med = {m: statistics.median(r["blocked_s"] for r in rows if r["mode"] == m) for m in ("sync", "async")}
    print(f"median blocked: sync {med['sync']:.2f} s, async {med['async']:.3f} s; ratio {med['async'] / med['sync']:.3f} "
          "(target <= 0.10)")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.worker is not None:
        worker(a)
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as tmp:
        out = Path(tmp) / "result.json"
        folder = a.dir or Path(tmp) / "checkpoints"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.ranks}", __file__,
               "--dim", str(a.dim), "--layers", str(a.layers), "--repeats", str(a.repeats), "--ranks", str(a.ranks),
               "--dir", str(folder), "--worker", str(out)]
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        report(json.loads(out.read_text()), a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
