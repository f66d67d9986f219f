"""MFU of one EchoMotion dual block (video expert + motion expert around one joint attention) at the method's sequence
lengths, forward + backward, in bf16 autocast and in FP8 (Transformer Engine). CUDA only: elsewhere it exits with code 2.

Workloads (batch 1, text context of 512 tokens already embedded to the model width):
- wan2.1-1.3b: 81 x 480 x 832 video -> latent 21 x 60 x 104 -> 21 x 30 x 52 = 32,760 video tokens, + 81 frames x 51 = 4,131
  motion tokens = 36,891 tokens.
- wan2.2-5b: 121 x 704 x 1280 video -> latent 31 x 44 x 80 -> 31 x 22 x 40 = 27,280 video tokens, + 121 x 51 = 6,171 motion
  tokens = 33,451 tokens.

FLOPs are `parallel.plan.layer_forward_flops`, i.e. `echomotion.models.flops.forward_flops` (the trainer's MFU formula) for a
one-layer model minus a zero-layer one. Every matmul is 2*m*n*k; per expert with L_s tokens (dim D, FFN width F, text
L_t): q/k/v/o 8*D^2*L_s, cross-attention q/o 4*D^2*L_s and k/v 4*D^2*L_t, FFN 4*D*F*L_s, cross-attention scores and
values 4*L_s*L_t*D; plus the joint self-attention scores and values 4*L^2*D over all L = L_v + L_m tokens. Norms,
modulation, RoPE and softmax are not counted. Backward = 2 x forward, so a step is 3 x forward (flash-attention's
backward recomputes the scores, which this does not count, as is usual for MFU). MFU = step FLOPs / time / peak, against
the dense bf16 peak (H100 SXM 989 TFLOP/s, `echomotion.metrics.PEAK_FLOPS`) for both precisions, so FP8 rows show the
speed-up directly (FP8's own dense peak is twice that).

The FP8 rows swap the block's expert linears with `parallel.fp8.convert_to_te` and run under `parallel.fp8.fp8_autocast`
inside bf16 autocast, as the trainer does; attention, norms and modulation stay bf16/fp32.

    python tools/bench_gpu.py                          # both models, bf16 and FP8 (delayed scaling)
    python tools/bench_gpu.py --models wan2.1-1.3b --fp8 current --warmup 5 --iters 20
    python tools/bench_gpu.py --fp8 none               # bf16 only (no Transformer Engine needed)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from echomotion.config import ModelConfig, ParallelConfig, model_preset  # noqa: E402
from echomotion.metrics import peak_flops_per_device  # noqa: E402
from echomotion.models.echomotion import DualBlock, Stream  # noqa: E402
from echomotion.models.rope import motion_positions, rope_cos_sin, video_positions  # noqa: E402
from echomotion.models.wan import TimeCond  # noqa: E402
from echomotion.motion.smpl import MOTION_TOKENS_PER_FRAME  # noqa: E402
from parallel.plan import layer_forward_flops  # noqa: E402

TEXT_TOKENS = 512
WORKLOADS = {  # model preset -> (video token grid (F, H, W) after patchify, motion frames)
    "wan2.1-1.3b": ((21, 30, 52), 81),
    "wan2.2-5b": ((31, 22, 40), 121),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=sorted(WORKLOADS), default=sorted(WORKLOADS))
    p.add_argument("--fp8", choices=("none", "delayed", "current"), default="delayed",
                   help="FP8 recipe for the FP8 rows (parallel.fp8_recipe); none = bf16 rows only")
    p.add_argument("--attention", choices=("sdpa", "flash"), default="sdpa", help="model.attention_backend")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--peak-flops", type=float, default=0.0, help="dense bf16 peak per GPU; 0 = look up this GPU")
    return p.parse_args(argv)


def block_inputs(m: ModelConfig, grid: tuple[int, int, int], frames: int, device: torch.device) -> tuple[Stream, Stream, torch.Tensor]:
    """Random video and motion streams as `EchoMotionDiT.embed_video/embed_motion` build them (fp32 residual stream, one
    timestep row per modality, RoPE from the real positions, every key visible) and an embedded text context."""
    g = torch.Generator(device=device).manual_seed(0)
    head_dim = m.dim // m.num_heads

    def stream(positions: torch.Tensor) -> Stream:
        x = torch.randn(1, positions.shape[0], m.dim, device=device, generator=g).requires_grad_()
        cond = TimeCond(
            e=torch.randn(1, m.dim, device=device, generator=g),
            e0=torch.randn(1, 6, m.dim, device=device, generator=g),
            index=torch.zeros(1, 1, dtype=torch.long, device=device),
        )
        cos, sin = rope_cos_sin(positions, head_dim, m.rope.theta)
        return Stream(x, cond, (cos.to(device), sin.to(device)), None)

    video = stream(video_positions(*grid))
    motion = stream(motion_positions(frames, MOTION_TOKENS_PER_FRAME, grid[1:], m.rope.motion_layout, m.rope.temporal_ratio))
    context = torch.randn(1, TEXT_TOKENS, m.dim, device=device, generator=g).requires_grad_()
    return video, motion, context


def make_step(block: DualBlock, video: Stream, motion: Stream, context: torch.Tensor, fp8: ParallelConfig) -> Callable[[], None]:
    """One forward + backward of the block; the output gradients are fixed random tensors."""
    from parallel.fp8 import fp8_autocast

    grads = [torch.randn_like(s.x) for s in (video, motion)]

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16), fp8_autocast(fp8):
            v, m = block(video, motion, context)
        torch.autograd.backward([v.x, m.x], grads)
        block.zero_grad(set_to_none=True)
        for t in (video.x, motion.x, context):
            t.grad = None

    return step


def time_step(step: Callable[[], None], warmup: int, iters: int) -> list[float]:
    """Seconds per call, each timed with CUDA events after `warmup` untimed calls."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def bench(name: str, precision: str, a: argparse.Namespace, device: torch.device, peak: float) -> dict:
    m = model_preset(name, [f"model.attention_backend={a.attention}"])
    grid, frames = WORKLOADS[name]
    video_tokens, motion_tokens = grid[0] * grid[1] * grid[2], frames * MOTION_TOKENS_PER_FRAME
    one_dual = dataclasses.replace(m, num_layers=1, dual_layers="0")
    flops = 3 * layer_forward_flops(one_dual, video_tokens, motion_tokens, TEXT_TOKENS)[0]

    torch.manual_seed(0)
    block = DualBlock(m.dim, m.ffn_dim, m.num_heads, m.eps, m.attention_backend).to(device)
    fp8 = ParallelConfig() if precision == "bf16" else ParallelConfig(fp8="te", fp8_recipe=a.fp8)
    if fp8.fp8 == "te":
        from parallel.fp8 import convert_to_te

        holder = nn.Module()
        holder.blocks = nn.ModuleList([block])
        convert_to_te(holder, fp8.fp8_recipe)
    video, motion, context = block_inputs(m, grid, frames, device)
    torch.cuda.reset_peak_memory_stats(device)
    times = time_step(make_step(block, video, motion, context, fp8), a.warmup, a.iters)
    seconds = statistics.median(times)
    result = {
        "model": name, "precision": precision, "video_tokens": video_tokens, "motion_tokens": motion_tokens,
        "text_tokens": TEXT_TOKENS, "step_flops": flops, "seconds_median": seconds, "seconds_min": min(times),
        "tflops": flops / seconds / 1e12, "mfu": flops / seconds / peak, "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30,
    }
    del block, video, motion, context
    torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if not torch.cuda.is_available():
        print("tools/bench_gpu.py measures GPU throughput and needs a CUDA device; none is visible here.", file=sys.stderr)
        return 2
    device = torch.device("cuda", torch.cuda.current_device())
    if a.fp8 != "none":
        from parallel.fp8 import check_fp8_available

        check_fp8_available(ParallelConfig(fp8="te"), device)
    peak = peak_flops_per_device(a.peak_flops)
    if peak is None:
        print(f"unknown peak FLOPs for {torch.cuda.get_device_name(device)}: pass --peak-flops (dense bf16, per GPU)", file=sys.stderr)
        return 2
    precisions = ["bf16"] + ([f"fp8-{a.fp8}"] if a.fp8 != "none" else [])
    rows = [bench(name, precision, a, device, peak) for name in a.models for precision in precisions]

    print(f"{torch.cuda.get_device_name(device)}, peak {peak / 1e12:.0f} TFLOP/s (dense bf16), attention={a.attention}, "
          f"one dual block, batch 1, forward+backward, median of {a.iters} after {a.warmup} warmup")
    print(f"{'model':<12} {'precision':<12} {'tokens (v+m)':>15} {'ms':>8} {'TFLOP/s':>8} {'MFU':>6} {'mem GiB':>8}")
    for r in rows:
        tokens = f"{r['video_tokens']}+{r['motion_tokens']}"
        print(f"{r['model']:<12} {r['precision']:<12} {tokens:>15} {r['seconds_median'] * 1e3:>8.1f} {r['tflops']:>8.0f} "
              f"{r['mfu']:>6.1%} {r['peak_memory_gib']:>8.1f}")
    print(json.dumps({"bench": "dual_block", "device": torch.cuda.get_device_name(device), "peak_flops": peak,
                      "attention": a.attention, "warmup": a.warmup, "iters": a.iters, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
