"""What a run reports: `metrics.jsonl`, a Prometheus exporter with the same numbers, and the FLOPs model behind MFU.

FLOPs (forward, per sample) are counted analytically from the config: every matmul is 2·m·n·k. Per layer, for each
modality stream with L_s tokens that has an expert in that layer: q/k/v/o 8·D²·L_s, cross-attention q/o 4·D²·L_s and k/v
over the text 4·D²·L_t, FFN 4·D·F·L_s, cross-attention scores and values 4·L_s·L_t·D; plus the joint self-attention scores
and values 4·L²·D over all L = L_v + L_m tokens of the layer. Embeddings, heads and the motion MLPs are added. Training
costs 3× the forward (backward ≈ 2× forward; frozen Phase 1 weights still back-propagate activations, so this is kept).
MFU = training FLOPs per second / (peak FLOPs per device × devices).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional

from .checkpoint import superseded_dir
from .config import ModelConfig, dual_layer_indices
from .files import atomic_write
from .motion.smpl import MOTION_TOKENS_PER_FRAME, POS_DIM, ROT_DIM, SHAPE_DIM, NUM_POS_TOKENS, NUM_ROT_TOKENS

# Dense bf16 peak per device, for MFU (torchtitan's table).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2.25e15}


def forward_flops(m: ModelConfig, video_tokens: int, motion_tokens: int, text_tokens: int) -> float:
    """Forward FLOPs of one sample (see the module docstring for the formula)."""
    d, f = m.dim, m.ffn_dim
    dual = set(dual_layer_indices(m))
    total = 0.0
    for layer in range(m.num_layers):
        streams = [video_tokens] + ([motion_tokens] if layer in dual else [])
        streams = [s for s in streams if s > 0]
        for ls in streams:
            total += 8 * d * d * ls + 4 * d * d * ls + 4 * d * d * text_tokens + 4 * d * f * ls + 4 * ls * text_tokens * d
        joint = sum(streams)
        total += 4 * joint * joint * d
    patch = m.patch_size[0] * m.patch_size[1] * m.patch_size[2]
    hidden = m.motion.mlp_hidden or d
    total += 2 * video_tokens * d * (m.in_channels * patch + m.out_channels * patch)  # patch embedding + head
    total += 2 * text_tokens * (m.text_dim * d + d * d)  # text embedding
    if motion_tokens:
        frames = motion_tokens / MOTION_TOKENS_PER_FRAME
        per_frame_in = NUM_POS_TOKENS * POS_DIM + NUM_ROT_TOKENS * ROT_DIM + SHAPE_DIM
        total += 2 * 2 * frames * (per_frame_in * hidden + MOTION_TOKENS_PER_FRAME * hidden * d)  # in + out MLPs
    return total


def training_flops(m: ModelConfig, video_tokens: int, motion_tokens: int, text_tokens: int) -> float:
    return 3.0 * forward_flops(m, video_tokens, motion_tokens, text_tokens)


def peak_flops_per_device(configured: float) -> Optional[float]:
    """The configured peak, else the table's value for the visible GPU; None on CPU (MFU is then not reported)."""
    if configured > 0:
        return configured
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


class MetricsLog:
    """Append-only `metrics.jsonl` written by rank 0. On resume, lines past the resumed step (and a line torn by a crash
    mid-write) move to `archive`, so the file describes exactly the steps the model state contains and nothing written
    is lost."""

    def __init__(self, run_dir: str | Path, enabled: bool, resume_step: int = 0, archive: Optional[Path] = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists():
                self._cut(resume_step, archive or superseded_dir(run_dir, resume_step))

    def _cut(self, resume_step: int, archive: Path) -> None:
        kept, dropped = [], []
        for ln in self.path.read_text().splitlines():
            if ln.strip():
                rec = _parse(ln)
                (kept if rec is not None and rec.get("step", 0) <= resume_step else dropped).append(ln)
        if not dropped:
            return
        archive.mkdir(parents=True, exist_ok=True)
        with (archive / "metrics.jsonl").open("a") as fh:
            fh.write("".join(ln + "\n" for ln in dropped))
            fh.flush()
            os.fsync(fh.fileno())
        atomic_write(self.path, lambda tmp: tmp.write_text("".join(ln + "\n" for ln in kept)))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a") as fh:
            fh.write(json.dumps(clean) + "\n")


def _parse(line: str) -> Optional[dict[str, Any]]:
    """One metrics line, or None for a line a crash tore mid-write."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        return None
    return rec if isinstance(rec, dict) else None


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of `run_dir/metrics.jsonl`, skipping a line torn by a crash."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [rec for ln in path.read_text().splitlines() if ln.strip() and (rec := _parse(ln)) is not None]


class PrometheusExporter:
    """prometheus-client series with the `echomotion_` prefix, served on this process's port.

    Job-level series (loss, step, throughput, checkpoints, skipped steps, restarts) are served by rank 0 only, so a query
    over all ranks' targets never mixes in copies; on other ranks those objects exist but are not registered, so callers
    need no rank checks. Per-rank series (step time, data wait, memory) carry a `rank` label: skew between ranks shows
    there. `echomotion_process_*` (RSS, CPU, start time) comes from every process. Names and labels: docs/operations.md.
    """

    def __init__(self, port: int, rank: int, addr: str = "0.0.0.0"):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, start_http_server

        self.rank = str(rank)
        self.registry = CollectorRegistry()
        r = self.registry
        job = r if rank == 0 else None
        self.loss = Gauge("echomotion_loss", "Training loss of the last logged step", ["task", "modality"], registry=job)
        self.grad_norm = Gauge("echomotion_grad_norm", "Global gradient norm before clipping", registry=job)
        self.lr = Gauge("echomotion_learning_rate", "Learning rate", registry=job)
        self.step = Gauge("echomotion_step", "Last finished optimizer step", registry=job)
        self.samples_per_s = Gauge("echomotion_samples_per_second", "Global training samples per second", registry=job)
        self.tokens_per_s = Gauge("echomotion_tokens_per_second", "Global training tokens per second", registry=job)
        self.mfu = Gauge("echomotion_mfu", "Model FLOPs utilization (0..1)", registry=job)
        self.skipped = Counter("echomotion_skipped_steps", "Steps skipped for NaN/Inf loss or gradient", registry=job)
        self.nan_streak = Gauge("echomotion_nan_streak", "Skipped (NaN/Inf) steps in a row up to the last step", registry=job)
        self.ckpt_seconds = Gauge("echomotion_checkpoint_save_seconds", "Duration of the last checkpoint save", registry=job)
        self.ckpt_last = Gauge(
            "echomotion_checkpoint_last_success_timestamp_seconds",
            "Unix time of the run's last complete checkpoint: written by this process, or resumed from (0 before any)",
            registry=job,
        )
        self.restarts = Counter("echomotion_restarts", "Times this run resumed from a checkpoint", registry=job)
        self.step_time = Histogram(
            "echomotion_step_time_seconds", "Wall time of one optimizer step", ["rank"], registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160),
        )
        self.data_wait = Gauge("echomotion_data_wait_seconds", "Time the last step waited for data", ["rank"], registry=r)
        self.memory = Gauge(
            "echomotion_memory_max_allocated_bytes", "Peak accelerator memory (peak process RSS on CPU)", ["rank"], registry=r
        )
        self.collective_bytes = Gauge(
            "echomotion_collective_bytes_per_step", "Bytes this rank gave to collectives in the last counted step, by kind",
            ["rank", "kind"], registry=r,
        )
        ProcessCollector(namespace="echomotion", registry=r)
        start_http_server(port, addr=addr, registry=r)

    def observe_step(self, rec: dict[str, Any], job_level: bool) -> None:
        self.step_time.labels(self.rank).observe(rec["step_time"])
        self.data_wait.labels(self.rank).set(rec["data_wait"])
        memory = rec.get("memory_bytes")
        self.memory.labels(self.rank).set(memory if memory is not None else _peak_rss_bytes())
        for key, value in rec.items():
            if key.startswith("comm/"):  # comm/<kind>_bytes, on counted steps only
                self.collective_bytes.labels(self.rank, key[len("comm/"):-len("_bytes")]).set(value)
        if not job_level:
            return
        self.step.set(rec["step"])
        if rec.get("loss") is not None:
            self.loss.labels("all", "all").set(rec["loss"])
        for key, value in rec.items():
            if key.startswith("loss/") and value is not None:  # loss/<modality> (all tasks) or loss/<task>/<modality>
                parts = key.split("/")[1:]
                task, modality = ("all", parts[0]) if len(parts) == 1 else parts
                self.loss.labels(task, modality).set(value)
        for key, gauge in (("grad_norm", self.grad_norm), ("lr", self.lr), ("samples_per_s", self.samples_per_s),
                           ("tokens_per_s", self.tokens_per_s), ("mfu", self.mfu), ("nan_streak", self.nan_streak)):
            if rec.get(key) is not None:
                gauge.set(rec[key])


def _peak_rss_bytes() -> int:
    """Peak resident memory of this process (Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
