"""FP8 training applied from outside: the experts' linears become Transformer Engine Linears (parallel.fp8=te) or torchao
Float8Linears (parallel.fp8=torchao).

Only the expert linears of every block run in FP8 (`self_attn.q/k/v/o`, `cross_attn.q/k/v/o`, `ffn.0`, `ffn.2` of the video
expert and of each motion expert `blocks.N.motion.*`): they hold nearly all of the FLOPs. Modulation, the time/text/patch
embeddings, the motion MLPs, the norms and the output heads stay in higher precision, as Wan keeps them in fp32.

The swapped modules keep their paths and their parameters keep the names `weight` and `bias`, so parameter names (and
the checkpoint's parameter keys) do not change. TE adds one `<module>._extra_state` entry per swapped module to
`state_dict()` (its FP8 scaling state): a checkpoint written without FP8 lacks those keys, so loading across the two needs
them ignored (a non-strict load of `_extra_state` only).

TE's FP8 GEMMs need the rows of the input (batch x tokens) to be divisible by 8. A motion stream has frames x 51 tokens
(81 frames: 4,131), and a sequence-parallel rank holds an arbitrary slice, so the swapped linears zero-pad their input rows
to a multiple of 16 when needed and drop the padded rows of the output (zeros add nothing to the weight gradient).

torchao (`pip install 'echomotion[fp8]'`, pure Python for this use) is the second backend: dynamic per-tensor
("current", torchao's tensorwise recipe) or per-row ("rowwise") scaling, no amax history and no autocast context, so it
also composes with activation checkpointing. Its `pad_inner_dim` pads the token dimension where it is a matmul's inner
dimension (the weight gradient), the same need TE's row padding meets. Parameter names and state_dict keys do not change.
torchao's float8 matmul also runs on CPU (emulated), which the tests use; speed only means something on an FP8 GPU.

Both backends are imported lazily; nothing here imports either unless asked for.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from types import ModuleType
from typing import Any, ContextManager, Optional

import torch
import torch.nn.functional as F
from torch import nn

from echomotion.config import ParallelConfig, fp8_recipe
from echomotion.models.echomotion import DualBlock

EXPERT_LINEARS = (
    "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
    "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o",
    "ffn.0", "ffn.2",
)
ROW_MULTIPLE = 16
FIX = "pip install 'echomotion[gpu]' on a CUDA machine, or set parallel.fp8=none"
TORCHAO_RECIPES = {"current": "tensorwise", "rowwise": "rowwise"}  # parallel.fp8_recipe -> torchao's recipe name


def check_fp8_available(p: ParallelConfig, device: torch.device) -> None:
    """Stop at start-up, naming what is missing, when the configured FP8 backend cannot run on this process's device."""
    if p.fp8 == "torchao":
        _check_torchao(device)
    if p.fp8 != "te":
        return
    missing = []
    if device.type != "cuda" or not torch.cuda.is_available():
        missing.append(f"a CUDA GPU (this process runs on {device}{'' if torch.cuda.is_available() else ' and sees no CUDA device'})")
    try:
        te = _import_te()
    except Exception as e:  # ImportError, or OSError when CUDA libraries are absent
        missing.append(f"Transformer Engine (`import transformer_engine.pytorch` failed: {e})")
        te = None
    if missing:
        raise RuntimeError(f"parallel.fp8=te needs {' and '.join(missing)}. Fix: {FIX}.")
    ok, reason = _fp8_support(te)
    if not ok:
        raise RuntimeError(f"parallel.fp8=te: this GPU cannot run FP8 ({reason}; FP8 needs compute capability 8.9 or newer, "
                           "e.g. H100/L40S). Fix: set parallel.fp8=none (bf16).")


def te_linear_paths(model: nn.Module) -> list[str]:
    """Module paths of the expert linears `convert_to_te` swaps, in block order (video expert, then motion expert)."""
    paths = []
    for i, block in enumerate(model.blocks):
        experts = ["", "motion."] if isinstance(block, DualBlock) else [""]
        paths += [f"blocks.{i}.{expert}{name}" for expert in experts for name in EXPERT_LINEARS]
    return paths


def convert_to_te(model: nn.Module, recipe: str) -> list[str]:
    """Swap the expert linears for TE Linears with the same weights, dtype, device and `requires_grad`; returns their paths.

    `recipe` is built once here, so a TE without it (Float8CurrentScaling needs TE >= 2.2) fails at start-up."""
    te = _import_te()
    build_recipe(recipe)
    linear_cls = _te_linear_class(te)
    paths = te_linear_paths(model)
    for path in paths:
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        old = getattr(parent, name)
        new = linear_cls(
            old.in_features, old.out_features, bias=old.bias is not None, params_dtype=old.weight.dtype, device=old.weight.device
        )
        with torch.no_grad():
            new.weight.copy_(old.weight)
            if old.bias is not None:
                new.bias.copy_(old.bias)
        new.weight.requires_grad_(old.weight.requires_grad)
        if old.bias is not None:
            new.bias.requires_grad_(old.bias.requires_grad)
        setattr(parent, name, new)
    return paths


def convert_to_fp8(model: nn.Module, p: ParallelConfig) -> list[str]:
    """Swap the expert linears for the configured backend's FP8 linears; returns their paths."""
    convert = convert_to_te if p.fp8 == "te" else convert_to_torchao
    return convert(model, fp8_recipe(p))


def convert_to_torchao(model: nn.Module, recipe: str) -> list[str]:
    """Swap the expert linears for torchao Float8Linears (same weights and names); returns their paths."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    if recipe not in TORCHAO_RECIPES:
        raise ValueError(f"parallel.fp8_recipe={recipe!r} with parallel.fp8=torchao: choose one of {sorted(TORCHAO_RECIPES)}")
    config = dataclasses.replace(Float8LinearConfig.from_recipe_name(TORCHAO_RECIPES[recipe]), pad_inner_dim=True)
    paths = te_linear_paths(model)
    wanted = set(paths)
    convert_to_float8_training(model, config=config, module_filter_fn=lambda _, fqn: fqn in wanted)
    return paths


def _check_torchao(device: torch.device) -> None:
    try:
        import torchao.float8  # noqa: F401
    except Exception as e:
        raise RuntimeError(f"parallel.fp8=torchao needs torchao (`import torchao.float8` failed: {e}). "
                           "Fix: pip install 'echomotion[fp8]', or set parallel.fp8=none.") from None
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        raise RuntimeError(f"parallel.fp8=torchao: {torch.cuda.get_device_name(device)} has no FP8 matmul (compute "
                           "capability 8.9 or newer, e.g. H100/L40S). Fix: set parallel.fp8=none (bf16).")


def build_recipe(name: str) -> Any:
    """TE's recipe for parallel.fp8_recipe: "delayed" (amax history of past steps) or "current" (per-tensor amax of this
    step). HYBRID: E4M3 forward, E5M2 gradients."""
    from transformer_engine.common.recipe import DelayedScaling, Float8CurrentScaling, Format

    if name == "delayed":
        return DelayedScaling(fp8_format=Format.HYBRID)
    if name == "current":
        return Float8CurrentScaling(fp8_format=Format.HYBRID)
    raise ValueError(f"parallel.fp8_recipe={name!r}: choose 'delayed' or 'current'")


def fp8_autocast(p: ParallelConfig, group: Optional[Any] = None) -> ContextManager:
    """The context a forward runs in: TE's FP8 autocast with the configured recipe when parallel.fp8=te, else nothing.

    `group`: the process group over which delayed scaling reduces amaxes (the data-parallel group keeps every rank on the
    same scales); None = TE's default."""
    if p.fp8 != "te":  # torchao scales inside its Float8Linear: no context
        return contextlib.nullcontext()
    te = _import_te()
    recipe = build_recipe(fp8_recipe(p))
    if hasattr(te, "autocast"):  # TE >= 2.17 renamed fp8_autocast
        return te.autocast(enabled=True, recipe=recipe, amax_reduction_group=group)
    return te.fp8_autocast(enabled=True, fp8_recipe=recipe, fp8_group=group)


def _import_te() -> ModuleType:
    import transformer_engine.pytorch as te

    return te


def _fp8_support(te: ModuleType) -> tuple[bool, str]:
    if hasattr(te, "is_fp8_available"):
        ok = te.is_fp8_available(return_reason=True)
    else:  # TE < 2.5
        from transformer_engine.pytorch.fp8 import check_fp8_support

        ok = check_fp8_support()
    return ok if isinstance(ok, tuple) else (bool(ok), "unsupported device")


@functools.cache
def _te_linear_class(te: ModuleType) -> type:
    """te.Linear that zero-pads its input rows to a multiple of ROW_MULTIPLE when they are not one (see module docstring)."""

    class TELinear(te.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            rows = x.shape[:-1].numel()
            pad = -rows % ROW_MULTIPLE
            if pad == 0:
                return super().forward(x)
            out = super().forward(F.pad(x.reshape(rows, x.shape[-1]), (0, 0, 0, pad)))
            return out[:rows].view(*x.shape[:-1], out.shape[-1])

    return TELinear
