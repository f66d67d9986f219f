"""DeepSpeed ZeRO (`parallel.engine=deepspeed`) in place of FSDP2, inside the same trainer.

The DeepSpeed config is generated from ours (micro-batch, accumulation, clipping, ZeRO stage, bf16, `parallel.cpu_offload`
as ZeRO-Offload); the JSON named by `parallel.deepspeed_config` is merged over it key by key, so anything DeepSpeed offers
can still be set, except the keys the trainer's config owns (`TRAINER_KEYS`): there "auto" (or the trainer's own value)
means the trainer's value, and another value is refused naming the trainer's key, since the trainer's loss scaling, data
loader and logs follow its config, not DeepSpeed's. DeepSpeed steps the trainer's own torch AdamW, whose learning rate the trainer's LambdaLR sets, and
skips a step whose global gradient norm is not finite (the trainer counts it, as under FSDP). Ulysses SP works
unchanged: `parallelize` installs the same token-sharding seam, and ZeRO, like FSDP2, averages gradients over all its
data-parallel ranks (here dp x sp), so the trainer's loss scale by the data-parallel degree is the same. EMA is refused
at config load (ZeRO-3 partitions the parameters it would average, and DeepSpeed's checkpoint would not hold it).

ZeRO-3 gathers a module's parameters when that module's forward runs. A dual block calls its motion expert's halves
(`pre_attention` / `post_attention`) from its own forward, so the expert's direct parameter (`modulation`) is registered as
used by the dual block too; its submodules (linears, norms) are called through their forward and need nothing.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from echomotion.config import Config, ConfigError
from echomotion.models.echomotion import DualBlock, EchoMotionDiT

from .engine import DEEPSPEED_TAG, Engine, StateIO


# DeepSpeed key path -> the trainer's key that sets it
TRAINER_KEYS: dict[tuple[str, ...], str] = {
    ("train_micro_batch_size_per_gpu",): "data.batch_size",
    ("gradient_accumulation_steps",): "train.grad_accum",
    ("gradient_clipping",): "train.grad_clip",
    ("zero_optimization", "stage"): "parallel.zero_stage",
    ("bf16", "enabled"): "train.precision",
}


def deepspeed_config(cfg: Config) -> dict[str, Any]:
    t, p = cfg.train, cfg.parallel
    generated: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        # the trainer owns accumulation: one backward per micro-batch (the loss already divided by train.grad_accum),
        # one engine.step() per optimizer step, which is then the boundary
        "managed_gradient_accumulation": False,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": p.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "steps_per_print": 2**31 - 1,  # the trainer logs
        "wall_clock_breakdown": False,
        # DeepSpeed gets the trainer's torch AdamW; with optimizer offload it then steps on the host, as under FSDP2's
        # cpu_offload (DeepSpeed would otherwise refuse any optimizer but its own, JIT-built, DeepSpeedCPUAdam)
        "zero_force_ds_cpu_optimizer": False,
    }
    if p.cpu_offload:  # fp32 master weights, gradients and Adam state in host memory (+ the parameters under ZeRO-3)
        host = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        generated["zero_optimization"]["offload_optimizer"] = dict(host)
        if p.zero_stage == 3:
            generated["zero_optimization"]["offload_param"] = dict(host)
    if p.deepspeed_config is None:
        return generated
    try:
        user = json.loads(Path(p.deepspeed_config).read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"parallel.deepspeed_config={p.deepspeed_config} is not valid JSON: {e}") from e
    if not isinstance(user, dict):
        raise ConfigError(f"parallel.deepspeed_config={p.deepspeed_config} must hold a JSON object (DeepSpeed config keys)")
    owned = sorted({"optimizer", "scheduler"} & user.keys())
    if owned:  # DeepSpeed would ignore them silently: it is handed the trainer's AdamW and learning-rate schedule
        raise ConfigError(
            f"parallel.deepspeed_config={p.deepspeed_config} sets {owned}, but the trainer owns the optimizer and schedule "
            "under either engine: remove them and use train.lr, train.weight_decay, train.warmup_steps, train.schedule"
        )
    return merge(generated, _trainer_keys_resolved(user, generated, p.deepspeed_config))


def _trainer_keys_resolved(user: dict[str, Any], generated: dict[str, Any], source: str) -> dict[str, Any]:
    """`user` with each of `TRAINER_KEYS` that is "auto" (or already equal) set to the trainer's value; any other value
    there is refused, naming the trainer's key to set instead."""
    conflicts = []
    for path, ours in TRAINER_KEYS.items():
        parent = user
        for key in path[:-1]:
            parent = parent.get(key) if isinstance(parent.get(key), dict) else {}
        if path[-1] not in parent:
            continue
        value, wanted = parent[path[-1]], _get(generated, path)
        if value == "auto" or value == wanted:
            parent[path[-1]] = wanted
        else:
            conflicts.append(f"{'.'.join(path)}={json.dumps(value)} (the trainer's {ours} makes it {json.dumps(wanted)}: "
                             f"set {ours} instead)")
    if conflicts:
        raise ConfigError(f"parallel.deepspeed_config={source} sets keys the trainer's config owns: " + "; ".join(conflicts)
                          + '; or write "auto" for the trainer\'s value')
    return user


def _get(d: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        d = d[key]
    return d


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` wins, nested dicts merged key by key."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def register_external_parameters(model: EchoMotionDiT) -> None:
    import deepspeed

    for block in model.blocks:
        if isinstance(block, DualBlock):
            deepspeed.zero.register_external_parameter(block, block.motion.modulation)


def _backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def skip_shm_comm_build() -> None:
    """Start DeepSpeed's comm backend without its shared-memory all-reduce op.

    On a CPU accelerator DeepSpeed JIT-compiles `deepspeed_shm_comm` (a C++ op, ~20 s with 2 cores, once per machine and
    cached in TORCH_EXTENSIONS_DIR) when its comm backend starts. Only its inference all-reduce uses the op; training
    collectives go through torch.distributed (gloo here). Marking the op incompatible in DeepSpeed's op table, which it
    consults before building, skips the build. CUDA accelerators have no such op, and a backend that already started
    is left alone."""
    import deepspeed.comm.comm as ds_comm
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu" and ds_comm.cdb is None:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def initialize(model: EchoMotionDiT, optimizer: torch.optim.Optimizer, cfg: Config) -> Any:
    """The DeepSpeed engine around an already-parallelized (TP-free) model and our AdamW, on the running process group."""
    import deepspeed

    if cfg.parallel.zero_stage == 3:
        register_external_parameters(model)
    skip_shm_comm_build()
    if not dist.is_initialized():  # one process, no launcher: DeepSpeed still wants a process group and a local rank
        dist.init_process_group(_backend(), store=dist.HashStore(), rank=0, world_size=1)
        os.environ.setdefault("LOCAL_RANK", "0")
    deepspeed.init_distributed(dist_backend=_backend(), auto_mpi_discovery=False)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg),
                                           dist_init_required=False)
    return engine


class DeepSpeedState(StateIO):
    """DeepSpeed's own checkpoint files in `<folder>/deepspeed/`, resumable with the same engine and exportable with
    DeepSpeed's zero_to_fp32 (echomotion.checkpoint.load_model_weights). Written synchronously: DeepSpeed's background
    writer (its decoupled checkpoint engine, a spawned writer process per node) is not wired in (docs/operations.md)."""

    def __init__(self, engine: Any):
        self.engine = engine

    def write(self, folder: Path) -> None:
        self.engine.save_checkpoint(str(folder), tag=DEEPSPEED_TAG, save_latest=False)

    def read(self, folder: Path) -> None:
        if not (folder / DEEPSPEED_TAG).is_dir():
            raise RuntimeError(
                f"{folder} was written by parallel.engine=fsdp (DCP); resume it with that engine, or export it "
                "(tools/export_checkpoint.py) and start from the export with train.init_from"
            )
        path, _ = self.engine.load_checkpoint(str(folder), tag=DEEPSPEED_TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load {folder / DEEPSPEED_TAG}")


class DeepSpeedEngine(Engine):
    """DeepSpeed's engine owns backward, clipping, the step and the checkpoint files."""

    def __init__(self, model: EchoMotionDiT, optimizer: torch.optim.Optimizer, cfg: Config):
        self.ds = initialize(model, optimizer, cfg)
        self.module, self.model, self.optimizer = self.ds, model, optimizer
        self.state = DeepSpeedState(self.ds)

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss, scale_wrt_gas=False)  # the trainer already divided the loss by train.grad_accum

    def step(self, loss: float) -> tuple[float, bool]:
        """Its ZeRO optimizers skip the update on a NaN/Inf global gradient norm (which a NaN/Inf loss gives) and drop the
        accumulated gradients, as for an fp16 overflow: the trainer then counts a skipped step, as under FSDP. Every rank
        steps, so the engine's collectives stay matched, and the decision rests on the all-reduced norm."""
        self.ds.step()
        applied = self.ds.was_step_applied()
        if applied and not math.isfinite(loss):
            raise RuntimeError(
                "a step had a NaN/Inf loss but DeepSpeed applied the update (its gradient norm was finite or not computed: "
                "check zero_optimization.compute_grad_norm / bf16.check_grad_overflow in parallel.deepspeed_config); "
                "resume from the last checkpoint (train.resume=auto)"
            )
        norm = self.ds.get_global_grad_norm()
        return (float("nan") if norm is None else float(norm)), applied

    def full_model_state(self) -> Optional[dict[str, torch.Tensor]]:
        """ZeRO-3 gathers the partitioned parameters layer by layer onto rank 0 (in the training dtype); ZeRO-1/2 keep
        whole parameters on every rank."""
        if self.ds.zero_optimization_partition_weights():
            return self.ds._zero3_consolidated_16bit_state_dict()
        if dist.get_rank() != 0:
            return None
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}


def full_gradient(param: nn.Parameter) -> Optional[torch.Tensor]:
    """The whole gradient of a ZeRO-3-partitioned parameter between backward and engine.step() (collective: every rank
    calls it in the same order). ZeRO-1/2 finish their reduction inside engine.step(), so they have none to give then."""
    from deepspeed.utils import safe_get_full_grad

    return safe_get_full_grad(param)
