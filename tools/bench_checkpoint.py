"""How long training is blocked by a checkpoint save: synchronous against asynchronous, side by side in one run.

Two ranks (torchrun, gloo) hold an EchoMotionDiT of about 100M parameters under FSDP2 with its AdamW state (the trainer's
own engine and `CheckpointManager`, so the saves are the ones a run makes: model + both Adam moments, the `.partial` ->
meta -> rename protocol, fsync). Each repeat saves once synchronously and once asynchronously, alternating, into a fresh
folder. Blocked = the time `save()` keeps the training thread (for async: the copy to host memory and the set-up);
duration = from the call until the folder is marked complete. Both are the slowest rank's, per save.

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
from echomotion.distributed import init_distributed, shutdown  # noqa: E402
from echomotion.models import EchoMotionDiT  # noqa: E402
from echomotion.train import adamw  # noqa: E402
from parallel import build_parallel, parallelize  # noqa: E402
from parallel.engine import build_engine  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--layers", type=int, default=5, help="every layer dual (a video and a motion expert)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--nproc", type=int, default=2)
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
    return engine, n_params


def worker(a: argparse.Namespace) -> None:
    env = init_distributed(600.0, None)
    engine, n_params = build(a, env.rank, env.world_size)
    rows = []
    for repeat in range(a.repeats):
        for mode in ("sync", "async"):
            results: list[SaveResult] = []
            manager = CheckpointManager(a.dir / f"{mode}-{repeat}", 0, env.rank, {"bench": True},
                                        async_save=mode == "async", on_saved=results.append)
            t0 = time.perf_counter()
            manager.save(TrainState(step=repeat + 1), engine.state, NoLoader())
            blocked = time.perf_counter() - t0
            manager.wait()
            rows.append({"mode": mode, "repeat": repeat, "blocked_s": blocked, "duration_s": results[0].duration_s})
            torch.distributed.barrier()
            if env.rank == 0:
                shutil.rmtree(a.dir / f"{mode}-{repeat}")
    gathered = [None] * env.world_size
    torch.distributed.all_gather_object(gathered, rows)
    if env.rank == 0:
        slowest = [{**r, **{k: max(g[i][k] for g in gathered) for k in ("blocked_s", "duration_s")}}
                   for i, r in enumerate(rows)]
        a.worker.write_text(json.dumps({"params": n_params, "rows": slowest}))
    shutdown()


def report(result: dict, a: argparse.Namespace) -> None:
    rows = result["rows"]
    state_gb = result["params"] * 4 * 3 / 1e9  # fp32 weights + two Adam moments
    print(f"EchoMotionDiT dim {a.dim} x {a.layers} dual layers: {result['params'] / 1e6:.1f}M parameters, "
          f"{state_gb:.2f} GB of checkpoint state over {a.nproc} ranks")
    print(f"{'repeat':>6} {'sync blocked s':>15} {'async blocked s':>16} {'async duration s':>17}")
    for repeat in range(a.repeats):
        sync, asyn = (next(r for r in rows if r["repeat"] == repeat and r["mode"] == m) for m in ("sync", "async"))
        print(f"{repeat:>6} {sync['blocked_s']:>15.2f} {asyn['blocked_s']:>16.3f} {asyn['duration_s']:>17.2f}")
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
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={a.nproc}", __file__,
               "--dim", str(a.dim), "--layers", str(a.layers), "--repeats", str(a.repeats), "--nproc", str(a.nproc),
               "--dir", str(folder), "--worker", str(out)]
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        report(json.loads(out.read_text()), a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
