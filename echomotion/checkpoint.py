"""Sharded, crash-safe checkpoints with torch.distributed.checkpoint (DCP).

Layout: `run_dir/checkpoints/step-00000004/` holds the DCP shards of model + optimizer (+ EMA), one `extra-rank00000.pt` per
rank (RNG states, data-loader state, scheduler) and `meta.json` (step, world size, config). Every rank writes into
`step-N.partial/`; only after all ranks have finished does rank 0 write `meta.json` and rename the folder to `step-N`, so a
crash or kill during a save leaves a `.partial` folder that `latest()` never picks. DCP reshards on load, so a checkpoint
written under one parallel layout loads under another.
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

    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        extra: dict[str, Any],
        meta: dict[str, Any],
        ema: Optional[dict[str, torch.Tensor]] = None,
    ) -> Path:
        """Collective: every rank calls it. Returns the final folder."""
        final = self.root / f"step-{step:08d}"
        partial = final.with_name(final.name + ".partial")
        if self.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)  # debris of an earlier crash
            partial.mkdir(parents=True)
        _barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
        if ema is not None:
            state["ema"] = ema
        dcp.save(state, checkpoint_id=str(partial))
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
            os.replace(partial, final)
            _fsync_dir(self.root)
            for old in self.complete()[: -self.keep_last] if self.keep_last > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()
        return final

    def load(
        self,
        path: Path,
        model: nn.Module,
        optimizer: Optional[torch.optim.Optimizer],
        ema: Optional[dict[str, torch.Tensor]] = None,
    ) -> tuple[dict[str, Any], Optional[dict[str, Any]]]:
        """Load model/optimizer (resharding as needed); returns (meta, this rank's extra or None if the world changed)."""
        meta = json.loads((path / "meta.json").read_text())
        optims = [optimizer] if optimizer is not None else []
        model_sd, optim_sd = get_state_dict(model, optims)
        state: dict[str, Any] = {"model": model_sd}
        if optimizer is not None:
            state["optim"] = optim_sd
        if ema is not None:
            state["ema"] = ema
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, optims, model_state_dict=state["model"], optim_state_dict=state.get("optim", {}),
                       options=StateDictOptions(strict=True))
        extra_path = path / f"extra-rank{self.rank:05d}.pt"
        extra = torch.load(extra_path, weights_only=False) if extra_path.exists() else None
        return meta, extra


def load_model_weights(path: Path, model: nn.Module, use_ema: bool = False) -> dict[str, Any]:
    """Model weights only (or the EMA copy) from a DCP checkpoint into a plain single-device model; returns meta."""
    meta = json.loads((path / "meta.json").read_text())
    sd = {k: v for k, v in model.state_dict().items()}
    key = "ema" if use_ema else "model"
    dcp.load({key: sd}, checkpoint_id=str(path), no_dist=True)
    model.load_state_dict(sd)
    return meta
