"""Sharded, crash-safe checkpoints with torch.distributed.checkpoint (DCP), and the train state a run resumes with.

Layout: `run_dir/checkpoints/step-00000004/` holds the engine's shards of model + optimizer (+ EMA) (DCP's files, or under
`parallel.engine=deepspeed` DeepSpeed's own in a `deepspeed/` sub-folder), one `extra-rank00000.pt` per rank (RNG states,
data-loader state) and `meta.json` (the `TrainState` counters, world size, layout, config, loader state). Every rank writes
into `step-N.partial/`; only after all ranks have finished does rank 0 write `meta.json` and rename the folder to
`step-N`, so a crash or kill during a save leaves a `.partial` folder that `latest()` never picks. DCP reshards on load, so
a checkpoint written under one parallel layout loads under another.

Async saves (`train.async_checkpoint`): DCP copies the shards to host memory in a thread while the next forward and
backward run, and the optimizer step waits for the copy (`before_update`; training's blocked time is that wait plus the
set-up); then one background thread writes them, the extra files and, after a barrier on a gloo group of its own, the
meta and rename: the same protocol, off the training thread. At most one save is in flight: the next save, SIGTERM and
the end of training wait for it. A background failure is raised at the next step (`poll`), naming the folder and the
cause.

A run that continues from an older step than its newest checkpoint (`train.resume=<folder>`, or `never` in a used
run_dir) moves the newer checkpoints to `run_dir/superseded/` (`supersede_after`): they belong to an abandoned timeline,
and left in place they would collide with new saves, be deleted by keep-last, or be picked by the next `resume=auto`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import time
import warnings
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from parallel import DEEPSPEED_TAG, StateIO

from .faults import Faults

# DCP says so every time it runs without a process group (a single process), which is a supported use here.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or resumed; the message names the folder, the cause and what to do."""


def _barrier(group: Optional[dist.ProcessGroup] = None) -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier(group=group)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def _rank_and_world(group: Optional[dist.ProcessGroup]) -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def _all_gather(obj: Any, group: Optional[dist.ProcessGroup]) -> list[Any]:
    rank, world = _rank_and_world(group)
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj, group=group)
    return out


def _my_share(folder: Path, group: Optional[dist.ProcessGroup]) -> list[Path]:
    """This rank's part of the folder's files (every world-th, by sorted path), so reading them back splits over ranks."""
    rank, world = _rank_and_world(group)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "meta.json")
    return files[rank::world]


def file_table(folder: Path, group: Optional[dist.ProcessGroup] = None) -> dict[str, dict[str, int]]:
    """Collective: every file of a written checkpoint folder with its size and CRC-32, read back in parallel over the
    ranks (each reads 1/world of the bytes). meta.json records it; `verify` checks against it."""
    mine = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "crc32": _crc32(p)} for p in _my_share(folder, group)}
    return {k: v for part in _all_gather(mine, group) for k, v in sorted(part.items())}


def verify(folder: Path, group: Optional[dist.ProcessGroup] = None) -> list[str]:
    """Collective: what is wrong with a complete checkpoint's files against its meta.json (each rank reads its share;
    every rank gets the whole list). Empty when it verifies, or when it predates recorded checksums."""
    table = read_meta(folder).get("files")
    if table is None:
        return []
    rank, world = _rank_and_world(group)
    problems = []
    for rel in sorted(table)[rank::world]:
        path, want = folder / rel, table[rel]
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif path.stat().st_size != want["bytes"]:
            problems.append(f"{path} has {path.stat().st_size} bytes, {want['bytes']} were written")
        elif _crc32(path) != want["crc32"]:
            problems.append(f"{path} does not match the CRC-32 recorded when it was written (its bytes changed)")
    return sorted(p for part in _all_gather(problems, group) for p in part)


def read_meta(path: Path) -> dict[str, Any]:
    """A complete checkpoint's meta.json; a clear error for anything else."""
    meta = Path(path) / "meta.json"
    if not meta.is_file():
        raise FileNotFoundError(
            f"{path} is not a complete checkpoint (no meta.json): pass a step-N folder under <run_dir>/checkpoints "
            "(an unfinished save leaves a .partial folder, which cannot be loaded)"
        )
    return json.loads(meta.read_text())


def superseded_dir(run_dir: str | Path, step: int) -> Path:
    """Where a run that continues from `step` puts what it replaces (newer checkpoints, dropped metrics lines)."""
    return Path(run_dir) / "superseded" / f"from-step-{step:08d}-{time.strftime('%Y%m%dT%H%M%S')}"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class TrainState:
    """The counters a run continues with, beside the engine's shards; every checkpoint's meta.json holds them."""

    step: int = 0
    skipped: int = 0  # steps skipped for a NaN/Inf loss or gradient, over the whole run
    nan_streak: int = 0  # skipped steps in a row up to `step`
    restarts: int = 0  # times this run resumed from a checkpoint


@dataclass
class SaveResult:
    step: int
    path: Path
    duration_s: float  # from the save's start until the folder was marked complete
    blocked_s: float  # how long training waited for it (all of it for a synchronous save)


@dataclass
class _InFlight:
    step: int
    partial: Path
    started: float
    blocked_s: float
    copied: Optional[Future]  # the host copy of the shards is complete (None once waited for)
    future: Future  # the whole save is complete (folder renamed)


class CheckpointManager:
    """Finds, writes and resumes the run's checkpoints. `identity` (config, world size, layout, has_ema) goes into every
    meta.json; `async_save` writes in the background where the engine's state can; `on_saved` hears of each save once
    its folder is complete (on the training thread)."""

    def __init__(self, run_dir: str | Path, keep_last: int, rank: int, identity: Optional[dict[str, Any]] = None,
                 async_save: bool = False, timeout_s: float = 1800, faults: Optional[Faults] = None,
                 on_saved: Optional[Callable[[SaveResult], None]] = None):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last, self.rank, self.identity = keep_last, rank, identity or {}
        self.async_save, self.faults, self.on_saved = async_save, faults, on_saved
        self.timeout_s = timeout_s
        self.inflight: Optional[_InFlight] = None
        self.writer: Optional[ThreadPoolExecutor] = None  # the background thread and its gloo group, from the first async save
        self.group: Optional[dist.ProcessGroup] = None

    def _start_writer(self) -> None:
        """Collective (every rank's first async save): the writer thread, and a gloo group of its own so its barriers and
        DCP's planning never interleave with the training collectives."""
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        if dist.is_available() and dist.is_initialized():
            self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=self.timeout_s))

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.exists():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / "meta.json").exists()]
        return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))

    def latest(self) -> Optional[Path]:
        done = self.complete()
        return done[-1] if done else None

    def find(self, resume: str) -> Optional[Path]:
        """The checkpoint `train.resume` names: none for "never", the newest complete one (if any) for "auto", else that
        folder (config validation has checked it is complete)."""
        if resume == "never":
            return None
        if resume != "auto":
            problems = verify(Path(resume))
            if problems:
                raise CheckpointError(f"train.resume={resume} fails verification: {'; '.join(problems[:3])}. Pick "
                                      "another checkpoint folder, or train.resume=auto for the newest one that verifies")
            return Path(resume)
        while (latest := self.latest()) is not None:
            problems = verify(latest)
            if not problems:
                return latest
            self._set_aside(latest, problems)
        return None

    def _set_aside(self, folder: Path, problems: list[str]) -> None:
        """Collective: move a checkpoint that fails verification to run_dir/corrupt/ (kept for inspection) and say why."""
        if self.rank == 0:
            target = self.root.parent / "corrupt" / f"{folder.name}-{time.strftime('%Y%m%dT%H%M%S')}"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(folder, target)
            print(f"[echomotion] WARNING: checkpoint {folder} fails verification ({'; '.join(problems[:3])}); moved it "
                  f"to {target}; resuming from the newest one before it that verifies", flush=True)
        _barrier()

    def supersede_after(self, step: int, archive: Path) -> list[Path]:
        """Rank 0, at start-up: move complete checkpoints newer than `step` into `archive` (nothing is deleted) and remove
        `.partial` debris of interrupted saves (never loadable). Returns the moved folders' new paths."""
        if not self.root.exists():
            return []
        for debris in self.root.glob("step-*.partial"):
            shutil.rmtree(debris)
        moved = []
        for old in self.complete():
            if int(STEP_DIR.match(old.name).group(1)) > step:
                archive.mkdir(parents=True, exist_ok=True)
                moved.append(Path(shutil.move(old, archive / old.name)))
        if moved:
            _fsync_dir(self.root)
        return moved

    def save(self, train: TrainState, state: StateIO, loader: Any) -> None:
        """Collective: every rank calls it. Waits for a save still in flight, then writes `train.step`'s checkpoint, in the
        background when async and the engine can (`state.supports_async`)."""
        started = time.perf_counter()
        self.wait()
        final = self.root / f"step-{train.step:08d}"
        partial = final.with_name(final.name + ".partial")
        if self.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)  # debris of an earlier crash
            partial.mkdir(parents=True)
        _barrier()
        loader_state = loader.state_dict()
        extra = {"loader": loader_state, "rng": rng_state()}
        meta = {**self.identity, "loader": loader_state, **dataclasses.asdict(train)}
        if self.async_save and state.supports_async:  # DeepSpeed's state writes synchronously
            if self.writer is None:
                self._start_writer()
            copied, written = state.write_async(partial, self.group)
            future = self.writer.submit(self._finish, written, train.step, partial, extra, meta, self.group)
            self.inflight = _InFlight(train.step, partial, started, time.perf_counter() - started, copied, future)
            return
        try:
            state.write(partial)
            self._finish(None, train.step, partial, extra, meta, None)
        except Exception as e:
            raise self._save_failed(train.step, partial, e) from e
        elapsed = time.perf_counter() - started
        self._report(SaveResult(train.step, final, elapsed, elapsed))

    def _finish(self, written: Optional[Future], step: int, partial: Path, extra: dict[str, Any], meta: dict[str, Any],
                group: Optional[dist.ProcessGroup]) -> float:
        """The rest of the protocol once the shards are on their way: extra file, barrier, meta, rename, keep-last.
        Returns the time it finished (perf_counter)."""
        if self.faults:
            self.faults.while_writing(step)
        if written is not None:
            written.result()
        with open(partial / f"extra-rank{self.rank:05d}.pt", "wb") as fh:
            torch.save(extra, fh)
            fh.flush()
            os.fsync(fh.fileno())
        if self.faults:
            self.faults.after_shards(step)
        _barrier(group)
        files = file_table(partial, group)
        if self.rank == 0:
            self._mark_complete(partial, {**meta, "files": files, "saved_at": time.time()})
        _barrier(group)
        return time.perf_counter()

    def _mark_complete(self, partial: Path, meta: dict[str, Any]) -> None:
        with open(partial / "meta.json", "w") as fh:
            json.dump(meta, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(partial)  # every rank's file entries are durable before the folder becomes visible as complete
        os.replace(partial, partial.with_name(partial.name[: -len(".partial")]))
        _fsync_dir(self.root)
        for old in self.complete()[: -self.keep_last] if self.keep_last > 0 else []:
            try:
                shutil.rmtree(old)
            except OSError as e:  # a full or flaky disk: keep training, but say that space is not being freed
                warnings.warn(f"keep_last could not delete {old}: {e}", stacklevel=2)

    def before_update(self) -> None:
        """Before the optimizer changes the weights: wait until the save in flight holds its host copy (this wait counts
        as blocked time). Usually the copy finished during the forward and backward."""
        inflight = self.inflight
        if inflight is None or inflight.copied is None:
            return
        t0 = time.perf_counter()
        try:
            inflight.copied.result()
        except Exception:
            self.wait()  # raises the CheckpointError naming the folder and the cause
            raise
        inflight.blocked_s += time.perf_counter() - t0
        inflight.copied = None

    def poll(self) -> None:
        """Every step: report a background save that has finished; raise if it failed."""
        if self.inflight is not None and self.inflight.future.done():
            self.wait()

    def wait(self) -> None:
        """Block until the save in flight (if any) is complete; raise if it failed."""
        inflight, self.inflight = self.inflight, None
        if inflight is None:
            return
        try:
            finished = inflight.future.result()
        except Exception as e:
            raise self._save_failed(inflight.step, inflight.partial, e, "the background save") from e
        final = inflight.partial.with_name(inflight.partial.name[: -len(".partial")])
        self._report(SaveResult(inflight.step, final, finished - inflight.started, inflight.blocked_s))

    def _save_failed(self, step: int, partial: Path, error: Exception, what: str = "the save") -> CheckpointError:
        """The error a failed save stops the run with: the folder, the cause, the free space there and what the last
        complete checkpoint took (a full disk often shows up as an unrelated torch error: the sizes tell)."""
        latest = self.latest()
        free = shutil.disk_usage(self.root).free if self.root.exists() else 0
        size = sum(p.stat().st_size for p in latest.rglob("*") if p.is_file()) if latest else 0
        last = f"{latest} ({size / 1e9:.3g} GB)" if latest else "none yet"
        return CheckpointError(
            f"{what} of step {step} into {partial} failed: {type(error).__name__}: {error}. {free / 1e9:.3g} GB are free "
            f"on that filesystem; the newest complete checkpoint is {last} and stays intact (nothing was marked complete). "
            "Free space (or lower train.keep_last), fix permissions or the storage mount, and restart: the run resumes "
            "from that checkpoint"
        )

    def _report(self, result: SaveResult) -> None:
        if self.on_saved is not None:
            self.on_saved(result)

    def resume(self, path: Path, state: StateIO, loader: Any) -> tuple[TrainState, dict[str, Any]]:
        """Engine shards, loader and RNG from the checkpoint at `path`; returns the train state to continue with (its
        restart counted) and the checkpoint's meta."""
        meta = read_meta(path)
        if self.identity.get("has_ema") and not meta.get("has_ema"):
            raise CheckpointError(
                f"{path} holds no EMA weights (it was trained with train.ema_decay=0), so train.ema_decay>0 cannot resume "
                f"it: keep ema_decay=0 here, or start a new run_dir with train.init_from={path} (EMA then starts from "
                "those weights)"
            )
        state.read(path)
        extra_path = path / f"extra-rank{self.rank:05d}.pt"
        if extra_path.exists() and meta.get("layout") == self.identity.get("layout"):
            extra = torch.load(extra_path, weights_only=False)
            loader.load_state_dict(extra["loader"])
            set_rng_state(extra["rng"])
        else:  # written by a different layout: the loader state is global, the RNG states start afresh
            loader.load_state_dict(meta["loader"])
        fields = {f.name: meta.get(f.name, 0) for f in dataclasses.fields(TrainState)}
        return TrainState(**{**fields, "restarts": fields["restarts"] + 1}), meta


def load_model_weights(path: Path, model: nn.Module, use_ema: bool = False) -> dict[str, Any]:
    """Model weights only (or the EMA copy) from a DCP checkpoint into a plain single-device model; returns meta."""
    meta = read_meta(path)
    if (path / DEEPSPEED_TAG).is_dir():
        if use_ema:
            raise ValueError(f"{path} was written by DeepSpeed, which keeps no EMA copy here (train.ema_decay needs engine=fsdp)")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        model.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(str(path), tag=DEEPSPEED_TAG))
        return meta
    sd = {k: v for k, v in model.state_dict().items()}
    key = "ema" if use_ema else "model"
    dcp.load({key: sd}, checkpoint_id=str(path), no_dist=True)
    model.load_state_dict(sd)
    return meta
