"""The one-command CPU demo: HuMoVe-mini -> Phase 1 -> Phase 2 (2 processes, gloo) -> export -> sample all four tasks on
held-out data -> evaluate -> report.md with per-task loss curves (loss.png), the metrics table and one sample grid per
task (samples/<task>/grid.png and grid.gif: generated output, its condition and, for m2v / v2m, the ground truth).

    python -m echomotion.demo --out runs/demo

Every stage is an ordinary entry point (the same commands a user runs on a cluster), launched here one after another.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from .report import loss_curve_png, write_report

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], what: str) -> None:
    print(f"\n=== {what}\n$ {' '.join(cmd)}", flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"demo stage failed ({what}), exit {proc.returncode}: {' '.join(cmd)}")


def _train(out: Path, nproc: int, phase: int, steps: int, extra: list[str]) -> Path:
    run_dir = out / f"phase{phase}"
    data = out / "data"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "echomotion.train",
        "--config", str(ROOT / "configs/demo.yaml"),
        f"data.path={data / 'train'}", f"data.stats_path={data / 'motion_stats.json'}",
        f"data.null_text_path={data / 'null_text.pt'}", f"train.run_dir={run_dir}", f"train.phase={phase}",
        f"train.steps={steps}", *extra,
    ]
    _run(cmd, f"Phase {phase}: {steps} steps on {nproc} processes")
    latest = sorted((run_dir / "checkpoints").glob("step-*[0-9]"))[-1]
    return latest


def sample_all_tasks(model: Path, data: Path, out: Path,
                     n: int) -> tuple[dict[str, list[Path]], dict[str, tuple[Path, Path]]]:
    """Sample the four tasks on the first n held-out clips: per-sample folders (write_outputs) and one grid per task.
    The clips' ground truth goes into the grids too: m2v's video next to the real one, v2m's motion next to the real
    joints."""
    from .report import held_out_grids
    from .sample import InferenceContext, write_outputs

    ctx = InferenceContext(model, data)
    held = ctx.clips("heldout")[:n]
    print(f"\n=== sampling 4 tasks on {len(held)} held-out clips", flush=True)
    samples: dict[str, list[Path]] = {}
    grids: dict[str, tuple[Path, Path]] = {}
    for task, (gens, grid) in held_out_grids(ctx, held, ("t2vm", "t2m", "m2v", "v2m"), out / "samples").items():
        samples[task] = [write_outputs(g, out / "samples" / task, ctx.fps) for g in gens]
        grids[task] = grid
        print(f"  {task}: {len(gens)} samples", flush=True)
    return samples, grids


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--clips", type=int, default=200)
    p.add_argument("--motion-only-clips", type=int, default=100)
    p.add_argument("--frames", type=int, default=5, help="frames per clip (1 + 4k); 5 keeps CPU steps short")
    p.add_argument("--height", type=int, default=32)
    p.add_argument("--width", type=int, default=16, help="a portrait frame the person fills (half the tokens of 32)")
    p.add_argument("--phase1-steps", type=int, default=150)
    p.add_argument("--phase2-steps", type=int, default=1300)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--samples", type=int, default=4, help="held-out prompts/clips per task")
    a = p.parse_args(argv)
    out = Path(a.out).resolve()
    if (out / "report.md").exists():
        raise SystemExit(f"{out} already holds a finished demo; pass another --out or delete it")
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    t0 = time.time()
    data = out / "data"
    if not (data / "dataset.json").exists():
        _run([sys.executable, str(ROOT / "tools/make_humove_mini.py"), "--out", str(data), "--clips", str(a.clips),
              "--seed", "0", "--motion-only-clips", str(a.motion_only_clips), "--frames", str(a.frames),
              "--height", str(a.height), "--width", str(a.width), "--codec", "pca", "--no-progress"],
             f"HuMoVe-mini: {a.clips} clips of {a.frames} frames, {a.height} x {a.width}")
    timings["data"] = time.time() - t0

    t0 = time.time()
    motion_only = [f"data.motion_only_path={data / 'motion_only'}", "data.proportions=[1,1]"] if a.motion_only_clips else []
    phase1 = _train(out, a.nproc, 1, a.phase1_steps, motion_only)
    timings["phase 1"] = time.time() - t0
    t0 = time.time()
    phase2 = _train(out, a.nproc, 2, a.phase2_steps, [f"train.init_from={phase1}"])
    timings["phase 2"] = time.time() - t0

    t0 = time.time()
    model = out / "echomotion-tiny.safetensors"
    _run([sys.executable, str(ROOT / "tools/export_checkpoint.py"), "--checkpoint", str(phase2), "--out", str(model), "--ema"],
         "export (the EMA weights)")
    timings["export"] = time.time() - t0

    t0 = time.time()
    samples, grids = sample_all_tasks(model, data, out, a.samples)
    timings["sampling"] = time.time() - t0

    t0 = time.time()
    _run([sys.executable, str(ROOT / "tools/evaluate.py"), "--checkpoint", str(model), "--data", str(data),
          "--out", str(out / "eval.json")], "evaluation on held-out clips")
    evaluation = json.loads((out / "eval.json").read_text())
    timings["evaluation"] = time.time() - t0

    loss_curve_png([("phase 1", out / "phase1"), ("phase 2", out / "phase2")], out / "loss.png")
    report = write_report(out, timings, evaluation, grids, samples)
    print(f"\nreport: {report}  (total {sum(timings.values()):.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
