"""The training engine: what the trainer's loop calls, whichever system shards the model.

Two engines share one interface, so the loop never asks which one it holds:
- `TorchEngine`: one process, DTensor tensor parallelism, Ulysses SP and FSDP2/HSDP, all applied by `parallelize`; the
  trainer's torch AdamW steps, `parallel.clip` clips, and torch.distributed.checkpoint (DCP) writes the shards.
- `DeepSpeedEngine` (`parallel.engine=deepspeed`, parallel/deepspeed_engine.py): ZeRO 1-3 owns backward, clipping, the
  step and its own checkpoint files.

`module` is what the forward runs through (DeepSpeed counts micro-batches in its engine's forward), `backward(loss)` and
`step(loss) -> (grad norm, applied)` one optimizer step, and `state` writes and reads the model and optimizer shards inside
a checkpoint folder (`echomotion.checkpoint` owns the folder, its protocol and the rest of the train state).
"""
from __future__ import annotations

import math
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from .clip import clip_grad_norm_

DEEPSPEED_TAG = "deepspeed"  # sub-folder of a checkpoint written by DeepSpeed's engine


class StateIO:
    """How an engine writes and reads its model + optimizer shards inside a checkpoint folder."""

    supports_async = False

    def write(self, folder: Path) -> None:
        raise NotImplementedError

    def write_async(self, folder: Path, group: Optional[dist.ProcessGroup]) -> tuple[Future, Future]:
        """Copy the shards to host memory and write them, both in the background (collectives on `group`); returns
        (copied, written). The model and optimizer must not change before `copied` is done."""
        raise NotImplementedError

    def read(self, folder: Path) -> None:
        raise NotImplementedError


class DCPState(StateIO):
    """torch.distributed.checkpoint of model, optimizer and EMA: plain, FSDP2 and DTensor-TP models alike, resharded on
    load. Async: every local shard is copied to host memory and written from there, both in background threads; the
    trainer lets the optimizer change the weights only once the copy is complete."""

    supports_async = True

    def __init__(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer], ema: Optional[dict[str, torch.Tensor]]):
        self.model, self.optims, self.ema = model, [optimizer] if optimizer is not None else [], ema
        self.stager: Optional[DefaultStager] = None

    def _stager(self) -> DefaultStager:
        """One stager for the run, copying in a thread of its own while the next forward and backward run (they read the
        weights, they do not change them). It keeps its host buffers between saves, so only the first async save pays for
        allocating (and page-faulting) a checkpoint's worth of host memory; the next save, which overwrites them, starts
        only after the previous one is written (docs/PERFORMANCE.md, "Checkpoint cost"). Pinned memory and non-blocking
        copies on CUDA."""
        if self.stager is None:
            cuda = torch.cuda.is_available()
            self.stager = DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False,
                                                       use_async_staging=True, use_non_blocking_copy=cuda))
        return self.stager

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

    def write_async(self, folder: Path, group: Optional[dist.ProcessGroup]) -> tuple[Future, Future]:
        response = dcp.async_save(self._state(), checkpoint_id=str(folder), process_group=group,
                                  async_stager=self._stager())
        return response.staging_completion, response.upload_completion

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


class Engine:
    """One optimizer step's parts, as the trainer's loop calls them."""

    module: nn.Module  # the forward runs through this
    model: nn.Module  # the parallelized model (its parameters)
    optimizer: torch.optim.Optimizer
    state: StateIO

    def prepare_micro_batch(self, last: bool) -> None:
        """Called before each micro-batch's forward; `last` is the one after which gradients are reduced."""

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self, loss: float) -> tuple[float, bool]:
        """Clip, step and clear the gradients; returns (global grad norm before clipping, whether the update was applied).
        A NaN/Inf loss or gradient norm skips the update on every rank alike."""
        raise NotImplementedError

    def full_model_state(self) -> Optional[dict[str, torch.Tensor]]:
        """The whole model's weights in host memory on rank 0 (None on the other ranks), under the plain model's names,
        e.g. to sample from a copy of the model. Collective: every rank must call it."""
        raise NotImplementedError


def full_tensors(tensors: dict[str, torch.Tensor]) -> Optional[dict[str, torch.Tensor]]:
    """Whole copies in host memory on rank 0 (None elsewhere) of tensors that may be DTensor shards (the trainer's EMA
    under FSDP2 / TP). Collective when any is a DTensor: every rank must call it."""
    whole = {k: (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu() for k, t in tensors.items()}
    return whole if not dist.is_initialized() or dist.get_rank() == 0 else None


class TorchEngine(Engine):
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float,
                 ema: Optional[dict[str, torch.Tensor]]):
        self.module = self.model = model
        self.optimizer = optimizer
        self.trainable = [p for group in optimizer.param_groups for p in group["params"]]
        self.max_norm = grad_clip if grad_clip > 0 else float("inf")
        self.state = DCPState(model, optimizer, ema)

    def prepare_micro_batch(self, last: bool) -> None:
        if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2: reduce-scatter only after the last micro-batch
            self.model.set_requires_gradient_sync(last)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, loss: float) -> tuple[float, bool]:
        grad_norm = clip_grad_norm_(self.trainable, self.max_norm)
        applied = math.isfinite(loss) and math.isfinite(grad_norm)  # the norm is global: every rank decides alike
        if applied:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, applied

    def full_model_state(self) -> Optional[dict[str, torch.Tensor]]:
        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if not dist.is_initialized() or dist.get_rank() == 0 else None
