"""Merged single-file weights for inference: one `.safetensors` with the model config in its metadata.

`export_checkpoint` turns a sharded DCP training checkpoint (any parallel layout: DCP stores global tensor metadata and
reshards on load) into that file; `load_exported` builds the model from it on one device.

An export is self-contained: beside the weights it carries the training dataset's small files that sampling reads
(`DATA_FILES`: dataset.json with the codec and text-encoder identity, motion_stats.json, null_text.pt and a PCA codec's
video_codec.pt), each byte for byte as a uint8 tensor under `__data__/<name>`, so one file is the whole thing and a
copy can never lose its sidecar. Exports written before that carry none (`read_data_assets` -> None); sampling then
needs the dataset folder (`--data`).
"""
from __future__ import annotations

import functools
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .checkpoint import load_model_weights, read_meta
from .config import Config, assets_root, config_from_dict, to_yaml
from .data.encoders import PCA_CODEC_FILE, PCACodec, VideoCodec, video_codec_from
from .files import atomic_write
from .models import EchoMotionDiT
from .motion import MotionStats

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
HOW_TO_EXPORT = "tools/export_checkpoint.py --checkpoint <run_dir>/checkpoints/step-N --out model.safetensors"
REQUIRED_DATA_FILES = ("dataset.json", "motion_stats.json", "null_text.pt")
DATA_FILES = (*REQUIRED_DATA_FILES, PCA_CODEC_FILE)  # the codec file only for a 'pca' dataset
DATA_PREFIX = "__data__/"  # tensor names no model parameter has


class ExportError(ValueError):
    """An export cannot be written or read as asked; the message names the file and the fix."""


@dataclass
class DataAssets:
    """What sampling takes from the training data, as the dataset's own file contents (`DATA_FILES`), read from its
    folder or from an export; `source` names where, for messages."""

    files: dict[str, bytes]
    source: str

    @classmethod
    def from_folder(cls, root: str | Path) -> "DataAssets":
        root = Path(root)
        missing = [n for n in REQUIRED_DATA_FILES if not (root / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{root} has no {', '.join(missing)}: pass the dataset folder the data tools wrote "
                                    "(the one holding dataset.json)")
        return cls({n: (root / n).read_bytes() for n in DATA_FILES if (root / n).is_file()}, str(root))

    @functools.cached_property
    def info(self) -> dict[str, Any]:
        """dataset.json: frame count, latent shape, fps, and the codec and text encoder the shards were written with."""
        return json.loads(self.files["dataset.json"])

    def stats(self) -> MotionStats:
        return MotionStats.from_json(self.files["motion_stats.json"].decode(), f"{self.source}: motion_stats.json")

    def null_text(self) -> torch.Tensor:
        """The empty prompt's true-length embedding [L, D]."""
        return torch.load(io.BytesIO(self.files["null_text.pt"]), weights_only=True)

    def codec(self, vae_path: Optional[str] = None, device: str | torch.device = "cpu") -> VideoCodec:
        description = self.info["video_codec"]
        if description.get("name") == "pca":
            if PCA_CODEC_FILE not in self.files:
                raise FileNotFoundError(f"{self.source} has no {PCA_CODEC_FILE}, which its 'pca' codec needs: copy it "
                                        "with the shards")
            return PCACodec.read(io.BytesIO(self.files[PCA_CODEC_FILE]))
        return video_codec_from(description, self.source, vae_path, device)


def dataset_folder(cfg: Config) -> Optional[Path]:
    """The local dataset folder a run trained on: its first paired source (`assets_root`) itself or, as the data tools
    lay it out (data.path = <dataset>/train), its parent; None when neither holds a dataset.json (remote or moved data)."""
    root = assets_root(cfg.data)
    if root is None or "://" in root:
        return None
    return next((p for p in (Path(root), Path(root).parent) if (p / "dataset.json").is_file()), None)


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


def export_checkpoint(checkpoint: str | Path, out: str | Path, dtype: str = "fp32", use_ema: bool = False,
                      data: str | Path | None = None) -> Path:
    """DCP checkpoint folder -> one safetensors file (+ a readable `<stem>.yaml` copy of the config). Written atomically.
    `data`: the dataset folder whose files go into the export; None = the run's own (`dataset_folder`), and when that
    is not on this machine the export carries no data (a warning says so) and sampling from it needs --data."""
    check_export_path(out)  # before the slow part
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    assets = DataAssets.from_folder(data) if data is not None else None  # a wrong --data fails before the slow part
    model, cfg, meta = load_checkpoint(checkpoint, use_ema)
    if assets is None and (found := dataset_folder(cfg)) is not None:
        assets = DataAssets.from_folder(found)
    if assets is None:
        warnings.warn(f"no dataset folder at {assets_root(cfg.data)} (the run's first paired data source): the export carries no motion stats, null text or "
                      "codec, so sampling from it needs --data; pass --data <dataset folder> to export_checkpoint to "
                      "make it self-contained", stacklevel=2)
    return save_exported(model, cfg, out, dtype, extra={"step": str(meta["step"]), "ema": str(use_ema)}, data=assets)


def check_export_path(out: str | Path) -> Path:
    """An export is `<stem>.safetensors`, with its config next to it as `<stem>.yaml`: any other name would put the
    YAML over the weights (model.yaml) or give two exports one YAML (m.v1 and m.v2 -> m.yaml)."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ExportError(f"{out}: an export is one .safetensors file (its config goes next to it as <stem>.yaml); "
                          "give it a name ending in .safetensors")
    return out


def save_exported(model: EchoMotionDiT, cfg: Config, out: str | Path, dtype: str = "fp32", extra: Optional[dict] = None,
                  data: Optional[DataAssets] = None) -> Path:
    """Weights (config in the metadata) and the dataset's files (`data`) to `out`, then the config as `<stem>.yaml`;
    each file renamed into place."""
    out = check_export_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(DTYPES[dtype]).contiguous().cpu() for k, v in model.state_dict().items()}
    for name, content in (data.files if data is not None else {}).items():
        tensors[DATA_PREFIX + name] = torch.frombuffer(bytearray(content), dtype=torch.uint8)
    metadata = {"format": "echomotion", "config": json.dumps(_plain(cfg)), **(extra or {})}
    atomic_write(out, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    atomic_write(out.with_suffix(".yaml"), lambda tmp: tmp.write_text(to_yaml(cfg)))
    return out


def load_exported(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> tuple[EchoMotionDiT, Config]:
    """Build the model from an exported file on one device."""
    with _open_export(path) as fh:
        cfg = config_from_dict(json.loads(fh.metadata()["config"]))
        state = {k: fh.get_tensor(k) for k in fh.keys() if not k.startswith(DATA_PREFIX)}
    model = EchoMotionDiT(cfg.model)
    model.load_state_dict(state)
    return model.to(device=device, dtype=dtype).eval(), cfg


def read_data_assets(path: str | Path) -> Optional[DataAssets]:
    """The dataset files an export carries; None for an export written before exports carried them."""
    with _open_export(path) as fh:
        files = {k[len(DATA_PREFIX):]: fh.get_tensor(k).numpy().tobytes() for k in fh.keys() if k.startswith(DATA_PREFIX)}
    return DataAssets(files, str(path)) if files else None


def _open_export(path: str | Path) -> Any:
    """The export opened with safe_open, after checking it is one; every refusal names the fix."""
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
    if (fh.metadata() or {}).get("format") != "echomotion":
        raise ExportError(f"{path} is not an EchoMotion export (no echomotion metadata); export it with {HOW_TO_EXPORT}")
    return fh


def _plain(cfg: Config) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]
