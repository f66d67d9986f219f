"""Merged single-file weights for inference: one `.safetensors` with the model config in its metadata.

`export_checkpoint` turns a sharded DCP training checkpoint (any parallel layout: DCP stores global tensor metadata and
reshards on load) into that file; `load_exported` builds the model from it on one device.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .checkpoint import load_model_weights, read_meta
from .config import Config, config_from_dict, to_yaml
from .models import EchoMotionDiT

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def export_checkpoint(checkpoint: str | Path, out: str | Path, dtype: str = "fp32", use_ema: bool = False) -> Path:
    """DCP checkpoint folder -> one safetensors file (+ a readable `<out>.yaml` copy of the config). Written atomically."""
    ckpt = Path(checkpoint)
    meta = read_meta(ckpt)
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    cfg = config_from_dict(meta["config"])
    if use_ema and not meta.get("has_ema"):
        raise ValueError(f"{ckpt} holds no EMA weights (train.ema_decay was 0); export without --ema")
    with torch.device("cpu"):
        model = EchoMotionDiT(cfg.model)
    load_model_weights(ckpt, model, use_ema=use_ema)
    return save_exported(model, cfg, out, dtype, extra={"step": str(meta["step"]), "ema": str(use_ema)})


def save_exported(model: EchoMotionDiT, cfg: Config, out: str | Path, dtype: str = "fp32", extra: Optional[dict] = None) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(DTYPES[dtype]).contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {"format": "echomotion", "config": json.dumps(_plain(cfg)), **(extra or {})}
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, out)
    out.with_suffix(".yaml").write_text(to_yaml(cfg))
    return out


def load_exported(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> tuple[EchoMotionDiT, Config]:
    """Build the model from an exported file on one device."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; create it with tools/export_checkpoint.py")
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
        if meta.get("format") != "echomotion":
            raise ValueError(f"{path} is not an EchoMotion export (no echomotion metadata); export it with tools/export_checkpoint.py")
        cfg = config_from_dict(json.loads(meta["config"]))
        state = {k: fh.get_tensor(k) for k in fh.keys()}
    model = EchoMotionDiT(cfg.model)
    model.load_state_dict(state)
    return model.to(device=device, dtype=dtype).eval(), cfg


def _plain(cfg: Config) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]
