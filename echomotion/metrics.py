"""What a run reports: `metrics.jsonl` and a Prometheus exporter with the same numbers.

MFU = training FLOPs per second (`echomotion.models.flops`) / (peak FLOPs per device × devices).
"""
from __future__ import annotations

import json
import math
import os
import secrets
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


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    """The record's finite numeric fields but the step itself: what a scalar logger can plot (None, NaN, bools dropped)."""
    return {k: v for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class TensorBoardLog:
    """The step records as TensorBoard scalars (one tag per numeric field, e.g. `loss/joint/video`) in
    run_dir/tensorboard, written by rank 0, with the resolved config as text at the start. A resumed run drops the events
    past the step it resumed from (`purge_step`), as MetricsLog does for its lines."""

    def __init__(self, run_dir: str | Path, config_yaml: str, resume_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step + 1, flush_secs=30)
        self.writer.add_text("config", "```\n" + config_yaml + "\n```", global_step=resume_step)

    def write(self, record: dict[str, Any]) -> None:
        for key, value in _scalars(record).items():
            self.writer.add_scalar(key, value, global_step=record["step"])

    def images(self, step: int, images: dict[str, Path]) -> None:
        import numpy as np
        from PIL import Image

        for tag, path in images.items():
            with Image.open(path) as img:
                pixels = np.asarray(img.convert("RGB"))  # H x W x 3 uint8 (a grid may be saved as RGBA or palette)
            self.writer.add_image(tag, pixels, global_step=step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class WandbLog:
    """The step records (finite numeric fields) and sample grids as a Weights & Biases run in run_dir/wandb, with the
    resolved config, written by rank 0. The run id lives in run_dir/wandb_id, so a restarted job continues the same W&B
    run instead of starting a new one per restart. W&B keeps only steps above the last it holds, so the steps a restart
    repeats (those after the resumed checkpoint) keep their first values there; metrics.jsonl has the resumed ones."""

    def __init__(self, run_dir: str | Path, config: dict[str, Any], project: str, mode: str):
        import wandb

        run_dir = Path(run_dir)
        id_file = run_dir / "wandb_id"
        if not id_file.exists():
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(id_file, lambda tmp: tmp.write_text(secrets.token_hex(6)))  # W&B ids: letters and digits
        self.wandb = wandb
        # console="off": rank 0's stdout stays the launcher's log (and its progress bar) instead of being wrapped
        self.run = wandb.init(project=project, dir=str(run_dir), mode=mode, config=config, name=run_dir.name,
                              id=id_file.read_text().strip(), resume="allow", settings=wandb.Settings(console="off"))

    def write(self, record: dict[str, Any]) -> None:
        self.run.log(_scalars(record), step=record["step"])

    def images(self, step: int, images: dict[str, Path]) -> None:
        self.run.log({tag: self.wandb.Image(str(path)) for tag, path in images.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


class StepLoggers:
    """Every logger a step record goes to (`train.loggers`), built by rank 0; the other ranks log nothing."""

    def __init__(self, loggers: list[str], run_dir: str | Path, config_yaml: str, enabled: bool, resume_step: int = 0,
                 archive: Optional[Path] = None, wandb_project: str = "echomotion", wandb_mode: str = "offline"):
        self.jsonl = MetricsLog(run_dir, enabled, resume_step, archive)
        self.extra: list[TensorBoardLog | WandbLog] = []
        if enabled and "tensorboard" in loggers:
            self.extra.append(TensorBoardLog(run_dir, config_yaml, resume_step))
        if enabled and "wandb" in loggers:
            import yaml

            self.extra.append(WandbLog(run_dir, yaml.safe_load(config_yaml), wandb_project, wandb_mode))

    def write(self, record: dict[str, Any]) -> None:
        self.jsonl.write(record)
        for logger in self.extra:
            logger.write(record)

    def images(self, step: int, images: dict[str, Path]) -> None:
        """Sample grids (tag -> PNG file, e.g. `samples/joint` -> run_dir/samples/step-N/joint/grid.png) to the image
        loggers; metrics.jsonl records nothing, the PNGs stay where they are."""
        for logger in self.extra:
            logger.images(step, images)

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

    Job-level series (loss, eval loss, step, throughput, checkpoints, skipped steps, restarts, termination grace) are
    served by rank 0 only, so a query over all ranks' targets never mixes in copies; on other ranks those objects exist
    but are not registered, so callers need no rank checks. Per-rank series (step time, compute time, data wait, memory)
    carry a `rank` label: skew between ranks shows there. `echomotion_process_*` (RSS, CPU, start time) comes from every
    process. `termination_grace` is the SIGTERM-to-SIGKILL time the job runs under (train.termination_grace), served so
    an alert can compare checkpoint time with it. Names and labels: docs/operations.md.

    Names follow Prometheus' guide: what accumulates is a counter (`echomotion_samples_total`, `echomotion_tokens_total`,
    incremented by each step's global count; throughput is their rate(), which, unlike a last-step gauge, averages over
    every step between scrapes), a ratio ends in `_ratio`, per-step durations are histograms (step time, data wait,
    checkpoint duration and blocked time). `echomotion_checkpoint_save_seconds` stays a last-value gauge: saves are
    minutes apart, and the EchoMotionCheckpointNearGrace alert must keep comparing the latest one with the grace between
    saves, which a histogram's rate over a window cannot.
    """

    def __init__(self, port: int, rank: int, addr: str = "0.0.0.0", *, termination_grace: float):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, start_http_server

        self.rank = str(rank)
        self.registry = CollectorRegistry()
        r = self.registry
        job = r if rank == 0 else None
        self.loss = Gauge("echomotion_loss", "Training loss of the last logged step", ["task", "modality"], registry=job)
        self.grad_norm = Gauge("echomotion_grad_norm", "Global gradient norm before clipping", registry=job)
        self.lr = Gauge("echomotion_learning_rate", "Learning rate", registry=job)
        self.step = Gauge("echomotion_step", "Last finished optimizer step", registry=job)
        self.samples = Counter("echomotion_samples", "Training samples consumed, all ranks", registry=job)
        self.tokens = Counter("echomotion_tokens", "Training tokens consumed, all ranks", registry=job)
        self.mfu = Gauge("echomotion_mfu_ratio", "Model FLOPs utilization of the last step (0..1)", registry=job)
        self.skipped = Counter("echomotion_skipped_steps", "Steps skipped for NaN/Inf loss or gradient", registry=job)
        self.nan_streak = Gauge("echomotion_nan_streak", "Skipped (NaN/Inf) steps in a row up to the last step", registry=job)
        self.ckpt_seconds = Gauge("echomotion_checkpoint_save_seconds", "Duration of the last checkpoint save", registry=job)
        self.ckpt_last = Gauge(
            "echomotion_checkpoint_last_success_timestamp_seconds",
            "Unix time of the run's last complete checkpoint: written by this process, or resumed from (0 before any)",
            registry=job,
        )
        self.restarts = Counter("echomotion_restarts", "Times this run resumed from a checkpoint", registry=job)
        ckpt_buckets = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 900, 1200, 1800)  # 0.1 s .. 30 min
        self.ckpt_duration = Histogram("echomotion_checkpoint_duration_seconds", "Checkpoint saves: start to complete",
                                       registry=job, buckets=ckpt_buckets)
        self.ckpt_blocked = Histogram("echomotion_checkpoint_blocked_seconds",
                                      "Checkpoint saves: time training was held up by the save", registry=job,
                                      buckets=ckpt_buckets)
        self.grace = Gauge("echomotion_termination_grace_seconds",
                           "SIGTERM-to-SIGKILL time the job runs under (train.termination_grace)", registry=job)
        self.grace.set(termination_grace)
        self.eval_loss = Gauge("echomotion_eval_loss", "Loss on the held-out set at the last evaluation",
                               ["task", "modality"], registry=job)
        self.step_time = Histogram(
            "echomotion_step_time_seconds", "Wall time of one optimizer step", ["rank"], registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160),
        )
        self.compute = Gauge(
            "echomotion_rank_compute_seconds",
            "This rank's compute time of the last step, before it blocked at the step-end collective", ["rank"], registry=r,
        )
        self.data_wait = Histogram("echomotion_data_wait_seconds", "Time a step waited for data", ["rank"], registry=r,
                                   buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60))
        self.memory = Gauge(
            "echomotion_memory_max_allocated_bytes", "Peak accelerator memory (peak process RSS on CPU)", ["rank"], registry=r
        )
        self.memory_reserved = Gauge("echomotion_memory_reserved_bytes",
                                     "Peak accelerator memory reserved by the caching allocator", ["rank"], registry=r)
        self.memory_total = Gauge("echomotion_memory_total_bytes", "The accelerator's total memory", ["rank"], registry=r)
        self.collective_bytes = Gauge(
            "echomotion_collective_bytes_per_step", "Bytes this rank gave to collectives in the last counted step, by kind",
            ["rank", "kind"], registry=r,
        )
        ProcessCollector(namespace="echomotion", registry=r)
        start_http_server(port, addr=addr, registry=r)

    def observe_step(self, rec: dict[str, Any], job_level: bool) -> None:
        self.step_time.labels(self.rank).observe(rec["step_time"])
        self.compute.labels(self.rank).set(rec["compute_s"])
        self.data_wait.labels(self.rank).observe(rec["data_wait"])
        memory = rec.get("memory_bytes")
        self.memory.labels(self.rank).set(memory if memory is not None else _peak_rss_bytes())
        for key, gauge in (("memory_reserved_bytes", self.memory_reserved), ("memory_total_bytes", self.memory_total)):
            if rec.get(key) is not None:  # None on CPU: no accelerator memory to report
                gauge.labels(self.rank).set(rec[key])
        for key, value in rec.items():
            if key.startswith("comm/"):  # comm/<kind>_bytes, on counted steps only
                self.collective_bytes.labels(self.rank, key[len("comm/"):-len("_bytes")]).set(value)
        if not job_level:
            return
        self.step.set(rec["step"])
        self.samples.inc(rec["samples"])
        self.tokens.inc(rec["tokens"])
        if rec.get("loss") is not None:
            self.loss.labels("all", "all").set(rec["loss"])
        for key, value in rec.items():
            if key.startswith("loss/") and value is not None:  # loss/<modality> (all tasks) or loss/<task>/<modality>
                parts = key.split("/")[1:]
                task, modality = ("all", parts[0]) if len(parts) == 1 else parts
                self.loss.labels(task, modality).set(value)
        for key, gauge in (("grad_norm", self.grad_norm), ("lr", self.lr), ("mfu", self.mfu), ("nan_streak", self.nan_streak)):
            if rec.get(key) is not None:
                gauge.set(rec[key])

    def observe_checkpoint(self, duration_s: float, blocked_s: float) -> None:
        """One finished save (rank 0): its whole duration and the part training waited for (equal for a synchronous
        save); the duration is also the `echomotion_checkpoint_save_seconds` gauge."""
        self.ckpt_duration.observe(duration_s)
        self.ckpt_blocked.observe(blocked_s)
        self.ckpt_seconds.set(duration_s)

    def observe_eval(self, rec: dict[str, Any]) -> None:
        """An evaluation's record (rank 0): `eval/loss/<task>/<modality>` keys become eval-loss gauges; others ignored."""
        for key, value in rec.items():
            parts = key.split("/")
            if len(parts) == 4 and parts[:2] == ["eval", "loss"] and value is not None:
                self.eval_loss.labels(parts[2], parts[3]).set(value)


def _peak_rss_bytes() -> int:
    """Peak resident memory of this process (Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
