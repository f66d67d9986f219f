"""Training entry point.

    torchrun --nproc_per_node=N -m echomotion.train --config configs/tiny.yaml [key=value ...]

Phase 1 trains only the motion experts, motion tokenizer/decoder and task hint on motion-only sequences (the video expert is
frozen and gets no tokens); Phase 2 trains everything on per-sample joint / motion->video / video->motion tasks. A run
resumes from its newest complete checkpoint by default (`train.resume=auto`); SIGTERM saves a checkpoint and exits 0.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import numpy as np
import torch
from streaming.base.util import clean_stale_shared_memory
from torch.distributed.tensor import DTensor

from parallel import ParallelContext, build_engine, build_parallel, parallelize
from parallel.comm import CommCounter
from parallel.engine import full_tensors
from parallel.fp8 import fp8_autocast

from .checkpoint import (CheckpointManager, SaveResult, TrainState, load_model_weights, rng_state, set_rng_state,
                         superseded_dir)
from .config import Config, ConfigError, TrainConfig, data_sources, load_config, to_yaml
from .data.batch import Batch
from .data.encoders import pad_text
from .data.loader import build_dataloader
from .diffusion.tasks import TrainingBatch, keyed_generator, training_loss
from .distributed import DistEnv, any_rank, first_problem, init_distributed, shutdown
from .faults import Faults
from .metrics import ProgressReport, PrometheusExporter, StepLoggers, peak_flops_per_device
from .models import EchoMotionDiT, is_motion_parameter
from .models.flops import training_flops
from .models.wan_io import load_wan
from .motion.smpl import MOTION_TOKENS_PER_FRAME
from .preflight import check_inputs, null_text_path, null_text_problem
from .runlock import RunDirInUse, RunDirLock, exit_with_parent
from .validation import Validation


class TrainingError(RuntimeError):
    """The run cannot continue; the message says why and what to change."""


def sample_generator(seed: int, step: int, micro: int, clip_id: str) -> torch.Generator:
    """A sample's draws (task, drops, sigma, noise) depend only on (seed, step, micro-batch, clip id), never on which rank
    holds the sample, so every parallel layout and a resumed run draw the same."""
    return keyed_generator(f"{seed}:{step}:{micro}:{clip_id}")


def build_model(cfg: Config, initial_weights: bool = True) -> EchoMotionDiT:
    """Fresh (seeded), from pretrained Wan, or from an EchoMotion checkpoint / export (Phase 2 <- Phase 1).

    `initial_weights=False` (a resume, whose checkpoint overwrites every weight) skips train.init_wan / init_from, so a
    resumed run does not need their sources any more (keep-last may have rotated a Phase 1 folder away)."""
    t, m = cfg.train, cfg.model
    token_width = m.in_channels * math.prod(m.patch_size)
    if token_width > m.dim:
        raise TrainingError(
            f"a video token carries model.in_channels x patch volume = {token_width} values but model.dim is {m.dim}: the patch "
            "embedding would squeeze the noise and the flow loss could never get low; use a smaller model.patch_size or a wider model"
        )
    torch.manual_seed(t.seed)
    if t.init_wan and initial_weights:
        model = load_wan(t.init_wan, cfg.model)
    else:
        model = EchoMotionDiT(cfg.model)
    if t.init_from and initial_weights:
        src = Path(t.init_from)
        if src.suffix == ".safetensors":
            from .export import load_exported

            loaded, _ = load_exported(src)
            model.load_state_dict(loaded.state_dict())
        elif (src / "meta.json").exists():
            load_model_weights(src, model)
        else:
            raise TrainingError(f"train.init_from={src} is neither an exported .safetensors nor a complete checkpoint folder")
    if t.phase == 1:
        for name, p in model.named_parameters():
            p.requires_grad_(is_motion_parameter(name))
    return model


def lr_factor(step: int, t: Any) -> float:
    """Linear warmup, then constant / cosine / linear decay to min_lr_ratio (step counts from 1)."""
    if t.warmup_steps and step <= t.warmup_steps:
        return step / t.warmup_steps
    if t.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if t.schedule == "cosine" else 1 - progress
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * decay


def load_null_text(cfg: Config) -> torch.Tensor:
    """The empty prompt's embedding, written next to the shards by the data tools."""
    problem = null_text_problem(cfg.data)
    if problem is not None:  # main() checked it already; a Trainer built in-process did not
        raise TrainingError(problem)
    return pad_text(torch.load(null_text_path(cfg.data), weights_only=True), cfg.text_len).float()


def adamw(params: list[torch.nn.Parameter], t: TrainConfig) -> torch.optim.AdamW:
    """AdamW over all tensors in one fused call, not a per-tensor loop: over FSDP2's sharded parameters the loop cost more
    than forward and backward (docs/PERFORMANCE.md, "The optimizer step"). Fused and multi-tensor kernels cannot mix
    DTensors with plain tensors, which tensor parallelism without FSDP leaves (it shards only some); that mix keeps the
    per-tensor loop, the same update."""
    one_kind = len({isinstance(p, DTensor) for p in params}) == 1
    return torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.adam_betas), weight_decay=t.weight_decay,
                             fused=one_kind, foreach=False)


def ema_update(ema: dict[str, torch.Tensor], named_params: Iterable[tuple[str, torch.Tensor]], decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * param, one multi-tensor call per kind (DTensor or plain; the kernels take no
    mix): a per-tensor loop over sharded parameters costs more than the training step."""
    by_kind: dict[bool, list[tuple[str, torch.Tensor]]] = {}
    for name, p in named_params:
        by_kind.setdefault(isinstance(p, DTensor), []).append((name, p.detach()))
    with torch.no_grad():
        for pairs in by_kind.values():
            torch._foreach_lerp_([ema[n] for n, _ in pairs], [p for _, p in pairs], 1 - decay)


class Trainer:
    """Components built by role (parallel context, engine, checkpoints, data, loggers), then `run`: the loop of
    `train_step`s with logging, checkpoints and SIGTERM handling."""

    def __init__(self, cfg: Config, env: DistEnv):
        self.cfg, self.env = cfg, env
        t = cfg.train
        self.run_dir = Path(t.run_dir)
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
        if t.precision == "bf16" and env.device.type != "cuda":
            raise TrainingError("train.precision=bf16 uses CUDA autocast; on CPU use train.precision=fp32")

        self.par: ParallelContext = build_parallel(cfg.parallel, cfg.model, env.rank, env.world_size, env.device)
        self.faults = Faults.from_env()
        self.ckpt = self._checkpoints()
        resume_from = self.ckpt.find(t.resume)
        self.model = parallelize(build_model(cfg, initial_weights=resume_from is None).to(env.device), self.par, cfg,
                                 env.device)
        self.ema = {n: p.detach().clone() for n, p in self.model.named_parameters()} if t.ema_decay > 0 else None
        self.engine = build_engine(self.model, adamw([p for p in self.model.parameters() if p.requires_grad], t), cfg,
                                   self.ema)
        self.optimizer = self.engine.optimizer
        self.scheduler = self._schedule(step=0)
        self.null_text = load_null_text(cfg).to(env.device)
        if cfg.data.clean_stale_shm:  # leftovers of killed runs, once a job: later in it they would be our own datasets
            clean_stale_shared_memory()
        self.dataset, self.loader = build_dataloader(
            cfg, rank=env.rank, world_size=env.world_size, replication=self.par.layout.replication,
            cache_dir=self.run_dir / "data_cache",
        )
        self.validation = (Validation(cfg, self.par, self.dataset.stats, self.null_text, env.device)
                           if t.eval_every or t.sample_every else None)
        self.train_state = TrainState()
        self.exporter = (PrometheusExporter(t.metrics_port + env.local_rank, env.rank, t.metrics_addr,
                                            termination_grace=t.termination_grace) if t.metrics_port else None)
        if resume_from is not None:
            self._resume(resume_from)
        archive = superseded_dir(self.run_dir, self.step)
        if env.is_main:
            self._supersede_newer(archive)
        self.log = StepLoggers(t.loggers, self.run_dir, to_yaml(cfg), env.is_main, resume_step=self.step, archive=archive,
                               wandb_project=t.wandb_project, wandb_mode=t.wandb_mode)
        self.peak = peak_flops_per_device(t.peak_flops)
        self.stop_requested = False

    @property
    def step(self) -> int:
        return self.train_state.step

    # ------------------------------------------------------------------------------------------------ checkpoints
    def _checkpoints(self) -> CheckpointManager:
        from omegaconf import OmegaConf

        t = self.cfg.train
        identity = {
            "config": OmegaConf.to_container(OmegaConf.structured(self.cfg)),
            "world_size": self.env.world_size,
            "layout": dataclasses.asdict(self.par.layout),
            "has_ema": t.ema_decay > 0,
        }
        return CheckpointManager(self.run_dir, t.keep_last, self.env.rank, identity, async_save=t.async_checkpoint is not False,
                                 timeout_s=t.collective_timeout, faults=self.faults, on_saved=self._on_saved)

    def _resume(self, path: Path) -> None:
        """Engine shards, counters, loader and RNG from the checkpoint (echomotion.checkpoint); the schedule from here."""
        self.train_state, meta = self.ckpt.resume(path, self.engine.state, self.loader)
        self.scheduler = self._schedule(self.step, saved=meta["config"]["train"])
        if self.exporter:  # the checkpoint a preemption would fall back to
            self.exporter.restarts.inc(self.train_state.restarts)
            self.exporter.ckpt_last.set(meta["saved_at"])
        if self.env.is_main:
            print(f"[echomotion] resumed from {path} at step {self.step}", flush=True)

    def _schedule(self, step: int, saved: Optional[dict[str, Any]] = None) -> torch.optim.lr_scheduler.LambdaLR:
        """The learning-rate schedule continuing after `step`. The config owns the optimizer's hyper-parameters: after a
        resume, lr, weight decay and betas come from it, not from the optimizer state in the checkpoint, so lowering
        train.lr (the remedy for a NaN streak) takes effect; `saved` (the checkpoint's train config) is only reported."""
        t = self.cfg.train
        for group in self.optimizer.param_groups:
            group.update(initial_lr=t.lr, weight_decay=t.weight_decay, betas=tuple(t.adam_betas))
        changed = {k: (saved[k], getattr(t, k)) for k in ("lr", "weight_decay", "adam_betas")
                   if saved is not None and list(np.atleast_1d(saved[k])) != list(np.atleast_1d(getattr(t, k)))}
        if changed and self.env.is_main:
            print("[echomotion] continuing with " + ", ".join(f"train.{k}={new} (the checkpoint had {old})"
                                                             for k, (old, new) in changed.items()), flush=True)
        return torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s + 1, t), last_epoch=step - 1)

    def _supersede_newer(self, archive: Path) -> None:
        moved = self.ckpt.supersede_after(self.step, archive)
        if moved:
            print(f"[echomotion] this run continues from step {self.step}: moved the newer checkpoints "
                  f"{', '.join(p.name for p in moved)} to {archive}", flush=True)

    def save(self) -> None:
        """This step's checkpoint (collective); asynchronous saves finish in the background."""
        self.ckpt.save(self.train_state, self.engine.state, self.loader)

    def _on_saved(self, result: SaveResult) -> None:
        if self.exporter:
            self.exporter.observe_checkpoint(result.duration_s, blocked_s=result.blocked_s)
            self.exporter.ckpt_last.set(time.time())
        if self.env.is_main:
            print(f"[echomotion] checkpoint {result.path.name}: {result.duration_s:.2f} s, training blocked "
                  f"{result.blocked_s:.2f} s", flush=True)

    # --------------------------------------------------------------------------------------------------- training
    def _batches(self):
        empty_passes = 0
        while True:
            yielded = False
            for batch in self.loader:
                yielded = True
                yield batch
            # A run resumed from a checkpoint taken at the very end of an epoch first gets an empty pass; a fresh epoch
            # that yields nothing means there is no data.
            empty_passes = 0 if yielded else empty_passes + 1
            if empty_passes == 2:
                paths = [s.path for s in data_sources(self.cfg.data)]
                raise TrainingError(f"the data loader yielded nothing: check that the data sources {paths} hold samples")

    def _micro_step(self, batch: Batch, micro: int, last: bool) -> tuple[torch.Tensor, dict[str, float]]:
        """Forward and backward of one micro-batch; returns this rank's share of the global loss (see training_loss)."""
        t, dev = self.cfg.train, self.env.device
        tb = TrainingBatch(
            text=pad_text(batch.text.to(dev, torch.float32), self.cfg.text_len),  # collate pads to the batch's longest
            motion=batch.motion.to(dev),
            motion_mask=batch.motion_mask.to(dev),
            video=None if batch.video is None else batch.video.to(dev, torch.float32),
        )
        gens = [sample_generator(t.seed, self.step + 1, micro, cid) for cid in batch.clip_ids]
        self.engine.prepare_micro_batch(last)
        with self._forward_precision():
            loss, logs = training_loss(self.engine.module, tb, t.phase, self.cfg.diffusion, self.null_text, gens,
                                       self.par.sum_over_dp)
        if self.faults and self.faults.loss_is_nan(self.step + 1):
            loss = loss * float("nan")
        # FSDP and ZeRO average gradients over the dp x sp ranks; the shares must add up, so undo the data-parallel mean.
        self.engine.backward(loss * (self.par.layout.dp / t.grad_accum))
        return loss.detach(), logs

    @contextlib.contextmanager
    def _forward_precision(self) -> Iterator[None]:
        """bf16 autocast (train.precision) and FP8 (parallel.fp8) around a forward only, as Transformer Engine wants it."""
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cfg.train.precision == "bf16"), \
                fp8_autocast(self.cfg.parallel):
            yield

    def forward_backward(self, batches) -> dict[str, Any]:
        """Accumulate gradients over `train.grad_accum` micro-batches; returns the step's global loss and counters.

        `compute` is this rank's time up to the step's first collective of its own (the loss sum), data waits left out:
        a straggler arrives there late. (FSDP's and Ulysses' collectives inside the forward and backward already make the
        others wait for it part of the time, so this understates the lag; docs/operations.md.)"""
        t = self.cfg.train
        start, wait, shares, logs, samples, tokens = time.perf_counter(), 0.0, [], {}, 0, 0
        frames, real = 0, 0  # motion frames in the batches, and the real (unpadded) ones among them
        for micro in range(t.grad_accum):
            w0 = time.perf_counter()
            batch = next(batches)
            wait += time.perf_counter() - w0
            share, micro_logs = self._micro_step(batch, micro, micro == t.grad_accum - 1)
            shares.append(share)
            for k, v in micro_logs.items():
                logs.setdefault(k, []).append(v)
            samples += len(batch)
            tokens += self._tokens(batch)
            frames, real = frames + batch.motion_mask.numel(), real + int(batch.motion_mask.sum())
        if self.faults:
            self.faults.delay_compute(self.env.rank)
        if self.env.device.type == "cuda":  # queued kernels are part of this rank's compute
            torch.cuda.synchronize()
        compute = time.perf_counter() - start - wait
        loss = float(self.par.sum_over_dp(torch.stack(shares).sum()) / t.grad_accum)
        return {"loss": loss, "logs": logs, "wait": wait, "compute": compute, "samples": samples, "tokens": tokens,
                "batch": batch, "motion_pad_fraction": 1 - real / frames if frames else 0.0}

    def train_step(self, batches) -> dict[str, Any]:
        """Forward/backward over the micro-batches, one engine step (skipped for a NaN/Inf loss or gradient), EMA, the
        schedule; returns the step's record."""
        t = self.cfg.train
        t0 = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]  # what this step's update uses; the scheduler moves it at the end
        every = t.count_collectives_every
        counter = CommCounter(enabled=every > 0 and (self.step == 0 or (self.step + 1) % every == 0))
        with counter:
            acc = self.forward_backward(batches)
            self.ckpt.before_update()  # an async save's host copy is complete before the weights change
            grad_norm, applied = self.engine.step(acc["loss"])
        self.train_state.step += 1
        self._count_skips(applied)
        if applied and self.ema is not None:
            ema_update(self.ema, self.model.named_parameters(), t.ema_decay)
        self.scheduler.step()
        rec = self._record(acc, grad_norm, lr, time.perf_counter() - t0)
        if counter.enabled:  # this rank's collective inputs in forward, backward and clipping (parallel/comm.py)
            rec.update({f"comm/{kind}_bytes": n for kind, n in counter.bytes_by_kind.items()})
        return rec

    def _count_skips(self, applied: bool) -> None:
        state = self.train_state
        if applied:
            state.nan_streak = 0
            return
        state.skipped += 1
        state.nan_streak += 1
        if self.exporter:
            self.exporter.skipped.inc()
        if state.nan_streak >= self.cfg.train.max_nan_streak:
            raise TrainingError(
                f"{state.nan_streak} steps in a row had a NaN/Inf loss or gradient (last at step {state.step}); stopping. "
                "Lower train.lr, check the data, or resume from an earlier checkpoint with train.resume=<folder>"
            )

    def _record(self, acc: dict[str, Any], grad_norm: float, lr: float, step_time: float) -> dict[str, Any]:
        dp = self.par.layout.dp  # the TP x SP ranks of a group hold the same samples
        cuda = self.env.device.type == "cuda"
        rec: dict[str, Any] = {
            "step": self.step,
            "loss": acc["loss"],
            **self._across_ranks(acc["logs"], acc["compute"]),
            "grad_norm": grad_norm,
            "lr": lr,
            "samples": acc["samples"] * dp,  # the step's global counts (the exporter's counters)
            "tokens": acc["tokens"] * dp,
            "samples_per_s": acc["samples"] * dp / step_time,
            "tokens_per_s": acc["tokens"] * dp / step_time,
            "step_time": step_time,
            "data_wait": acc["wait"],
            "motion_pad_fraction": acc["motion_pad_fraction"],  # this rank's padded share of motion frames (compute spent)
            "compute_s": acc["compute"],
            "skipped_steps": self.train_state.skipped,
            "nan_streak": self.train_state.nan_streak,
            "memory_bytes": torch.cuda.max_memory_allocated() if cuda else None,
            "memory_reserved_bytes": torch.cuda.max_memory_reserved() if cuda else None,
            "memory_total_bytes": torch.cuda.mem_get_info()[1] if cuda else None,
        }
        rec["mfu"] = self._mfu(acc["batch"], rec["samples_per_s"])
        return rec

    def _tokens(self, batch: Batch) -> int:
        per = batch.motion.shape[1] * MOTION_TOKENS_PER_FRAME
        if batch.video is not None and self.cfg.train.phase == 2:
            p = self.cfg.model.patch_size
            per += math.prod(batch.video.shape[2:]) // (p[0] * p[1] * p[2])
        return per * len(batch)

    def _mfu(self, batch: Batch, samples_per_s: float) -> Optional[float]:
        if self.peak is None:
            return None
        p = self.cfg.model.patch_size
        video = math.prod(batch.video.shape[2:]) // (p[0] * p[1] * p[2]) if batch.video is not None and self.cfg.train.phase == 2 else 0
        flops = training_flops(self.cfg.model, video, batch.motion.shape[1] * MOTION_TOKENS_PER_FRAME, self.cfg.text_len)
        return flops * samples_per_s / (self.peak * self.env.world_size)

    def _across_ranks(self, logs: dict[str, list[float]], compute: float) -> dict[str, Any]:
        """The step's job-level numbers, in one gather over the ranks. Per-task / per-modality losses: the mean over every
        generated element of that kind, whichever micro-batches and ranks they fell on (each micro-batch mean weighted
        by its element count). Compute time: the slowest rank's, the median and which rank was slowest (the straggler)."""
        local = {k: (sum(m * n for m, n in zip(v, logs["count/" + k[5:]])), sum(logs["count/" + k[5:]]))
                 for k, v in logs.items() if k.startswith("loss/")}
        gathered: list[tuple[dict[str, tuple[float, float]], float]] = [(local, compute)]
        if self.env.world_size > 1:
            import torch.distributed as dist

            gathered = [({}, 0.0)] * self.env.world_size
            dist.all_gather_object(gathered, (local, compute))
        sums = {k: (sum(g[k][0] for g, _ in gathered if k in g), sum(g[k][1] for g, _ in gathered if k in g))
                for k in {k for g, _ in gathered for k in g}}
        out: dict[str, Any] = {k: total / count if count > 0 else float("nan") for k, (total, count) in sorted(sums.items())}
        times = [c for _, c in gathered]
        out.update({"compute_s/max": max(times), "compute_s/median": statistics.median(times),
                    "compute_s/slowest_rank": times.index(max(times))})
        return out

    def run(self) -> None:
        t, env = self.cfg.train, self.env
        signal.signal(signal.SIGTERM, self._on_sigterm)
        batches = self._batches()
        progress = ProgressReport(f"phase {t.phase}", t.steps, self.step, t.print_every) if env.is_main and t.progress else None
        while self.step < t.steps:
            rec = self.train_step(batches)
            evaluated = self.evaluate(rec)
            self.ckpt.poll()  # a background save that failed stops the run here, naming the folder and the cause
            if self.exporter:
                self.exporter.observe_step(rec, job_level=env.is_main)
            if self.step % t.log_every == 0 or self.step == t.steps or evaluated:
                self.log.write(rec)
            if progress is not None:
                progress.update(rec)
            stop = any_rank(self.stop_requested, env.world_size, env.device)
            if self.step % t.checkpoint_every == 0 or self.step == t.steps or stop:
                self.save()
            if stop:
                self.ckpt.wait()
                if env.is_main:
                    print(f"[echomotion] SIGTERM: saved step {self.step}, exiting", flush=True)
                break
        self.ckpt.wait()
        self.log.close()
        if progress is not None:
            progress.close()

    # ------------------------------------------------------------------------------------------------- validation
    def _due(self, every: int) -> bool:
        return every > 0 and (self.step % every == 0 or self.step == self.cfg.train.steps)

    def evaluate(self, rec: dict[str, Any]) -> bool:
        """At an eval or sample step (train.eval_every / train.sample_every, and the last step), the held-out losses and
        sample metrics join this step's record, which goes to every logger, and the eval-loss gauges. Returns whether
        anything was added."""
        t = self.cfg.train
        start, extra = time.perf_counter(), {}
        if self._due(t.eval_every):
            with self._forward_precision():
                extra |= self.validation.losses(self.engine.model)
        if self._due(t.sample_every):
            extra |= self._samples()
        if not extra:
            return False
        extra["eval/time_s"] = time.perf_counter() - start
        rec.update(extra)
        if self.exporter:
            self.exporter.observe_eval(rec)
        return True

    def _samples(self) -> dict[str, float]:
        """Every rank helps gather the whole weights (the EMA copy when train.ema_decay > 0), then rank 0 samples while
        the others wait at a barrier, so sampling time counts against train.collective_timeout. The RNG state is put
        back afterwards: a run with samples trains exactly like one without."""
        saved = rng_state()
        try:
            weights = full_tensors(self.ema) if self.ema is not None else self.engine.full_model_state()
            metrics: dict[str, float] = {}
            if self.env.is_main:
                images, metrics = self.validation.write_samples(weights, self.run_dir / "samples" / f"step-{self.step}")
                self.log.images(self.step, images)
        finally:
            set_rng_state(saved)
        if self.env.world_size > 1:
            import torch.distributed as dist

            dist.barrier()
        return metrics

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.stop_requested = True


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train EchoMotion (run under torchrun or the deepspeed launcher for >1 process)")
    p.add_argument("--config", required=True, help="YAML config, e.g. configs/tiny.yaml")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. train.steps=100 data.path=s3://bucket/humove")
    return p.parse_args(argv)


def refuse(message: str, rank: int) -> int:
    """A user error, not a bug: one message from rank 0, no traceback, exit code 2 (torchrun's failure report shows it)."""
    if rank == 0:
        print(f"echomotion: error: {message}", file=sys.stderr, flush=True)
    return 2


def start_up_problem(cfg: Config, env: DistEnv, lock: RunDirLock) -> Optional[str]:
    """What stops this rank before any model is built: a missing or unreadable input, a layout that does not fit the
    world size, or (rank 0, which takes the run-directory lock) another job in train.run_dir."""
    try:
        check_inputs(cfg, env.world_size)
        if env.is_main:
            lock.acquire()
    except (ConfigError, RunDirInUse) as e:
        return str(e)
    return None


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    exit_with_parent()
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:  # the same on every rank: no process group needed to agree
        return refuse(str(e), int(os.environ.get("RANK", 0)))
    env = init_distributed(cfg.train.collective_timeout, Path(cfg.train.run_dir) / "flight_recorder")
    lock = RunDirLock(cfg.train.run_dir)
    try:
        problem = first_problem(start_up_problem(cfg, env, lock), env)
        if problem is not None:
            shutdown(clean=False)
            return refuse(problem, env.rank)
        Trainer(cfg, env).run()
    except BaseException:
        # Other ranks may be waiting in a collective this rank will never join: leave without the barrier, so the
        # launcher sees the failure and tears the group down instead of every rank hanging.
        shutdown(clean=False)
        raise
    finally:
        lock.release()
    print(f"rank {env.rank} done", flush=True)
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
