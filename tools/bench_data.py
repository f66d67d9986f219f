"""Data-loading throughput from a loopback S3 server (moto), next to the rate 64 H100s consume training the 5B model.

Writes synthetic HuMoVe shards shaped like the 5B model's real samples (121 frames at 704x1280: bf16 latent [48, 31, 44, 80],
a 100-token umT5 embedding of width 4096, 121 frames of SMPL), uploads them to a moto S3 server on 127.0.0.1, and reads
one epoch with build_dataloader (cold cache: every shard is downloaded) for each worker count. The consumption rate comes
from the analytic FLOPs model in echomotion/metrics.py; docs/PERFORMANCE.md ("Data loading") writes the calculation out.

    python tools/bench_data.py --samples 96 --workers 1 2 4 --local       # + the same shards read in place from disk
    python tools/bench_data.py --samples 512 --motion-only --shard-mb 16 --local # Phase 1 (text -> motion) samples
    python tools/bench_data.py --endpoint https://minio.example:9000 --bucket b    # a real store instead of moto
    python tools/bench_data.py --samples 32 --frames 81 --height 480 --width 832 --channels 16 --stride 8 \
        --model wan2.1-1.3b                                                        # 1.3B shapes
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from echomotion.config import load_config  # noqa: E402
from echomotion.data.schema import COLUMNS, Sample, encode_sample  # noqa: E402
from echomotion.data.loader import build_dataloader  # noqa: E402
from echomotion.models.flops import training_flops  # noqa: E402
from echomotion.motion.smpl import MOTION_TOKENS_PER_FRAME, MotionStats, SMPLMotion  # noqa: E402

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=96)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4], help="DataLoader worker counts to measure")
    p.add_argument("--batch", type=int, default=1, help="per-rank batch size (the 5B model trains with 1 per GPU)")
    p.add_argument("--frames", type=int, default=121)
    p.add_argument("--height", type=int, default=704)
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--channels", type=int, default=48, help="VAE latent channels (Wan2.2: 48, Wan2.1: 16)")
    p.add_argument("--stride", type=int, default=16, help="VAE spatial stride (Wan2.2: 16, Wan2.1: 8); temporal is 4")
    p.add_argument("--motion-only", action="store_true", help="Phase 1 samples: no latent (text + SMPL only)")
    p.add_argument("--text-tokens", type=int, default=100, help="true prompt length stored per sample")
    p.add_argument("--shard-mb", type=int, default=64, help="MDS shard size limit")
    p.add_argument("--model", default="wan2.2-5b", help="model preset whose training rate is the demand")
    p.add_argument("--gpus", type=int, default=64)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU (H100 SXM)")
    p.add_argument("--mfu", type=float, nargs=2, default=[0.40, 0.55], help="assumed MFU range")
    p.add_argument("--endpoint", default=None,
                   help="an existing S3-compatible store (AWS_* credentials) instead of moto on loopback")
    p.add_argument("--bucket", default="echomotion-bench", help="bucket for --endpoint (shards go under bench_data/)")
    p.add_argument("--local", action="store_true", help="also read the shards in place from local disk (no server)")
    p.add_argument("--work-dir", default=None, help="where shards and caches go (default: a temporary folder)")
    return p.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(300):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1)
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start (pip install 'moto[server]')")


def write_dataset(out: Path, args: argparse.Namespace) -> tuple[list[int], int]:
    """Shards of `args.samples` samples sharing one random payload (uncompressed, so content does not matter)."""
    from streaming import MDSWriter

    latent = [args.channels, (args.frames - 1) // 4 + 1, args.height // args.stride, args.width // args.stride]
    g = torch.Generator().manual_seed(0)
    payload = dict(
        video_latent=None if args.motion_only else torch.randn(*latent, generator=g).to(torch.bfloat16),
        text_embedding=torch.randn(args.text_tokens, 4096, generator=g),
        betas=torch.randn(10, generator=g).expand(args.frames, 10),
        global_orient=torch.randn(args.frames, 3, generator=g),
        body_pose=torch.randn(args.frames, 23, 3, generator=g),
        transl=torch.randn(args.frames, 3, generator=g),
        joints=torch.randn(args.frames, 24, 3, generator=g),
    )
    with MDSWriter(out=str(out), columns=COLUMNS, size_limit=args.shard_mb << 20) as w:
        for i in range(args.samples):
            sample = Sample(f"bench{i:05d}", "bench", "bench", "a person walks", 24.0, args.frames, args.height, args.width,
                            **payload)
            w.write(encode_sample(sample, latent_dtype="bfloat16"))
    motion = SMPLMotion(*(payload[k] for k in ("betas", "global_orient", "body_pose", "transl", "joints")))
    MotionStats.compute([motion.to_features()]).save(out / "motion_stats.json")
    return latent, sum(f.stat().st_size for f in out.glob("shard.*"))


def upload(folder: Path, endpoint: str, bucket: str) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint)
    if bucket not in {b["Name"] for b in s3.list_buckets().get("Buckets", [])}:
        s3.create_bucket(Bucket=bucket)
    for f in sorted(folder.iterdir()):
        s3.upload_file(str(f), bucket, f"bench_data/{f.name}")


def read_epoch(args: argparse.Namespace, path: str, cache: Path, workers: int) -> tuple[int, float, float]:
    """(samples after the first batch, seconds to the first batch, seconds for the rest) with a cold cache: the first
    batch carries the start-up (index, stats, worker start, first shard); the rest is the steady rate training sees."""
    source = "data.motion_only_path" if args.motion_only else "data.path"
    cfg = load_config(None, [
        f"{source}={path}", f"data.cache_dir={cache}", f"data.batch_size={args.batch}", f"data.num_workers={workers}",
        "data.shuffle=true", "data.clean_stale_shm=false", "model.text_len=512",
    ])
    start = time.perf_counter()
    _, loader = build_dataloader(cfg, rank=0, world_size=1)
    batches = iter(loader)
    next(batches)
    first = time.perf_counter()
    n = sum(len(batch) for batch in batches)
    return n, first - start, time.perf_counter() - first


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_data_"))
    shards = work / "shards"
    shutil.rmtree(shards, ignore_errors=True)
    t0 = time.perf_counter()
    latent, total_bytes = write_dataset(shards, args)
    per_sample = total_bytes / args.samples
    shape = "none" if args.motion_only else f"{latent} bf16"
    print(f"wrote {args.samples} samples, latent {shape}, {per_sample / 1e6:.2f} MB/sample, "
          f"{total_bytes / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s")

    server = None
    if args.endpoint:
        os.environ["S3_ENDPOINT_URL"], bucket, label = args.endpoint, args.bucket, f"S3 ({args.endpoint})"
    else:
        os.environ.update(CREDENTIALS)
        port = free_port()
        os.environ["S3_ENDPOINT_URL"], bucket, label = f"http://127.0.0.1:{port}", "bench", "S3 (moto, loopback)"
        server = start_moto(port)
    rows = []
    try:
        t0 = time.perf_counter()
        upload(shards, os.environ["S3_ENDPOINT_URL"], bucket)
        print(f"uploaded to {os.environ['S3_ENDPOINT_URL']} in {time.perf_counter() - t0:.0f} s")
        sources = [(label, f"s3://{bucket}/bench_data")] + ([("local disk, in place", str(shards))] if args.local else [])
        for source, path in sources:
            for workers in args.workers:
                cache = work / f"cache_w{workers}"
                shutil.rmtree(cache, ignore_errors=True)
                n, first, rest = read_epoch(args, path, cache, workers)
                shutil.rmtree(cache, ignore_errors=True)
                rows.append((source, workers, n / rest, n * per_sample / rest / 1e6, first))
                print(f"{source}, workers {workers}: first batch after {first:.1f} s, then {n} samples in {rest:.1f} s")
    finally:
        if server is not None:
            server.kill()
            server.wait()
        if not args.work_dir:  # a folder of our own: gigabytes of shards nobody asked to keep
            shutil.rmtree(work, ignore_errors=True)

    from echomotion.config import model_preset

    m = model_preset(args.model)
    video_tokens = 0 if args.motion_only else latent[1] * (latent[2] // m.patch_size[1]) * (latent[3] // m.patch_size[2])
    motion_tokens = args.frames * MOTION_TOKENS_PER_FRAME
    flops = training_flops(m, video_tokens, motion_tokens, m.text_len)
    demand = [args.gpus * args.peak_tflops * 1e12 * mfu / flops for mfu in args.mfu]
    node_demand = [d * args.gpus_per_node / args.gpus for d in demand]
    print(f"\ndemand: {args.model}, {video_tokens} video + {motion_tokens} motion tokens, text {m.text_len}: "
          f"{flops:.3e} training FLOPs/sample; {args.gpus} GPUs x {args.peak_tflops:.0f} TFLOPs at MFU "
          f"{args.mfu[0]:.0%}-{args.mfu[1]:.0%} -> {demand[0]:.1f}-{demand[1]:.1f} samples/s "
          f"({demand[0] * per_sample / 1e6:.0f}-{demand[1] * per_sample / 1e6:.0f} MB/s); per {args.gpus_per_node}-GPU node "
          f"{node_demand[0]:.2f}-{node_demand[1]:.2f} samples/s")
    gpu_demand = demand[1] / args.gpus
    print("\n| source | workers | samples/s | MB/s | first batch (s) | x per-GPU | x per-node | x cluster |")
    print("|---|---|---|---|---|---|---|---|")
    for source, workers, rate, mbs, first in rows:
        print(f"| {source} | {workers} | {rate:.1f} | {mbs:.0f} | {first:.1f} | {rate / gpu_demand:.0f} | "
              f"{rate / node_demand[1]:.1f} | {rate / demand[1]:.2f} |")
    print(f"(steady rate after the first batch; ratios against the higher demand, MFU {args.mfu[1]:.0%}: "
          f"{gpu_demand:.3f} samples/s per GPU, {node_demand[1]:.2f} per node, {demand[1]:.1f} for the cluster)")

if __name__ == "__main__":
    main()
