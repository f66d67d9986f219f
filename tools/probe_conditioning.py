r"""Does a trained model read its conditioning video? A video->motion probe that needs no sampling.

    python tools/probe_conditioning.py --checkpoint runs/demo/echomotion-tiny.safetensors --data runs/demo/data \
        --out probe.json [--split heldout --max-clips 20 --sigmas 0.5 1.0 --seed 0]

For each clip and noise level sigma, the clip's motion is noised (a fixed seed) and the model predicts the V2M velocity
with three conditions: the clip's own video, another clip's video (a fixed derangement), and the video hidden (masked
out of the keys, as a dropped condition). For each condition it reports the flow loss (MSE against the true velocity)
and the MPJPE of the model's posterior mean x0 = x_sigma - sigma * v (denormalized, SMPL forward kinematics,
root-relative, mm-equivalent as in tools/evaluate.py). At sigma = 1 the noisy motion holds nothing of the clip, so
everything the posterior mean knows about the pose came from the video. A model that reads the video scores lower with
its own video than with another clip's; equal numbers mean the video is ignored. The mean pose and
`v2m_mpjpe_depth_unknown` (exact image positions, no depth) are printed for scale.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from echomotion.evaluate import (  # noqa: E402
    EvalData,
    clip_batches,
    derangement,
    fk_joints,
    mean_pose_joints,
    root_relative_mpjpe,
    without_depth,
)
from echomotion.export import load_exported  # noqa: E402
from echomotion.models.echomotion import Task  # noqa: E402

CONDITIONS = ("own", "other", "hidden")


@torch.no_grad()
def probe(model: nn.Module, data: EvalData, sigmas: list[float], seed: int = 0, batch_size: int = 8) -> dict[str, Any]:
    """{f"{condition}@{sigma}": {"flow_mse", "mpjpe"}} plus the references; means over clips (MSE over elements)."""
    if any(not 0.0 < s <= 1.0 for s in sigmas):
        raise ValueError(f"sigmas {sigmas} must lie in (0, 1]: 1 is pure noise, 0 would be the clean motion itself")
    model.eval()
    clips = data.clips
    other = derangement(len(clips), seed)
    results: dict[str, dict[str, list[float]]] = {}
    for sigma in sigmas:
        for b, idx in enumerate(clip_batches(len(clips), batch_size)):
            motion = torch.stack([clips[i].motion for i in idx])
            gen = torch.Generator().manual_seed(seed * 1_000_003 + b)
            noise = torch.randn(motion.shape, generator=gen)
            noisy = (1 - sigma) * motion + sigma * noise
            n = len(idx)
            for condition in CONDITIONS:
                source = [int(other[i]) if condition == "other" else i for i in idx]
                pred = model(
                    video=torch.stack([clips[i].latent for i in source]),
                    video_timestep=torch.zeros(n),
                    video_mask=torch.full((n,), condition != "hidden"),
                    motion=noisy,
                    motion_timestep=torch.full((n,), sigma * 1000.0),
                    text=data.null_text.expand(n, -1, -1),
                    task=torch.full((n,), int(Task.V2M)),
                ).motion
                x0 = data.stats.denormalize(noisy - sigma * pred)
                rec = results.setdefault(f"{condition}@{sigma:g}", {"flow_mse": [], "mpjpe": []})
                rec["flow_mse"] += ((pred - (noise - motion)) ** 2).mean(dim=(1, 2)).tolist()
                rec["mpjpe"] += [root_relative_mpjpe(fk_joints(data.layer, x0[k]), clips[i].joints) for k, i in enumerate(idx)]
    mean_pose = mean_pose_joints(data.stats)
    return {
        "probe": {k: {m: float(np.mean(v)) for m, v in rec.items()} for k, rec in results.items()},
        "mean_pose_mpjpe": float(np.mean([root_relative_mpjpe(mean_pose, c.joints) for c in clips])),
        "depth_unknown_mpjpe": float(np.mean([root_relative_mpjpe(without_depth(c.joints), c.joints) for c in clips])),
        "clips": len(clips),
        "sigmas": list(sigmas),
        "seed": seed,
    }


def format_table(report: dict[str, Any]) -> str:
    rows = [f"{'condition':<16}{'flow MSE':>10}{'x0 MPJPE':>10}"]
    rows += [f"{k:<16}{v['flow_mse']:>10.4f}{v['mpjpe']:>10.1f}" for k, v in report["probe"].items()]
    rows.append(f"mean pose {report['mean_pose_mpjpe']:.1f}, exact image positions without depth "
                f"{report['depth_unknown_mpjpe']:.1f} (mm-equivalent, {report['clips']} clips)")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="exported .safetensors (tools/export_checkpoint.py)")
    p.add_argument("--data", required=True, help="HuMoVe-mini folder (dataset.json, shards, motion_stats.json, ...)")
    p.add_argument("--out", help="where to write the JSON report")
    p.add_argument("--split", default="heldout")
    p.add_argument("--max-clips", type=int, default=20)
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.5, 1.0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    a = p.parse_args(argv)
    model, cfg = load_exported(a.checkpoint)
    data = EvalData.load(a.data, a.split, cfg.text_len, max_clips=a.max_clips)
    report = probe(model, data, a.sigmas, a.seed, a.batch_size)
    print(format_table(report))
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {a.out}")
    return report


if __name__ == "__main__":
    main()
