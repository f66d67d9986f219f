r"""Evaluate an exported EchoMotion model on held-out HuMoVe-mini clips: V2M pose and 2-D joint error, M2V video error
and silhouette fit, T2VM consistency, colours and silhouette fit, T2M action accuracy, each next to the baselines it
must beat (see echomotion/evaluate.py for the definitions, directions and units).

    python tools/evaluate.py --checkpoint runs/tiny/model.safetensors --data data/humove-mini --out eval.json
    python tools/evaluate.py ... --split heldout --max-clips 16 --steps 20 --seed 0 --solver euler \
        --text-guidance 6 --condition-guidance 2

Sampling settings default to the exported config's `sample` section. Prints a table (value, direction, baselines and
whether the metric beats all of them) and writes the JSON report (metrics, baselines, higher_is_better,
better_than_baseline, counts, settings, units, reference checks and per-clip values). A bad flag, split or
checkpoint prints `evaluate: <what to change>` and exits 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from echomotion.cli import user_errors  # noqa: E402
from echomotion.diffusion.sampler import SOLVERS  # noqa: E402
from echomotion.evaluate import EvalSettings, EvaluationError, evaluate  # noqa: E402
from echomotion.export import ExportError, load_exported  # noqa: E402


CHECK_NOTES = {
    "render_vs_gt_video_error": "(reference check, ~0)",
    "fk_vs_gt_joints_mpjpe": "(reference check, ~0)",
    "gt_silhouette_iou": "(ceiling: the true video and motion)",
    "gt_action_acc": "(ceiling: the true motion)",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="exported .safetensors (tools/export_checkpoint.py)")
    p.add_argument("--data", required=True, help="HuMoVe-mini folder (dataset.json, shards, motion_stats.json, ...)")
    p.add_argument("--out", required=True, help="where to write the JSON report")
    p.add_argument("--split", default="heldout", help="shard folder under --data to evaluate on")
    p.add_argument("--max-clips", type=int, help="evaluate the first N clips of the split (default: all)")
    p.add_argument("--batch-size", type=int, default=8, help="clips sampled together")
    p.add_argument("--steps", type=int, help="sampling steps (default: the config's sample.steps)")
    p.add_argument("--shift", type=float, help="noise schedule shift (default: sample.shift)")
    p.add_argument("--seed", type=int, help="sampling seed (default: sample.seed)")
    p.add_argument("--solver", choices=SOLVERS, help="ODE solver (default: sample.solver)")
    p.add_argument("--text-guidance", type=float, help="omega_1 (default: sample.text_guidance)")
    p.add_argument("--condition-guidance", type=float, help="omega_2 (default: sample.condition_guidance)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--vae-path", help="the Wan VAE folder, if a wan-vae dataset's recorded path moved")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def format_table(report: dict[str, Any]) -> str:
    """One row per metric (every value that is no other metric's baseline): value, direction, its baselines with their
    values, and whether it beats all of them; then the reference checks."""
    m, bases, higher = report["metrics"], report["baselines"], report["higher_is_better"]
    used = {b for bs in bases.values() for b in bs}
    rows = [("metric", "value", "better is", "baselines", "better")]
    for name in m:
        if name in used:
            continue
        listed = ", ".join(f"{b} {m[b]:.3f}" for b in bases.get(name, ()))
        better = ("yes" if report["better_than_baseline"][name] else "NO") if name in bases else "(reference)"
        rows.append((name, f"{m[name]:.3f}", "higher" if higher[name] else "lower", listed, better))
    rows += [(name, f"{v:.3f}", "", CHECK_NOTES.get(name, ""), "") for name, v in report["checks"].items()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    with user_errors("evaluate", EvaluationError, ExportError, FileNotFoundError):
        model, cfg = load_exported(a.checkpoint, device=a.device)
        settings = EvalSettings.from_config(
            cfg.sample, steps=a.steps, shift=a.shift, seed=a.seed, solver=a.solver, text_guidance=a.text_guidance,
            condition_guidance=a.condition_guidance, batch_size=a.batch_size, max_clips=a.max_clips,
        )
        report = evaluate(model, cfg, a.data, settings, split=a.split, device=a.device, checkpoint=str(a.checkpoint),
                          vae_path=a.vae_path, progress=not a.no_progress)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    c, s = report["counts"], report["settings"]
    print(f"{c['clips']} clips ({c['frames']} frames) of {a.data}/{a.split}; {s['steps']} {s['solver']} steps, "
          f"guidance {s['text_guidance']}/{s['condition_guidance']}, seed {s['seed']}")
    print(format_table(report))
    print("units: *_mpjpe mm-equivalent (root-relative MPJPE x 1000); *_error / *_consistency mean abs pixel error on "
          "[0, 255]; v2m_2d_error pixels; *_iou on [0, 1]; *_acc fraction of clips (see the report's units)")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
