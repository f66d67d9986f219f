"""The one-command CPU demo: HuMoVe-mini -> Phase 1 -> Phase 2 (2 processes, gloo) -> export -> sample all four tasks on
held-out data -> evaluate -> report.md with loss curves and the samples side by side.

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
from typing import Any, Optional

from PIL import Image, ImageDraw

from .metrics import read_metrics

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


def loss_curve_png(runs: list[tuple[str, Path]], path: Path, width: int = 720, height: int = 300) -> None:
    """Loss per step of each run, one after another on a shared log-scale axis (drawn with PIL: no plotting dependency)."""
    import math

    series = []
    offset = 0
    for name, run_dir in runs:
        recs = read_metrics(run_dir)
        pts = [(offset + r["step"], r["loss"]) for r in recs if r.get("loss") is not None and r["loss"] > 0]
        series.append((name, pts))
        offset += max((r["step"] for r in recs), default=0)
    ys = [math.log10(y) for _, pts in series for _, y in pts]
    lo, hi = min(ys), max(ys)
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    pad = 40
    d.rectangle([pad, 10, width - 10, height - pad], outline="black")
    colours = ["#1f77b4", "#d62728"]
    for i, (name, pts) in enumerate(series):
        xy = [(pad + (width - pad - 10) * x / max(1, offset), 10 + (height - pad - 10) * (hi - math.log10(y)) / max(1e-9, hi - lo))
              for x, y in pts]
        if len(xy) > 1:
            d.line(xy, fill=colours[i % 2], width=1)
        d.text((pad + 10 + 200 * i, height - pad + 8), f"{name} loss", fill=colours[i % 2])
    d.text((2, 10), f"{10 ** hi:.3g}", fill="black")
    d.text((2, height - pad - 10), f"{10 ** lo:.3g}", fill="black")
    d.text((width - 60, height - pad + 8), f"step {offset}", fill="black")
    img.save(path)


def write_report(out: Path, timings: dict[str, float], evaluation: Optional[dict[str, Any]], samples: dict[str, list[Path]]) -> Path:
    lines = ["# EchoMotion CPU demo", "",
             "Tiny dual-stream model trained on HuMoVe-mini: Phase 1 (motion only), then Phase 2 (joint, motion->video, "
             "video->motion), 2 processes on gloo. Everything below was produced by `python -m echomotion.demo`.", "",
             "## Loss", "", "![loss curves](loss.png)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in timings.items()]
    if evaluation is not None:
        lines += ["", "## Evaluation on held-out clips (tools/evaluate.py)", "", "| metric | value | baseline | better |", "|---|---|---|---|"]
        metrics = evaluation["metrics"]
        for name, base in evaluation["baselines"].items():
            lines.append(f"| {name} | {metrics[name]:.4g} | {base} = {metrics[base]:.4g} | {evaluation['better_than_baseline'][name]} |")
        lines += ["", "Lower is better for all metrics; units: MPJPE in mm-equivalent (root-relative), video errors in mean "
                  "absolute uint8 pixel error. For scale: a reader that got every joint's image position exactly but no "
                  f"depth would score v2m_mpjpe_depth_unknown = {metrics['v2m_mpjpe_depth_unknown']:.4g} (the camera is "
                  "orthographic)."]
    titles = {"t2vm": "text -> video + motion (video | skeleton of the generated motion)",
              "t2m": "text -> motion (skeleton)",
              "m2v": "motion -> video (generated video | skeleton of the given motion)",
              "v2m": "video -> motion (given video | skeleton of the generated motion)"}
    for task, dirs in samples.items():
        lines += ["", f"## {titles[task]}", ""]
        for d in dirs:
            caption = (d / "caption.txt").read_text().strip()
            lines += [f"![{d.name}]({d.relative_to(out)}/preview.gif) `{d.name}`: {caption}", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--clips", type=int, default=200)
    p.add_argument("--motion-only-clips", type=int, default=100)
    p.add_argument("--frames", type=int, default=9, help="frames per clip (1 + 4k); 9 keeps CPU steps short")
    p.add_argument("--phase1-steps", type=int, default=600)
    p.add_argument("--phase2-steps", type=int, default=1500)
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
              "--seed", "0", "--motion-only-clips", str(a.motion_only_clips), "--frames", str(a.frames)],
             f"HuMoVe-mini: {a.clips} clips of {a.frames} frames")
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
    _run([sys.executable, str(ROOT / "tools/export_checkpoint.py"), "--checkpoint", str(phase2), "--out", str(model)], "export")
    timings["export"] = time.time() - t0

    t0 = time.time()
    from .sample import InferenceContext, write_outputs

    ctx = InferenceContext(model, data)
    held = ctx.clips("heldout")[: a.samples]
    samples: dict[str, list[Path]] = {}
    print(f"\n=== sampling 4 tasks on {len(held)} held-out clips", flush=True)
    for task in ("t2vm", "t2m", "m2v", "v2m"):
        prompts = [c.caption for c in held] if task in ("t2vm", "t2m") else []
        clips = held if task in ("m2v", "v2m") else []
        gens = ctx.generate(task, prompts=prompts, clips=clips, seed=0)
        for g, c in zip(gens, held):
            g.name = c.clip_id  # name every sample after its held-out clip
        samples[task] = [write_outputs(g, out / "samples" / task, ctx.fps) for g in gens]
        print(f"  {task}: {len(gens)} samples", flush=True)
    timings["sampling"] = time.time() - t0

    t0 = time.time()
    evaluation = None
    evaluate = ROOT / "tools/evaluate.py"
    if evaluate.exists():
        _run([sys.executable, str(evaluate), "--checkpoint", str(model), "--data", str(data), "--out", str(out / "eval.json")],
             "evaluation on held-out clips")
        evaluation = json.loads((out / "eval.json").read_text())
    timings["evaluation"] = time.time() - t0

    loss_curve_png([("phase 1", out / "phase1"), ("phase 2", out / "phase2")], out / "loss.png")
    report = write_report(out, timings, evaluation, samples)
    print(f"\nreport: {report}  (total {sum(timings.values()):.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
