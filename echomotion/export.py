"""Merged single-file weights for inference: one `.safetensors` with the model config in its metadata.

`export_checkpoint` turns a sharded DCP training checkpoint (any parallel layout: DCP stores global tensor metadata and
reshards on load) into that file; `load_exported` builds the model from it on one device.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .checkpoint import load_model_weights, read_meta
from .config import Config, config_from_dict, to_yaml
from .files import atomic_write
from .models import EchoMotionDiT

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
HOW_TO_EXPORT = "tools/export_checkpoint.py --checkpoint <run_dir>/checkpoints/step-N --out model.safetensors"


class ExportError(ValueError):
    """An export cannot be written or read as asked; the message names the file and the fix."""


def load_checkpoint(checkpoint: str | Path, use_ema: bool = False) -> tuple[EchoMotionDiT, Config, dict]:
    """A DCP checkpoint folder (any parallel layout: DCP stores global tensor metadata and reshards on load) -> the model
    on the CPU in fp32, its config and the checkpoint's meta."""
    ckpt = Path(checkpoint)
    meta = read_meta(ckpt)
    cfg = config_from_dict(meta["config"])
    if use_ema and not meta.get("has_ema"):
        raise ExportError(f"{ckpt} holds no EMA weights (train.ema_decay was 0); export without --ema")
    with torch.device("cpu"):
        model = EchoMotionDiT(cfg.model)
    load_model_weights(ckpt, model, use_ema=use_ema)
    return model, cfg, meta


def export_checkpoint(checkpoint: str | Path, out: str | Path, dtype: str = "fp32", use_ema: bool = False) -> Path:
    """DCP checkpoint folder -> one safetensors file (+ a readable `<stem>.yaml` copy of the config). Written atomically."""
    check_export_path(out)  # before the slow part
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    model, cfg, meta = load_checkpoint(checkpoint, use_ema)
    return save_exported(model, cfg, out, dtype, extra={"step": str(meta["step"]), "ema": str(use_ema)})


def check_export_path(out: str | Path) -> Path:
    """An export is `<stem>.safetensors`, with its config next to it as `<stem>.yaml`: any other name would put the
    YAML over the weights (model.yaml) or give two exports one YAML (m.v1 and m.v2 -> m.yaml)."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ExportError(f"{out}: an export is one .safetensors file (its config goes next to it as <stem>.yaml); "
                          "give it a name ending in .safetensors")
    return out


def save_exported(model: EchoMotionDiT, cfg: Config, out: str | Path, dtype: str = "fp32", extra: Optional[dict] = None) -> Path:
    """Weights (config in the metadata) to `out`, then the config as `<stem>.yaml`; each file renamed into place."""
    out = check_export_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(DTYPES[dtype]).contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {"format": "echomotion", "config": json.dumps(_plain(cfg)), **(extra or {})}
    atomic_write(out, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    atomic_write(out.with_suffix(".yaml"), lambda tmp: tmp.write_text(to_yaml(cfg)))
    return out


def load_exported(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> tuple[EchoMotionDiT, Config]:
    """Build the model from an exported file on one device."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; create it with {HOW_TO_EXPORT}")
    if path.is_dir():
        raise ExportError(f"{path} is a folder, not an exported .safetensors file; if it is a training checkpoint, export "
                          f"it first: tools/export_checkpoint.py --checkpoint {path} --out model.safetensors")
    try:
        fh = safe_open(str(path), framework="pt")
    except SafetensorError as e:
        raise ExportError(f"{path} is not a safetensors file ({e}); pass the .safetensors an export writes: "
                          f"{HOW_TO_EXPORT}") from e
    with fh:
        meta = fh.metadata() or {}
        if meta.get("format") != "echomotion":
            raise ExportError(f"{path} is not an EchoMotion export (no echomotion metadata); export it with {HOW_TO_EXPORT}")
        cfg = config_from_dict(json.loads(meta["config"]))
        state = {k: fh.get_tensor(k) for k in fh.keys()}
    model = EchoMotionDiT(cfg.model)
    model.load_state_dict(state)
    return model.to(device=device, dtype=dtype).eval(), cfg


def _plain(cfg: Config) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]
