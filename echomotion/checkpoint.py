"""Sharded, crash-safe checkpoints with torch.distributed.checkpoint (DCP).

Layout: `run_dir/checkpoints/step-00000004/` holds the DCP shards of model + optimizer (+ EMA) (or, under
`parallel.engine=deepspeed`, DeepSpeed's own files in a `deepspeed/` sub-folder), one `extra-rank00000.pt` per
rank (RNG states, data-loader state) and `meta.json` (step, world size, layout, config, skipped-step counters). Every rank writes into
`step-N.partial/`; only after all ranks have finished does rank 0 write `meta.json` and rename the folder to `step-N`, so a
crash or kill during a save leaves a `.partial` folder that `latest()` never picks. DCP reshards on load, so a checkpoint
written under one parallel layout loads under another.

A run that continues from an older step than its newest checkpoint (`train.resume=<folder>`, or `never` in a used
run_dir) moves the newer checkpoints to `run_dir/superseded/` (`supersede_after`): they belong to an abandoned timeline,
and left in place they would collide with new saves, be deleted by keep-last, or be picked by the next `resume=auto`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

# DCP says so every time it runs without a process group (a single process), which is a supported use here.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

STEP_DIR = re.compile(r"^step-(\d{8})$")
FAULT_ENV = "ECHOMOTION_FAULT_KILL_DURING_SAVE"  # test hook: "STEP" -> SIGKILL this process mid-save at that step


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


class CheckpointManager:
    def __init__(self, run_dir: str | Path, keep_last: int, rank: int):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.rank = rank

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.exists():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / "meta.json").exists()]
        return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))

    def latest(self) -> Optional[Path]:
        done = self.complete()
        return done[-1] if done else None

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

    def save(self, step: int, state: "StateIO", extra: dict[str, Any], meta: dict[str, Any]) -> Path:
        """Collective: every rank calls it. `state` writes the model and optimizer shards. Returns the final folder."""
        final = self.root / f"step-{step:08d}"
        partial = final.with_name(final.name + ".partial")
        if self.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)  # debris of an earlier crash
            partial.mkdir(parents=True)
        _barrier()
        state.write(partial)
        extra_path = partial / f"extra-rank{self.rank:05d}.pt"
        with open(extra_path, "wb") as fh:
            torch.save(extra, fh)
            fh.flush()
            os.fsync(fh.fileno())
        if os.environ.get(FAULT_ENV) == str(step):
            os.kill(os.getpid(), signal.SIGKILL)
        _barrier()
        if self.rank == 0:
            meta = {**meta, "step": step, "saved_at": time.time()}
            with open(partial / "meta.json", "w") as fh:
                json.dump(meta, fh, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
            _fsync_dir(partial)  # every rank's file entries are durable before the folder becomes visible as complete
            os.replace(partial, final)
            _fsync_dir(self.root)
            for old in self.complete()[: -self.keep_last] if self.keep_last > 0 else []:
                try:
                    shutil.rmtree(old)
                except OSError as e:  # a full or flaky disk: keep training, but say that space is not being freed
                    warnings.warn(f"keep_last could not delete {old}: {e}", stacklevel=2)
        _barrier()
        return final

    def load(self, path: Path, state: "StateIO") -> tuple[dict[str, Any], Optional[dict[str, Any]]]:
        """Load model/optimizer (resharding as needed); returns (meta, this rank's extra or None if there is none)."""
        meta = read_meta(path)
        state.read(path)
        extra_path = path / f"extra-rank{self.rank:05d}.pt"
        extra = torch.load(extra_path, weights_only=False) if extra_path.exists() else None
        return meta, extra


class StateIO:
    """How an engine writes and reads its model + optimizer shards inside a checkpoint folder."""

    def write(self, folder: Path) -> None:
        raise NotImplementedError

    def read(self, folder: Path) -> None:
        raise NotImplementedError


class DCPState(StateIO):
    """torch.distributed.checkpoint of model, optimizer and EMA: plain, FSDP2 and DTensor-TP models alike, resharded on load."""

    def __init__(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer], ema: Optional[dict[str, torch.Tensor]]):
        self.model, self.optims, self.ema = model, [optimizer] if optimizer is not None else [], ema

    def _state(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optims)
        state: dict[str, Any] = {"model": model_sd}
        if self.optims:
            state["optim"] = optim_sd
        if self.ema is not None:
            state["ema"] = self.ema
        return state

    def write(self, folder: Path) -> None:
        dcp.save(self._state(), checkpoint_id=str(folder))

    def read(self, folder: Path) -> None:
        if (folder / DEEPSPEED_TAG).is_dir():
            raise RuntimeError(
                f"{folder} was written by parallel.engine=deepspeed; resume it with that engine, or export it "
                "(tools/export_checkpoint.py) and start from the export with train.init_from"
            )
        state = self._state()
        dcp.load(state, checkpoint_id=str(folder))
        set_state_dict(self.model, self.optims, model_state_dict=state["model"], optim_state_dict=state.get("optim", {}),
                       options=StateDictOptions(strict=True))


DEEPSPEED_TAG = "deepspeed"  # sub-folder of a checkpoint written by DeepSpeed's engine (parallel/deepspeed_engine.py)


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
