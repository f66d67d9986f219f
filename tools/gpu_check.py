"""The GPU validation kit: one command that measures everything GPU-only and writes gpu_check.json and gpu_check.md.

A GPU is lent rarely and briefly, so its minutes go to measuring: each section records its numbers or its error and the
next one runs; a time budget (--budget, default 7 minutes) skips what would run past it, saying so. Sections:
- environment: GPU, driver, compute capability, Python, torch, CUDA, cuDNN, and which optional kernels import
  (Transformer Engine, flash-attn, torchao);
- blocks: forward + backward of one 1.3B dual block at 81 x 480 x 832 (32,760 video + 4,131 motion = 36,891 tokens) and
  one 5B dual block at 121 x 704 x 1280 (27,280 + 6,171 = 33,451 tokens), batch 1, 512 text tokens: bf16 autocast with
  SDPA's flash and cuDNN kernels and flash-attn if it imports; FP8 (Transformer Engine, torchao) where they import; with
  --compile, torch.compile'd bf16 and torchao rows too. Each row: median seconds, TFLOP/s, MFU against the dense bf16 peak
  (FP8 rows therefore show their speed-up directly) and peak memory next to `parallel.plan`'s estimate for the same block;
- training: the tiny model's 50 AdamW steps on the GPU in bf16 autocast (and in FP8 per backend) against the same 50 steps
  on the CPU in fp32, from the same weights, batches, tasks and noise; the mean relative loss difference must stay within
  --tolerance (bf16) and --fp8-tolerance (FP8 against bf16).

FLOPs are `parallel.plan.layer_forward_flops` (the trainer's MFU formula for a one-dual-layer model minus a zero-layer
one) x 3 for forward + backward; attention's recomputation in the backward is not counted, as usual for MFU.

    python tools/gpu_check.py --out runs/gpu_check --compile     # on one H100/H200: under 8 minutes
    python tools/gpu_check.py --dry-run --out /tmp/gpu_check     # CPU, tiny shapes, same code paths (CI runs this)

On the lent device (Python 3.12, its own torch; no network), the packages it lacks travel as wheels: docs/gpu-kit.md.
Exit code: 0 when every section ran and the training checks passed, 1 otherwise, 2 without CUDA (unless --dry-run).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import importlib
import json
import math
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, ContextManager, Optional

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from echomotion.config import DiffusionConfig, ModelConfig, ParallelConfig, SampleConfig, model_preset  # noqa: E402
from echomotion.diffusion.tasks import TrainingBatch, training_loss  # noqa: E402
from echomotion.metrics import peak_flops_per_device  # noqa: E402
from echomotion.models import EchoMotionDiT  # noqa: E402
from echomotion.models.echomotion import DualBlock, Stream  # noqa: E402
from echomotion.models.rope import motion_positions, rope_cos_sin, video_positions  # noqa: E402
from echomotion.models.wan import TimeCond  # noqa: E402
from echomotion.motion.smpl import MOTION_FEATURE_DIM, MOTION_TOKENS_PER_FRAME  # noqa: E402
from parallel.fp8 import check_fp8_available, convert_to_fp8, fp8_autocast  # noqa: E402
from parallel.plan import Candidate, Workload, activation_bytes, latent_grid, layer_forward_flops, parameter_count  # noqa: E402

WORKLOADS = {"wan2.1-1.3b": (81, 480, 832), "wan2.2-5b": (121, 704, 1280)}  # frames, height, width of the method's clips
DRY_WORKLOADS = {"tiny": (9, 64, 64)}
ALL_WORKLOADS = {**WORKLOADS, **DRY_WORKLOADS}
FP8_BACKENDS = {"te": "transformer_engine.pytorch", "torchao": "torchao.float8"}
OPTIONAL = {"transformer_engine": "transformer_engine", "flash_attn": "flash_attn", "torchao": "torchao"}


@dataclasses.dataclass
class Run:
    """What every section needs: where it runs and how long it may take."""

    device: torch.device
    dry_run: bool
    warmup: int
    iters: int
    deadline: float  # time.monotonic() past which the remaining rows are skipped
    peak_flops: Optional[float]

    def over_budget(self) -> bool:
        return time.monotonic() > self.deadline


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md (created)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: checks the kit itself, measures nothing")
    p.add_argument("--models", nargs="+", default=None, help=f"block workloads (default: {', '.join(WORKLOADS)})")
    p.add_argument("--compile", action="store_true", help="add torch.compile'd rows (bf16, torchao FP8)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--steps", type=int, default=50, help="training steps of the tiny model per run (a dry run: 4)")
    p.add_argument("--lr", type=float, default=1e-3, help="large enough that the tiny model's loss moves in 50 steps")
    p.add_argument("--tolerance", type=float, default=0.05, help="bf16 vs fp32: largest mean relative loss difference")
    p.add_argument("--fp8-tolerance", type=float, default=0.05, help="FP8 vs bf16: largest mean relative loss difference")
    p.add_argument("--budget", type=float, default=420.0, help="seconds; rows that would start later are skipped")
    p.add_argument("--peak-flops", type=float, default=0.0, help="dense bf16 peak per GPU; 0 = look up this GPU")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------------ environment
def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": str(device), "packages": {name: _version(module) for name, module in OPTIONAL.items()},
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, capability=".".join(map(str, torch.cuda.get_device_capability(device))),
                   gpu_memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count,
                   driver=_driver_version())
    return env


def _version(module: str) -> str:
    """The module's version, or why it does not import (the reason is part of the record)."""
    try:
        return str(getattr(importlib.import_module(module), "__version__", "unknown version"))
    except Exception as e:  # ImportError, or OSError from a missing CUDA library
        return f"not importable: {type(e).__name__}: {str(e)[:160]}"


def _driver_version() -> Optional[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


# ------------------------------------------------------------------------------------------------------------ blocks
@dataclasses.dataclass(frozen=True)
class Variant:
    """One row of the block table: precision, attention kernel, FP8 backend, compiled or not."""

    name: str
    attention: str  # an SDPA backend name (torch.nn.attention.SDPBackend) or "flash-attn"
    fp8: str = "none"
    compile: str = "none"  # "module": block.compile(), as parallel.compile does; "tensors": a compiled function of it
    # that returns the output tensors instead of the Stream tuples (torch 2.11's Dynamo returned an empty tuple for those)


def variants(run: Run, compile_rows: bool) -> list[Variant]:
    if run.dry_run:
        rows = [Variant("bf16 sdpa-math", "MATH")]
    else:
        rows = [Variant("bf16 sdpa-flash", "FLASH_ATTENTION"), Variant("bf16 sdpa-cudnn", "CUDNN_ATTENTION"),
                Variant("bf16 flash-attn", "flash-attn")]
    first = rows[0].attention
    rows += [Variant(f"fp8-{backend}", first, fp8=backend) for backend in FP8_BACKENDS]
    if compile_rows:
        rows += [Variant("bf16 block.compile()", "default", compile="module"),
                 Variant("bf16 compiled (tensor outputs)", "default", compile="tensors"),
                 Variant("fp8-torchao compiled (tensor outputs)", "default", "torchao", "tensors")]
    return rows


def attention_context(attention: str) -> ContextManager:
    """SDPA restricted to one kernel; "default" = SDPA's own choice, "flash-attn" = the model's flash backend."""
    if attention in ("flash-attn", "default"):
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(getattr(SDPBackend, attention))


def block_inputs(m: ModelConfig, grid: tuple[int, int, int], frames: int, device: torch.device) -> tuple[Stream, Stream, torch.Tensor]:
    """Random video and motion streams as `EchoMotionDiT.embed_video/embed_motion` build them (fp32 residual stream, one
    timestep row per modality, RoPE from the real positions, every key visible) and an embedded text context."""
    g = torch.Generator(device=device).manual_seed(0)
    head_dim = m.dim // m.num_heads

    def stream(positions: torch.Tensor) -> Stream:
        x = torch.randn(1, positions.shape[0], m.dim, device=device, generator=g).requires_grad_()
        cond = TimeCond(e=torch.randn(1, m.dim, device=device, generator=g),
                        e0=torch.randn(1, 6, m.dim, device=device, generator=g),
                        index=torch.zeros(1, 1, dtype=torch.long, device=device))
        cos, sin = rope_cos_sin(positions, head_dim, m.rope.theta)
        return Stream(x, cond, (cos.to(device), sin.to(device)), None)

    video = stream(video_positions(*grid))
    motion = stream(motion_positions(frames, MOTION_TOKENS_PER_FRAME, grid[1:], m.rope.motion_layout, m.rope.temporal_ratio))
    context = torch.randn(1, m.text_len, m.dim, device=device, generator=g).requires_grad_()
    return video, motion, context


def planned_block_bytes(m: ModelConfig, shape: tuple[int, int, int]) -> float:
    """`parallel.plan`'s memory for one dual block's training step as measured here: fp32 weights and gradients, the
    bf16-autocast activations it saves (its weight casts included), and the fp32 inputs with their gradients."""
    w = Workload(*shape, precision="bf16", param_dtype="fp32")
    one = dataclasses.replace(m, num_layers=1, dual_layers="0")
    zero = dataclasses.replace(m, num_layers=0, dual_layers="none")
    saved = activation_bytes(one, w, Candidate()).saved - activation_bytes(zero, w, Candidate()).saved
    params = parameter_count(one) - parameter_count(zero)
    video, motion = _tokens(m, shape)
    return saved + 8 * params + 8 * (video + motion + m.text_len) * m.dim


def _tokens(m: ModelConfig, shape: tuple[int, int, int]) -> tuple[int, int]:
    f, h, w = latent_grid(m, *shape)
    return f * h * w, shape[0] * MOTION_TOKENS_PER_FRAME


def block_row(name: str, shape: tuple[int, int, int], v: Variant, run: Run) -> dict[str, Any]:
    """One variant's forward + backward of one dual block: timing, FLOPs, MFU and memory."""
    backend = "flash" if v.attention == "flash-attn" else "sdpa"
    m = model_preset(name, [f"model.attention_backend={backend}"])
    video_tokens, motion_tokens = _tokens(m, shape)
    flops = 3 * layer_forward_flops(dataclasses.replace(m, num_layers=1, dual_layers="0"),
                                    video_tokens, motion_tokens, m.text_len)[0]
    torch.manual_seed(0)
    block: nn.Module = DualBlock(m.dim, m.ffn_dim, m.num_heads, m.eps, m.attention_backend).to(run.device)
    p = ParallelConfig(fp8=v.fp8)
    if v.fp8 != "none":
        check_fp8_available(p, run.device)
        holder = nn.Module()
        holder.blocks = nn.ModuleList([block])
        convert_to_fp8(holder, p)
    if v.compile == "module":
        block.compile()
    video, motion, context = block_inputs(m, latent_grid(m, *shape), shape[0], run.device)
    step = make_step(block, (video, motion, context), p, v, run.device)
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    times = time_step(step, run)
    seconds = statistics.median(times)
    row = {"model": name, "variant": v.name, "video_tokens": video_tokens, "motion_tokens": motion_tokens,
           "text_tokens": m.text_len, "step_flops": flops, "seconds_median": seconds, "seconds_min": min(times),
           "tflops": flops / seconds / 1e12, "mfu": flops / seconds / run.peak_flops if run.peak_flops else None,
           "planned_memory_gib": planned_block_bytes(m, shape) / 2**30, "peak_memory_gib": None}
    if run.device.type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated(run.device) / 2**30
        torch.cuda.empty_cache()
    return row


def make_step(block: nn.Module, inputs: tuple[Stream, Stream, torch.Tensor], p: ParallelConfig, v: Variant,
              device: torch.device) -> Callable[[], None]:
    """One forward + backward of the block in bf16 autocast; the output gradients are fixed random tensors."""
    video, motion, context = inputs
    grads = [torch.randn_like(s.x) for s in (video, motion)]

    def forward(video: Stream, motion: Stream, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v, m = block(video, motion, context)
        return v.x, m.x

    run_forward = torch.compile(forward) if v.compile == "tensors" else forward

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16), fp8_autocast(p), attention_context(v.attention):
            outputs = run_forward(video, motion, context)
        with attention_context(v.attention):
            torch.autograd.backward(list(outputs), grads)
        block.zero_grad(set_to_none=True)
        for t in (video.x, motion.x, context):
            t.grad = None

    return step


def time_step(step: Callable[[], None], run: Run) -> list[float]:
    """Seconds per call after `run.warmup` untimed calls: CUDA events on a GPU, the wall clock on the CPU."""
    for _ in range(run.warmup):
        step()
    times = []
    for _ in range(run.iters):
        if run.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return times


def attention_row(name: str, shape: tuple[int, int, int], attention: str, run: Run) -> dict[str, Any]:
    """The joint self-attention alone (bf16, forward + backward) at the block's token count: how much of the block's
    time no FP8 linear can shorten."""
    m = model_preset(name)
    tokens = sum(_tokens(m, shape))
    g = torch.Generator(device=run.device).manual_seed(0)
    q, k, v = (torch.randn(1, m.num_heads, tokens, m.dim // m.num_heads, device=run.device, dtype=torch.bfloat16,
                           generator=g).requires_grad_() for _ in range(3))
    grad = torch.randn_like(q)

    def step() -> None:
        with attention_context(attention):
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            torch.autograd.backward(out, grad)
        for t in (q, k, v):
            t.grad = None

    seconds = statistics.median(time_step(step, run))
    flops = 3 * 4 * tokens**2 * m.dim
    return {"model": name, "variant": f"attention only, {attention.lower()}", "tokens": tokens, "step_flops": flops,
            "seconds_median": seconds, "tflops": flops / seconds / 1e12,
            "mfu": flops / seconds / run.peak_flops if run.peak_flops else None}


def sampling_section(run: Run) -> dict[str, Any]:
    """Each task sampled for 4 steps by the tiny model on the device and on the CPU (fp32 both, same noise): the outputs
    must agree (relative L2 difference; TF32 convolutions on a GPU give ~1e-3)."""
    from echomotion.diffusion.sampler import Request, sample

    m = model_preset("tiny")
    torch.manual_seed(0)
    base = EchoMotionDiT(m).eval()
    with torch.no_grad():  # a fresh model's zero-initialized heads would predict zero velocity: nothing to compare
        for param in base.parameters():
            param.add_(torch.randn_like(param), alpha=0.05)
    batch = tiny_batches(m, 1)[0]
    inputs = {"t2vm": {"text": batch.text, "video_shape": batch.video.shape, "motion_frames": 9},
              "t2m": {"text": batch.text, "motion_frames": 9},
              "m2v": {"text": batch.text, "motion_cond": batch.motion, "video_shape": batch.video.shape},
              "v2m": {"text": None, "video_cond": batch.video, "motion_frames": 9}}
    result = {}
    for task, kw in inputs.items():
        outs = []
        for device in (torch.device("cpu"), run.device):
            model = copy.deepcopy(base).to(device)
            moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
            with torch.no_grad():
                got = sample(model, Request(task, **moved), torch.zeros(m.text_len, m.text_dim, device=device),
                             SampleConfig(steps=4), generator=torch.Generator().manual_seed(7))
            outs.append([None if t is None else t.float().cpu() for t in got])
        diffs = [float((b - a).norm() / a.norm()) for a, b in zip(*outs) if a is not None]
        result[task] = {"rel_l2_diff": max(diffs), "passed": max(diffs) < 1e-2 and all(math.isfinite(d) for d in diffs)}
    return result


# ---------------------------------------------------------------------------------------------------------- training
def tiny_batches(m: ModelConfig, count: int) -> list[TrainingBatch]:
    """Fixed synthetic Phase 2 batches at the tiny model's shapes (9 frames at 64 x 64: latent [16, 3, 8, 8])."""
    g = torch.Generator().manual_seed(0)
    return [TrainingBatch(text=torch.randn(1, m.text_len, m.text_dim, generator=g).mul(0.1),
                          motion=torch.randn(1, 9, MOTION_FEATURE_DIM, generator=g),
                          video=torch.randn(1, m.in_channels, 3, 8, 8, generator=g))
            for _ in range(count)]


def train_losses(base: EchoMotionDiT, device: torch.device, precision: str, fp8: str, a: argparse.Namespace) -> dict[str, Any]:
    """`a.steps` AdamW steps from a copy of `base`; tasks, noise and drops come from the same per-step CPU seeds. Also the
    loss on fixed draws before and after training (the per-step losses swing with the drawn task and timestep)."""
    model = copy.deepcopy(base).to(device).train()
    p = ParallelConfig(fp8=fp8)
    if fp8 != "none":
        check_fp8_available(p, device)
        convert_to_fp8(model, p)
    batches = [TrainingBatch(b.text.to(device), b.motion.to(device), video=b.video.to(device))
               for b in tiny_batches(base.config, 4)]
    null_text = torch.zeros_like(batches[0].text[0])
    optimizer = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=1e-3)

    def loss_at(step: int) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"), fp8_autocast(p):
            return training_loss(model, batches[step % len(batches)], 2, DiffusionConfig(), null_text,
                                 torch.Generator().manual_seed(1000 + step))[0]

    def fixed_draws() -> float:
        with torch.no_grad():
            return statistics.fmean(loss_at(-1 - i).item() for i in range(2 * len(batches)))

    before, losses = fixed_draws(), []
    for step in range(a.steps):
        loss = loss_at(step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return {"losses": losses, "fixed_draws_before": before, "fixed_draws_after": fixed_draws()}


def compare(run: dict[str, Any], reference: dict[str, Any], tolerance: float) -> dict[str, Any]:
    rel = [abs(x - y) / max(abs(y), 1e-12) for x, y in zip(run["losses"], reference["losses"])]
    mean = statistics.fmean(rel)
    return {"mean_rel_diff": mean, "max_rel_diff": max(rel), "tolerance": tolerance, "passed": mean <= tolerance}


def training_section(run: Run, a: argparse.Namespace) -> dict[str, Any]:
    """The tiny model's loss curves: device bf16 (and FP8) against CPU fp32, from the same weights and draws."""
    m = model_preset("tiny")
    torch.manual_seed(0)
    base = EchoMotionDiT(m)
    runs = {"cpu fp32": train_losses(base, torch.device("cpu"), "fp32", "none", a),
            f"{run.device.type} bf16": train_losses(base, run.device, "bf16", "none", a)}
    checks = {f"{run.device.type} bf16 vs cpu fp32": compare(runs[f"{run.device.type} bf16"], runs["cpu fp32"], a.tolerance)}
    for backend, module in FP8_BACKENDS.items():
        name = f"{run.device.type} fp8-{backend}"
        if _version(module).startswith("not importable") or run.over_budget():
            runs[name] = None
            continue
        runs[name] = train_losses(base, run.device, "bf16", backend, a)
        checks[f"{name} vs {run.device.type} bf16"] = compare(runs[name], runs[f"{run.device.type} bf16"], a.fp8_tolerance)
    return {"model": "tiny", "steps": a.steps, "lr": a.lr, "losses": runs, "checks": checks}


# ------------------------------------------------------------------------------------------------------------ report
def guarded(fn: Callable[[], Any]) -> Any:
    """Run one measurement; an exception becomes its record instead of ending the kit."""
    try:
        return fn()
    except Exception as e:
        return {"error": f"{type(e).__name__}: {str(e)[:500]}", "traceback": traceback.format_exc()[-6000:]}


def blocks_section(run: Run, a: argparse.Namespace) -> list[dict[str, Any]]:
    workloads = DRY_WORKLOADS if run.dry_run else WORKLOADS
    rows = []
    for name in a.models or list(workloads):
        for attention in dict.fromkeys(v.attention for v in variants(run, False) if v.attention != "flash-attn"):
            rows.append(guarded(lambda: attention_row(name, ALL_WORKLOADS[name], attention, run)))
        for v in variants(run, a.compile):
            record = {"model": name, "variant": v.name}
            if run.over_budget():
                rows.append({**record, "skipped": "time budget (--budget) spent"})
            elif reason := _unavailable(v):
                rows.append({**record, "skipped": reason})
            else:
                start = time.monotonic()
                row = guarded(lambda: block_row(name, ALL_WORKLOADS[name], v, run))
                rows.append({**record, **row, "wall_s": time.monotonic() - start})  # compilation included
    return rows


def _unavailable(v: Variant) -> Optional[str]:
    module = FP8_BACKENDS.get(v.fp8) or ("flash_attn" if v.attention == "flash-attn" else None)
    version = _version(module) if module else ""
    return version if version.startswith("not importable") else None


def markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = [f"# GPU check ({'dry run, CPU' if result['dry_run'] else env.get('gpu', env['device'])})", "",
             "| | |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in env.items() if k != "packages"]
    lines += [f"| {k} | {v} |" for k, v in env["packages"].items()]
    lines += ["", "## One dual block, forward + backward, batch 1", "",
              "| model | variant | tokens (v+m) | ms | TFLOP/s | MFU | peak GiB | plan GiB |", "| --- " * 8 + "|"]
    for r in result["blocks"]:
        if "seconds_median" not in r:
            lines.append(f"| {r.get('model')} | {r.get('variant')} | {r.get('skipped') or r.get('error')} | | | | | |")
            continue
        tokens = f"{r['video_tokens']}+{r['motion_tokens']}" if "video_tokens" in r else str(r["tokens"])
        lines.append(f"| {r['model']} | {r['variant']} | {tokens} | {r['seconds_median'] * 1e3:.1f} | {r['tflops']:.1f} | "
                     f"{_fmt(r['mfu'], '.1%')} | {_fmt(r.get('peak_memory_gib'), '.2f')} | "
                     f"{_fmt(r.get('planned_memory_gib'), '.2f')} |")
    t = result["training"]
    lines += ["", f"## Tiny model, {t.get('steps')} training steps", ""]
    if "error" in t:
        lines.append(f"error: {t['error']}")
    for name, c in t.get("checks", {}).items():
        lines.append(f"- {name}: mean relative loss difference {c['mean_rel_diff']:.2%} (max {c['max_rel_diff']:.2%}), "
                     f"tolerance {c['tolerance']:.0%}: {'pass' if c['passed'] else 'FAIL'}")
    for name, r in t.get("losses", {}).items():
        lines.append(f"- {name}: " + ("not run (backend not importable or budget spent)" if r is None else
                                      f"loss on fixed draws {r['fixed_draws_before']:.4f} -> {r['fixed_draws_after']:.4f}"))
    lines += ["", "## Sampling, tiny model, 4 steps: device against CPU (fp32)", ""]
    for task, r in result["sampling"].items():
        lines.append(f"- {task}: {str(r)[:300]}" if task in ("error", "traceback") else
                     f"- {task}: relative L2 difference {r['rel_l2_diff']:.1e}: {'pass' if r['passed'] else 'FAIL'}")
    lines += ["", f"Wall time {result['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def _fmt(value: Optional[float], spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def main(argv: Optional[list[str]] = None) -> int:
    a = parse_args(argv)
    if not a.dry_run and not torch.cuda.is_available():
        print("tools/gpu_check.py measures a CUDA GPU and none is visible here; --dry-run checks the kit on the CPU.",
              file=sys.stderr)
        return 2
    unknown = set(a.models or []) - set(ALL_WORKLOADS)
    if unknown:
        print(f"--models {sorted(unknown)}: choose from {sorted(ALL_WORKLOADS)}", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    device = torch.device("cpu") if a.dry_run else torch.device("cuda", torch.cuda.current_device())
    if a.dry_run:
        a.steps = min(a.steps, 4)
    run = Run(device, a.dry_run, 1 if a.dry_run else a.warmup, 2 if a.dry_run else a.iters, start + a.budget,
              None if a.dry_run else peak_flops_per_device(a.peak_flops))
    result: dict[str, Any] = {"dry_run": a.dry_run, "environment": environment(device)}
    print(json.dumps(result["environment"]), flush=True)
    result["blocks"] = blocks_section(run, a)
    for r in result["blocks"]:
        print(json.dumps({k: v for k, v in r.items() if k != "traceback"}), flush=True)
    result["training"] = guarded(lambda: training_section(run, a))
    result["sampling"] = guarded(lambda: sampling_section(run))
    result["seconds"] = time.monotonic() - start
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    (out / "gpu_check.md").write_text(markdown(result))
    print(markdown(result))
    ran = all("error" not in r for r in [*result["blocks"], result["training"], result["sampling"]])
    checks = [*result["training"]["checks"].values(), *result["sampling"].values()] if ran else []
    return 0 if ran and all(c["passed"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
