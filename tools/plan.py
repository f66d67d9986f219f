"""Rank parallel layouts (tp, sp, dp_shard, dp_replicate, activation checkpointing) for a model on a cluster.

Estimates per-GPU memory and step time from the model config alone (parallel/plan.py documents every assumption;
estimates, not measurements). Layouts that do not fit are left out; `--json` lists them too, with their reasons.

    python tools/plan.py --model wan2.2-5b --gpus 64 --gpu-mem 80 --frames 121 --height 704 --width 1280 [--top 10]
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from echomotion.config import ConfigError, model_preset  # noqa: E402
from parallel.plan import GIB, Estimate, Hardware, PlanError, Workload, plan, token_counts  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="preset in configs/model/ (tiny, wan2.1-1.3b, wan2.2-5b)")
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU (default 80)")
    p.add_argument("--reserve", type=float, default=4.0, help="GiB per GPU kept for CUDA context, NCCL, fragmentation")
    p.add_argument("--peak-flops", type=float, default=989e12, help="per-GPU peak FLOP/s (default H100 dense bf16)")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed fraction of peak reached by the compute")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--intra-bw", type=float, default=450.0, help="GB/s per GPU per direction within a node (NVLink)")
    p.add_argument("--inter-bw", type=float, default=50.0, help="GB/s per GPU between nodes (400 Gb/s IB = 50)")
    p.add_argument("--frames", type=int, required=True, help="video frames (1 + 4k)")
    p.add_argument("--height", type=int, required=True, help="pixels")
    p.add_argument("--width", type=int, required=True, help="pixels")
    p.add_argument("--motion-frames", type=int, default=None, help="SMPL frames (default: --frames)")
    p.add_argument("--text-len", type=int, default=None, help="text tokens (default: the preset's text_len)")
    p.add_argument("--micro-batch", type=int, default=1, help="samples per data-parallel rank per step")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="compute dtype (train.precision)")
    p.add_argument("--param-dtype", choices=("bf16", "fp32"), default="bf16", help="FSDP2 gathered parameters")
    p.add_argument("--reduce-dtype", choices=("bf16", "fp32"), default="fp32", help="FSDP2 gradient reduce-scatter")
    p.add_argument("--ac-every", type=int, default=2, help="k of activation_checkpointing=every_k")
    p.add_argument("--top", type=int, default=10, help="rows to print (default 10)")
    p.add_argument("--json", action="store_true", help="every layout, feasible or not, as JSON")
    return p.parse_args(argv)


def row(e: Estimate, hw: Hardware, every: int) -> list[str]:
    lay, mem = e.layout, e.memory
    gib = [f"{x / GIB:.1f}" for x in (mem.params, mem.grads, mem.optimizer, mem.activations, mem.total)]
    ac = f"every_{every}" if lay.ac == "every_k" else lay.ac
    return [str(lay.tp), str(lay.sp), str(lay.dp_shard), str(lay.dp_replicate), ac, *gib,
            f"{e.time.total:.2f}", f"{e.tokens_per_s:,.0f}", f"{e.mfu(hw):.2f}"]


REASONS = {"heads": "heads not divisible by tp x sp", "tp": "tp not dividing dim/ffn_dim", "node": "tp beyond a node",
           "memory": "memory"}
HEADER = ["tp", "sp", "dp_shard", "dp_rep", "AC", "params", "grads", "optim", "act", "total GiB", "step s", "tokens/s",
          "MFU"]


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(HEADER, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) if i == 4 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"
              for r in rows]
    return "\n".join(lines)


def to_json(e: Estimate, hw: Hardware) -> dict:
    return {
        **asdict(e.layout),
        "feasible": e.feasible,
        "reasons": e.reasons,
        "memory_gib": {k: v / GIB for k, v in asdict(e.memory).items()} | {"total": e.memory.total / GIB},
        "step_s": e.time.total,
        "time_s": asdict(e.time),
        "tokens_per_s": e.tokens_per_s,
        "mfu": e.mfu(hw),
    }


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        m = model_preset(a.model)
        hw = Hardware(mem_gib=a.gpu_mem, peak_flops=a.peak_flops, mfu=a.mfu, gpus_per_node=a.gpus_per_node,
                      intra_bw=a.intra_bw * 1e9, inter_bw=a.inter_bw * 1e9, reserve_gib=a.reserve)
        w = Workload(a.frames, a.height, a.width, a.motion_frames, a.text_len, a.micro_batch, a.precision,
                     a.param_dtype, a.reduce_dtype, a.ac_every)
        if a.top < 1:
            raise PlanError(f"--top={a.top} must be >= 1")
        estimates = plan(m, a.gpus, w, hw)
        video, motion, text = token_counts(m, w)
    except (ConfigError, PlanError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps({"model": a.model, "gpus": a.gpus, "tokens": {"video": video, "motion": motion, "text": text},
                          "hardware": asdict(hw), "workload": asdict(w),
                          "layouts": [to_json(e, hw) for e in estimates]}, indent=1))
        return 0
    feasible = [e for e in estimates if e.feasible]
    print(f"{a.model} on {a.gpus} GPUs ({a.gpu_mem:g} GiB, {a.reserve:g} reserved): {a.frames}x{a.height}x{a.width} -> "
          f"{video:,} video + {motion:,} motion + {text} text tokens per sample, micro-batch {a.micro_batch}, "
          f"{a.precision} compute, assumed MFU {a.mfu:g}")
    excluded = Counter(kind for e in estimates for kind in e.reasons)
    print(f"{len(feasible)} of {len(estimates)} layouts fit; reasons against the others: "
          + (", ".join(f"{REASONS[k]} ({n})" for k, n in excluded.most_common()) or "none"))
    if not feasible:
        closest = min(estimates, key=lambda e: e.memory.total)
        print(f"no layout fits; the least memory-hungry, {closest.layout}: {'; '.join(closest.reasons.values())}",
              file=sys.stderr)
        return 1
    print(table([row(e, hw, a.ac_every) for e in feasible[: a.top]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
