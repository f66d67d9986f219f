"""Forward + backward time of EchoMotionDiT's video-only path vs diffusers' WanTransformer3DModel, identical weights, fp32.

The diffusers model is built at random, saved, and loaded into ours with `load_wan`, so both run the same function (outputs are
checked to agree before timing). The two are timed alternately, repeat by repeat, so machine noise hits both alike. Besides
wall time it reports process CPU time, which other processes on a shared machine disturb far less (exact with --threads 1;
with more threads it includes OpenMP spin-waiting).

    python tools/bench_model.py --dim 512 --heads 8 --layers 2 --latent 4 32 32 --text-len 64 --repeats 5
    python tools/bench_model.py --profile      # + the top ops of each (torch.profiler, self CPU time)
    python tools/bench_model.py --compile ours # blocks compiled as `parallel.compile=true` runs them (or: both)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from echomotion.models.wan_io import load_wan, wan_config  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--ffn-dim", type=int, default=0, help="0 = 4 * dim")
    p.add_argument("--channels", type=int, default=16, help="latent channels (48 for Wan2.2-TI2V-like)")
    p.add_argument("--latent", type=int, nargs=3, default=[4, 32, 32], metavar=("F", "H", "W"), help="latent size (patch 1,2,2)")
    p.add_argument("--text-len", type=int, default=64)
    p.add_argument("--text-dim", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--per-token", action="store_true", help="per-token timesteps [B, L], Wan2.2 TI2V style (first frame clean)")
    p.add_argument("--dual-layers", default="all", help="model.dual_layers of ours (motion experts are idle video-only)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--profile", action="store_true", help="print the top ops of one step of each model")
    p.add_argument("--compile", choices=("none", "ours", "both"), default="none",
                   help="torch.compile each block: of ours only (parallel.compile=true, as training runs it) or of both models")
    return p.parse_args(argv)


def build_models(a: argparse.Namespace):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    ref = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=a.heads,
        attention_head_dim=a.dim // a.heads,
        in_channels=a.channels,
        out_channels=a.channels,
        text_dim=a.text_dim,
        freq_dim=256,
        ffn_dim=a.ffn_dim or 4 * a.dim,
        num_layers=a.layers,
    )
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        ours = load_wan(tmp, wan_config(tmp, dual_layers=a.dual_layers))
    return ref.train(), ours.train()


def make_steps(a: argparse.Namespace, ref, ours) -> dict[str, Callable[[], torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    video = torch.randn(a.batch, a.channels, *a.latent, generator=g)
    text = torch.randn(a.batch, a.text_len, a.text_dim, generator=g)
    tokens = a.latent[0] * (a.latent[1] // 2) * (a.latent[2] // 2)
    t = torch.randint(1, 1001, (a.batch,), generator=g)
    if a.per_token:  # TI2V: the first latent frame is the clean conditioning image (timestep 0), the rest noisy
        t = t[:, None].repeat(1, tokens)
        t[:, : tokens // a.latent[0]] = 0

    def run(forward: Callable[[], torch.Tensor], model: torch.nn.Module) -> Callable[[], torch.Tensor]:
        def step() -> torch.Tensor:
            out = forward()
            out.square().mean().backward()
            model.zero_grad(set_to_none=True)
            return out.detach()

        return step

    return {
        "ours": run(lambda: ours(video=video, video_timestep=t, text=text), ours),
        "diffusers": run(lambda: ref(video, t, text, return_dict=False)[0], ref),
    }


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    ref, ours = build_models(a)
    if a.compile != "none":
        from parallel.activation import apply_compile

        apply_compile(ours)
        if a.compile == "both":
            for block in ref.blocks:
                block.compile()
    steps = make_steps(a, ref, ours)
    a_out, b_out = steps["ours"](), steps["diffusers"]()
    err = ((a_out - b_out).norm() / b_out.norm()).item()
    tokens = a.latent[0] * (a.latent[1] // 2) * (a.latent[2] // 2)
    print(
        f"config: dim {a.dim}, heads {a.heads} (head_dim {a.dim // a.heads}), layers {a.layers}, ffn {a.ffn_dim or 4 * a.dim}, "
        f"batch {a.batch}, video tokens {tokens}, text {a.text_len}x{a.text_dim}, "
        f"timesteps {'per-token (TI2V)' if a.per_token else 'per-sample'}, "
        f"threads {torch.get_num_threads()}, fp32; ours dual_layers={a.dual_layers}; compiled blocks: {a.compile}; "
        f"output rel. diff {err:.1e}"
    )
    for _ in range(a.warmup):
        for step in steps.values():
            step()
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(a.repeats):
        for name, step in steps.items():
            w, c = time.perf_counter(), time.process_time()
            step()
            wall[name].append(time.perf_counter() - w)
            cpu[name].append(time.process_time() - c)
    med_wall = {name: statistics.median(ts) for name, ts in wall.items()}
    med_cpu = {name: statistics.median(ts) for name, ts in cpu.items()}
    print(f"forward+backward, {a.repeats} repeats after {a.warmup} warmup; seconds")
    print(f"{'model':<10} {'wall median':>12} {'wall min':>9} {'wall max':>9} {'CPU median':>11}")
    for name in steps:
        print(f"{name:<10} {med_wall[name]:>12.3f} {min(wall[name]):>9.3f} {max(wall[name]):>9.3f} {med_cpu[name]:>11.3f}")
    print(
        f"speedup (diffusers / ours): wall {med_wall['diffusers'] / med_wall['ours']:.2f}x, "
        f"CPU time {med_cpu['diffusers'] / med_cpu['ours']:.2f}x"
    )
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        for name, step in steps.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step()
            print(f"\n== {name}: top ops by self CPU time (one step)")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


if __name__ == "__main__":
    main()
