"""FP8 (Transformer Engine) against bf16 on one GPU: the training loss over the same steps from the same weights and data,
and the step time. CUDA + Transformer Engine only: elsewhere it exits with code 2 and says what is missing.

Both runs train a copy of one randomly initialized model (a preset with fewer layers, so it fits one GPU without the
parallel stack) with AdamW on a fixed cycle of synthetic Phase 2 batches at the method's sequence length, drawing tasks,
noise and drops from the same per-step seeds (`echomotion.diffusion.tasks.training_loss`). The bf16 run uses CUDA bf16
autocast, the FP8 run additionally swaps the expert linears (`parallel.fp8.convert_to_te`) and runs the forward under
`parallel.fp8.fp8_autocast`, as the trainer does with parallel.fp8=te. It passes (exit 0) when the mean relative loss
difference over the steps is within --tolerance, else exits 1.

    python tools/fp8_check.py                                  # wan2.1-1.3b, 4 layers, 50 steps, delayed scaling
    python tools/fp8_check.py --model wan2.2-5b --layers 2 --recipe current
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from echomotion.config import DiffusionConfig, ParallelConfig, model_preset  # noqa: E402
from echomotion.diffusion.tasks import TrainingBatch, training_loss  # noqa: E402
from echomotion.models import EchoMotionDiT  # noqa: E402
from echomotion.motion.smpl import MOTION_FEATURE_DIM  # noqa: E402
from parallel.fp8 import check_fp8_available, convert_to_te, fp8_autocast  # noqa: E402

LATENTS = {  # preset -> latent [C, F, H, W] of the method's clip and its motion frames
    "wan2.1-1.3b": ((16, 21, 60, 104), 81),
    "wan2.2-5b": ((48, 31, 44, 80), 121),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(LATENTS), default="wan2.1-1.3b")
    p.add_argument("--layers", type=int, default=4, help="model.num_layers (the preset's dual-layer rule applies)")
    p.add_argument("--recipe", choices=("delayed", "current"), default="delayed", help="parallel.fp8_recipe")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batches", type=int, default=4, help="distinct synthetic batches, cycled")
    p.add_argument("--lr", type=float, default=1e-4, help="larger than the paper's 8e-6 so 50 steps move the weights")
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    p.add_argument("--tolerance", type=float, default=0.02, help="largest mean relative loss difference that passes")
    return p.parse_args(argv)


def synthetic_batches(a: argparse.Namespace, text_dim: int, text_len: int, device: torch.device) -> list[TrainingBatch]:
    g = torch.Generator().manual_seed(0)
    latent, frames = LATENTS[a.model]
    return [
        TrainingBatch(
            text=torch.randn(1, text_len, text_dim, generator=g).mul(0.1).to(device),
            motion=torch.randn(1, frames, MOTION_FEATURE_DIM, generator=g).to(device),
            video=torch.randn(1, *latent, generator=g).to(device),
        )
        for _ in range(a.batches)
    ]


def train(model: EchoMotionDiT, p: ParallelConfig, batches: list[TrainingBatch], a: argparse.Namespace) -> dict:
    """`a.steps` optimizer steps; returns the losses, step seconds (after warmup) and peak memory."""
    device = next(model.parameters()).device
    null_text = torch.zeros_like(batches[0].text[0])
    optimizer = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=1e-3)
    torch.cuda.reset_peak_memory_stats(device)
    losses, seconds = [], []
    for step in range(a.steps):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16), fp8_autocast(p):
            loss, _ = training_loss(model, batches[step % len(batches)], 2, DiffusionConfig(), null_text,
                                    torch.Generator().manual_seed(1000 + step))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # synchronizes
        if step >= a.warmup:
            seconds.append(time.perf_counter() - t0)
    return {"losses": losses, "step_seconds": statistics.median(seconds) if seconds else float("nan"),
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30}


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if not torch.cuda.is_available():
        print("tools/fp8_check.py compares FP8 with bf16 training on a CUDA GPU; none is visible here.", file=sys.stderr)
        return 2
    device = torch.device("cuda", torch.cuda.current_device())
    fp8 = ParallelConfig(fp8="te", fp8_recipe=a.recipe)
    try:
        check_fp8_available(fp8, device)
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return 2
    m = model_preset(a.model, [f"model.num_layers={a.layers}"])
    torch.manual_seed(0)
    base = EchoMotionDiT(m)
    batches = synthetic_batches(a, m.text_dim, m.text_len, device)

    results = {}
    for name, p in (("bf16", ParallelConfig()), (f"fp8-{a.recipe}", fp8)):
        model = copy.deepcopy(base).to(device).train()
        if p.fp8 == "te":
            convert_to_te(model, p.fp8_recipe)
        results[name] = train(model, p, batches, a)
        del model
        torch.cuda.empty_cache()

    (ref_name, ref), (fp8_name, got) = results.items()
    rel = [abs(x - y) / max(abs(y), 1e-12) for x, y in zip(got["losses"], ref["losses"])]
    mean_rel, max_rel = statistics.fmean(rel), max(rel)
    print(f"{torch.cuda.get_device_name(device)}: {a.model} with {a.layers} layers, {a.steps} steps, lr {a.lr}")
    print(f"{'step':>5} {ref_name:>10} {fp8_name:>14} {'rel diff':>9}")
    for i in sorted({*range(0, a.steps, 5), a.steps - 1}):
        print(f"{i + 1:>5} {ref['losses'][i]:>10.5f} {got['losses'][i]:>14.5f} {rel[i]:>9.2%}")
    speedup = ref["step_seconds"] / got["step_seconds"]
    print(f"relative loss difference: mean {mean_rel:.2%}, max {max_rel:.2%} (tolerance {a.tolerance:.2%} on the mean)")
    print(f"step time: {ref_name} {ref['step_seconds'] * 1e3:.0f} ms, {fp8_name} {got['step_seconds'] * 1e3:.0f} ms "
          f"(x{speedup:.2f}); peak memory {ref['peak_memory_gib']:.1f} / {got['peak_memory_gib']:.1f} GiB")
    passed = mean_rel <= a.tolerance
    print(json.dumps({"check": "fp8_vs_bf16", "model": a.model, "layers": a.layers, "recipe": a.recipe, "steps": a.steps,
                      "mean_rel_loss_diff": mean_rel, "max_rel_loss_diff": max_rel, "speedup": speedup, "passed": passed,
                      "runs": results}))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
