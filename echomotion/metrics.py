"""What a run reports: `metrics.jsonl` and a Prometheus exporter with the same numbers.

MFU = training FLOPs per second (`echomotion.models.flops`) / (peak FLOPs per device × devices).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, TextIO

from .checkpoint import superseded_dir
from .files import atomic_write

# Dense bf16 peak per device, for MFU (torchtitan's table).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2.25e15}


def peak_flops_per_device(configured: float) -> Optional[float]:
    """The configured peak, else the table's value for the visible GPU; None on CPU (MFU is then not reported)."""
    if configured > 0:
        return configured
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class ProgressReport:
    """Rank 0's progress: a bar on a terminal; where stdout is a log file (Slurm, Kubernetes, a launcher's pipe), which a
    bar fills with carriage returns, one plain line every `every` steps and at the last step."""

    def __init__(self, desc: str, total: int, initial: int, every: int, stream: TextIO = sys.stdout):
        self.desc, self.total, self.every, self.stream = desc, total, every, stream
        self.first, self.start = initial, time.monotonic()
        self.bar = None
        if stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=stream)

    def update(self, rec: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{rec['loss']:.4f}", refresh=False)
            return
        step = rec["step"]
        if step % self.every and step != self.total:
            return
        elapsed = time.monotonic() - self.start
        eta = elapsed / (step - self.first) * (self.total - step) if step > self.first else math.nan
        print(f"[echomotion] {self.desc} step {step}/{self.total} loss {rec['loss']:.4f} lr {rec['lr']:.3g} "
              f"{rec['samples_per_s']:.2f} samples/s elapsed {_clock(elapsed)} eta {_clock(eta)}", file=self.stream,
              flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


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


class TensorBoardLog:
    """The step records as TensorBoard scalars (one tag per numeric field, e.g. `loss/joint/video`) in
    run_dir/tensorboard, written by rank 0, with the resolved config as text at the start. A resumed run drops the events
    past the step it resumed from (`purge_step`), as MetricsLog does for its lines."""

    def __init__(self, run_dir: str | Path, config_yaml: str, resume_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step + 1, flush_secs=30)
        self.writer.add_text("config", "```\n" + config_yaml + "\n```", global_step=resume_step)

    def write(self, record: dict[str, Any]) -> None:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.writer.add_scalar(key, value, global_step=record["step"])

    def close(self) -> None:
        self.writer.close()


class StepLoggers:
    """Every logger a step record goes to (`train.loggers`), built by rank 0; the other ranks log nothing."""

    def __init__(self, loggers: list[str], run_dir: str | Path, config_yaml: str, enabled: bool, resume_step: int = 0,
                 archive: Optional[Path] = None):
        self.jsonl = MetricsLog(run_dir, enabled, resume_step, archive)
        self.extra = [TensorBoardLog(run_dir, config_yaml, resume_step)] if enabled and "tensorboard" in loggers else []

    def write(self, record: dict[str, Any]) -> None:
        self.jsonl.write(record)
        for logger in self.extra:
            logger.write(record)

    def close(self) -> None:
        for logger in self.extra:
            logger.close()


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
