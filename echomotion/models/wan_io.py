"""Pretrained Wan weights in and out of EchoMotionDiT's video path.

Two naming schemes exist for the same tensors: Wan's ORIGINAL names (what `Wan-AI/Wan2.1-T2V-1.3B` and
`Wan-AI/Wan2.2-TI2V-5B` ship, and what our model uses) and diffusers' `WanTransformer3DModel` names (the `*-Diffusers`
repositories). The maps below are exact, name-for-name, so an unknown name is reported rather than half-renamed.
Only text/TI2V checkpoints are supported: image-conditioned ones (CLIP `img_emb`, `k_img`/`v_img`) are refused by name.

Accepted inputs (`open_checkpoint`): one `.safetensors` / `.pth` / `.pt` file; a shard index `*.safetensors.index.json` /
`*.pth.index.json` (`weight_map`); a directory in Wan's layout (`diffusion_pytorch_model*.safetensors` [+ index] and a
`config.json` with `_class_name: WanModel`) or in diffusers' (a pipeline folder with `transformer/`, or a folder whose
`config.json` has `_class_name: WanTransformer3DModel`). Which naming a checkpoint uses is read from its keys.
"""
from __future__ import annotations

import json
import math
import re
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm import tqdm

from ..config import Config, ConfigError, ModelConfig, validate
from ..files import atomic_write
from .echomotion import EchoMotionDiT, is_motion_parameter

DIFFUSERS_CLASS = "WanTransformer3DModel"
ORIGINAL_CLASS = "WanModel"
WAN_HEAD_DIM = 128  # every released Wan model (1.3B, 5B, 14B) uses 128-wide heads
WAN_TEXT_LEN = 512  # Wan pads T5 embeddings to 512 tokens
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"
METADATA_CONFIG_KEY = "wan_config"  # safetensors header entry holding Wan's config.json fields (written by save_wan)

# --------------------------------------------------------------------------------------------------------- key maps
# (original module, diffusers module) for modules outside the blocks.
TOP_LEVEL_MODULES: tuple[tuple[str, str], ...] = (
    ("patch_embedding", "patch_embedding"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("head.head", "proj_out"),
)
# (original module, diffusers module) inside `blocks.{i}.`.
BLOCK_MODULES: tuple[tuple[str, str], ...] = (
    ("self_attn.q", "attn1.to_q"),
    ("self_attn.k", "attn1.to_k"),
    ("self_attn.v", "attn1.to_v"),
    ("self_attn.o", "attn1.to_out.0"),
    ("self_attn.norm_q", "attn1.norm_q"),
    ("self_attn.norm_k", "attn1.norm_k"),
    ("cross_attn.q", "attn2.to_q"),
    ("cross_attn.k", "attn2.to_k"),
    ("cross_attn.v", "attn2.to_v"),
    ("cross_attn.o", "attn2.to_out.0"),
    ("cross_attn.norm_q", "attn2.norm_q"),
    ("cross_attn.norm_k", "attn2.norm_k"),
    # The norm swap: Wan's affine cross-attention norm is `norm3`, diffusers calls it `norm2`. The other pair (Wan's pre-FFN
    # `norm2`, diffusers' `norm3`) has no parameters, so it never appears in a state dict.
    ("norm3", "norm2"),
    ("ffn.0", "ffn.net.0.proj"),
    ("ffn.2", "ffn.net.2"),
)
# (original, diffusers) whole parameter names: the modulation tables are bare parameters, not module.weight.
HEAD_MODULATION = ("head.modulation", "scale_shift_table")
BLOCK_MODULATION = ("modulation", "scale_shift_table")

# Image-conditioned (i2v / flf2v) parameters, in either naming: present => not a checkpoint this model can take.
IMAGE_KEY_PATTERN = re.compile(
    r"(^img_emb\.|\.k_img\.|\.v_img\.|\.norm_k_img\.|^condition_embedder\.image_embedder\.|\.add_k_proj\.|\.add_v_proj\.|"
    r"\.norm_added_k\.)"
)
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)")


def _rename(name: str, top_modules: dict[str, str], block_modules: dict[str, str], block_table: tuple[str, str]) -> str:
    """Rename `module.weight|bias` by its module, inside or outside `blocks.{i}.`, and a block's modulation table."""
    m = _BLOCK_KEY.fullmatch(name)
    prefix, rest, modules = (f"blocks.{m.group(1)}.", m.group(2), block_modules) if m else ("", name, top_modules)
    if m and rest == block_table[0]:
        return prefix + block_table[1]
    module, _, leaf = rest.rpartition(".")
    if leaf not in ("weight", "bias") or module not in modules:
        raise KeyError(name)
    return f"{prefix}{modules[module]}.{leaf}"


_TOP_TO_DIFFUSERS = dict(TOP_LEVEL_MODULES)
_BLOCK_TO_DIFFUSERS = dict(BLOCK_MODULES)
_TOP_TO_ORIGINAL = {d: o for o, d in TOP_LEVEL_MODULES}
_BLOCK_TO_ORIGINAL = {d: o for o, d in BLOCK_MODULES}


def original_to_diffusers_key(name: str) -> str:
    """Wan's original parameter name -> diffusers' (`blocks.3.norm3.weight` -> `blocks.3.norm2.weight`); KeyError if unknown."""
    if name == HEAD_MODULATION[0]:
        return HEAD_MODULATION[1]
    return _rename(name, _TOP_TO_DIFFUSERS, _BLOCK_TO_DIFFUSERS, BLOCK_MODULATION)


def diffusers_to_original_key(name: str) -> str:
    """diffusers' parameter name -> Wan's original name; KeyError if unknown."""
    if name == HEAD_MODULATION[1]:
        return HEAD_MODULATION[0]
    return _rename(name, _TOP_TO_ORIGINAL, _BLOCK_TO_ORIGINAL, BLOCK_MODULATION[::-1])


def is_diffusers_layout(keys: list[str]) -> bool:
    """diffusers names carry `condition_embedder.` and `scale_shift_table`; Wan's original names never do."""
    return any(k.startswith("condition_embedder.") or "scale_shift_table" in k for k in keys)


# ---------------------------------------------------------------------------------------------------------- readers
class WanCheckpointError(ValueError):
    """A checkpoint that cannot become this model's video path; the message names the keys and the fix."""


@dataclass
class WanCheckpoint:
    """Lazy view of a checkpoint: names and shapes up front, each tensor read on demand (safetensors: one at a time)."""

    path: Path  # what the caller passed (a file or a directory)
    shapes: dict[str, tuple[int, ...]]
    read: Callable[[str], Tensor]
    config: Optional[dict[str, Any]]  # config.json / header metadata, when the checkpoint has one
    nbytes: int
    closers: ExitStack = field(default_factory=ExitStack)

    @property
    def diffusers(self) -> bool:
        return is_diffusers_layout(list(self.shapes))

    def close(self) -> None:
        self.closers.close()


def open_checkpoint(path: str | Path) -> WanCheckpoint:
    """Open any accepted Wan checkpoint (see the module docstring) without reading its tensors."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Wan checkpoint {path} does not exist")
    if path.is_dir():
        weights, config = _resolve_directory(path)
    else:
        weights, config = path, _sibling_config(path)
    if weights.name.endswith(".index.json"):
        with open(weights) as f:
            weight_map: dict[str, str] = json.load(f)["weight_map"]
        files = [weights.parent / name for name in sorted(set(weight_map.values()))]
    elif weights.suffix in (".safetensors", ".pth", ".pt"):
        files, weight_map = [weights], None
    else:
        raise WanCheckpointError(f"{path}: not a Wan checkpoint; expected .safetensors, .pth/.pt, *.index.json or a directory")
    readers: dict[str, Callable[[], Tensor]] = {}
    ckpt = WanCheckpoint(path, {}, lambda k: readers[k](), config, 0)
    try:
        for file in files:
            _add_file(ckpt, readers, file, weights)
        if weight_map is not None and set(ckpt.shapes) != set(weight_map):
            raise WanCheckpointError(f"{weights} lists keys its shards do not hold (or the reverse): the checkpoint is incomplete")
    except BaseException:
        ckpt.close()
        raise
    return ckpt


def _resolve_directory(root: Path) -> tuple[Path, Optional[dict[str, Any]]]:
    """The weights file (or shard index) inside a Wan / diffusers directory, and its config.json."""
    folder = root / "transformer" if (root / "transformer").is_dir() else root
    config = _read_model_config(folder / CONFIG_NAME) if (folder / CONFIG_NAME).is_file() else None
    candidates = [
        sorted(folder.glob("diffusion_pytorch_model*.index.json")),
        sorted(folder.glob(WEIGHTS_NAME)),
        sorted(folder.glob("*.safetensors.index.json")) + sorted(folder.glob("*.pth.index.json")),
        sorted(folder.glob("*.safetensors")),
    ]
    for found in candidates:
        if len(found) == 1:
            return found[0], config
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise WanCheckpointError(f"{folder} holds several candidate weight files ({names}); pass the one to load")
    inside = sorted(d.name for d in folder.iterdir() if d.is_dir() and any(d.glob("*.safetensors")))
    hint = f"; subfolders with weights: {inside} (e.g. Wan2.2-A14B's experts), pass one of them" if inside else ""
    raise WanCheckpointError(
        f"{folder} has no Wan weights: expected {WEIGHTS_NAME} (or shards + index), a transformer/ subfolder, "
        f"or a single .safetensors file{hint}"
    )


def _read_model_config(path: Path) -> dict[str, Any]:
    with open(path) as f:
        cfg = json.load(f)
    cls = cfg.get("_class_name")
    if cls not in (ORIGINAL_CLASS, DIFFUSERS_CLASS, None):
        raise WanCheckpointError(f"{path} describes a {cls}, not a Wan transformer ({ORIGINAL_CLASS} or {DIFFUSERS_CLASS})")
    return cfg


def _sibling_config(file: Path) -> Optional[dict[str, Any]]:
    """config.json next to a weights file, if it describes a Wan transformer (a file may sit beside unrelated configs)."""
    candidate = file.parent / CONFIG_NAME
    if not candidate.is_file():
        return None
    cfg = json.loads(candidate.read_text())
    return cfg if cfg.get("_class_name") in (ORIGINAL_CLASS, DIFFUSERS_CLASS) else None


def _add_file(ckpt: WanCheckpoint, readers: dict[str, Callable[[], Tensor]], file: Path, listed_in: Path) -> None:
    """Register one weights file's keys, shapes and lazy readers; a safetensors header may carry the config (save_wan)."""
    if not file.is_file():
        raise WanCheckpointError(f"shard {file} (listed in {listed_in}) is missing")
    if file.suffix == ".safetensors":
        handle = ckpt.closers.enter_context(safe_open(str(file), framework="pt"))
        meta = handle.metadata() or {}
        if ckpt.config is None and METADATA_CONFIG_KEY in meta:
            ckpt.config = json.loads(meta[METADATA_CONFIG_KEY])
        for k in handle.keys():
            ckpt.shapes[k] = tuple(handle.get_slice(k).get_shape())
            readers[k] = lambda h=handle, k=k: h.get_tensor(k)
    else:
        state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise WanCheckpointError(f"{file} is not a flat state dict of tensors (name -> tensor)")
        for k, v in state.items():
            ckpt.shapes[k] = tuple(v.shape)
            readers[k] = lambda v=v: v
    ckpt.nbytes += file.stat().st_size


# ------------------------------------------------------------------------------------------------------------ config
def wan_config(path: str | Path, dual_layers: str = "all") -> ModelConfig:
    """The ModelConfig a Wan checkpoint implies (edit it, e.g. `dual_layers`, and pass it to `from_wan`)."""
    ckpt = open_checkpoint(path)
    try:
        return _infer_config(ckpt, _original_names(ckpt), dual_layers)
    finally:
        ckpt.close()


def _infer_config(ckpt: WanCheckpoint, names: dict[str, str], dual_layers: str) -> ModelConfig:
    """Dimensions from tensor shapes; heads and eps from the checkpoint's config when it has one (else head_dim 128)."""
    shapes = {orig: ckpt.shapes[src] for orig, src in names.items()}
    need = [
        "patch_embedding.weight",
        "text_embedding.0.weight",
        "time_embedding.0.weight",
        "head.head.weight",
        "blocks.0.ffn.0.weight",
    ]
    absent = [k for k in need if k not in shapes]
    if absent:
        raise WanCheckpointError(f"{ckpt.path}: cannot infer the model config, keys {absent} are missing (is this a Wan DiT?)")
    dim, in_channels, *patch = shapes["patch_embedding.weight"]
    layers = {int(m.group(1)) for k in shapes if (m := _BLOCK_KEY.fullmatch(k))}
    if layers != set(range(len(layers))):
        raise WanCheckpointError(f"{ckpt.path}: block indices {sorted(layers)} are not contiguous from 0")
    out_features = shapes["head.head.weight"][0]
    if out_features % math.prod(patch):
        raise WanCheckpointError(f"{ckpt.path}: head.head has {out_features} outputs, not a multiple of patch {patch}")
    cfg = ckpt.config or {}
    heads = _declared_heads(cfg)
    if heads is None:
        if dim % WAN_HEAD_DIM:
            raise WanCheckpointError(
                f"{ckpt.path}: no config.json gives the head count and dim={dim} is not a multiple of Wan's head_dim "
                f"{WAN_HEAD_DIM}; pass a ModelConfig with num_heads"
            )
        heads = dim // WAN_HEAD_DIM
    model = ModelConfig(
        name=f"wan:{ckpt.path.stem if ckpt.path.is_file() else ckpt.path.name}",
        patch_size=list(patch),
        in_channels=in_channels,
        out_channels=out_features // math.prod(patch),
        dim=dim,
        ffn_dim=shapes["blocks.0.ffn.0.weight"][0],
        num_heads=heads,
        num_layers=len(layers),
        freq_dim=shapes["time_embedding.0.weight"][1],
        text_dim=shapes["text_embedding.0.weight"][1],
        text_len=int(cfg.get("text_len", WAN_TEXT_LEN)),
        eps=float(cfg.get("eps", 1e-6)),
        dual_layers=dual_layers,
    )
    try:
        validate(Config(model=model))
    except ConfigError as e:
        raise WanCheckpointError(f"{ckpt.path}: the inferred model config is invalid: {e}") from e
    return model


def _declared_heads(cfg: dict[str, Any]) -> Optional[int]:
    """Head count from a diffusers (`num_attention_heads`) or Wan (`num_heads`) config, if present."""
    for key in ("num_attention_heads", "num_heads"):
        if key in cfg:
            return int(cfg[key])
    return None


# ---------------------------------------------------------------------------------------------------------- loading
def _original_names(ckpt: WanCheckpoint) -> dict[str, str]:
    """Original name -> checkpoint key for every key; refuses i2v checkpoints; unknown keys keep their own name."""
    image = [k for k in ckpt.shapes if IMAGE_KEY_PATTERN.search(k)]
    if image:
        shown = ", ".join(image[:8]) + (f", ... ({len(image)} in all)" if len(image) > 8 else "")
        raise WanCheckpointError(
            f"{ckpt.path} is an image-conditioned (i2v/flf2v) Wan checkpoint, which is not supported: it has image keys "
            f"{shown}. Use a text-to-video (Wan2.1-T2V) or TI2V (Wan2.2-TI2V-5B) checkpoint."
        )
    if not ckpt.diffusers:
        return {k: k for k in ckpt.shapes}
    names = {}
    for k in ckpt.shapes:
        try:
            names[diffusers_to_original_key(k)] = k
        except KeyError:
            names[k] = k  # reported as unexpected by the shape check
    return names


def video_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The video path (everything Wan has) in Wan's original names: the model's state dict minus motion-only entries."""
    return {k: v for k, v in model.state_dict().items() if not is_motion_parameter(k)}


def _check_keys(ckpt: WanCheckpoint, names: dict[str, str], expected: dict[str, Tensor]) -> None:
    """One error listing every missing key, unexpected key and shape mismatch, so nothing loads partially."""
    missing = [k for k in expected if k not in names]
    unexpected = [names[k] if names[k] == k else f"{names[k]} (= {k})" for k in names if k not in expected]
    mismatched = [
        f"{k}: checkpoint {list(ckpt.shapes[names[k]])} vs model {list(expected[k].shape)}"
        for k in names
        if k in expected and tuple(expected[k].shape) != ckpt.shapes[names[k]]
    ]
    problems = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
        if items:
            shown = items[:40] + ([f"... and {len(items) - 40} more"] if len(items) > 40 else [])
            problems.append(f"{len(items)} {title}:\n    " + "\n    ".join(shown))
    if problems:
        raise WanCheckpointError(
            f"{ckpt.path} does not fit the model's video path:\n  " + "\n  ".join(problems) + "\n  (if the model config was "
            "given by hand, check it against the checkpoint, or pass config=None to infer it)"
        )


def load_wan(path: str | Path, config: Optional[ModelConfig] = None) -> EchoMotionDiT:
    """Build `EchoMotionDiT(config)` with its video path from a Wan checkpoint and its motion experts copied from the video experts.

    `config=None` infers it from the checkpoint (`dual_layers="all"`; use `wan_config` to start from the inferred config and
    change it). Every key and shape is checked before any tensor is read; tensors are then copied one at a time. The motion
    tokenizer/decoder and the task hint keep their fresh initialization.
    """
    ckpt = open_checkpoint(path)
    try:
        names = _original_names(ckpt)
        if config is None:
            config = _infer_config(ckpt, names, "all")
        declared = _declared_heads(ckpt.config or {})
        if declared is not None and declared != config.num_heads:
            raise WanCheckpointError(
                f"{ckpt.path} declares {declared} attention heads but model.num_heads={config.num_heads}; "
                f"set model.num_heads={declared}"
            )
        model = EchoMotionDiT(config)
        expected = video_state_dict(model)
        _check_keys(ckpt, names, expected)
        with torch.no_grad():
            for orig in tqdm(expected, desc=f"loading {ckpt.path.name}", unit="tensor", disable=ckpt.nbytes < 2**30):
                expected[orig].copy_(ckpt.read(names[orig]))
        model.copy_video_experts_to_motion()
        return model
    finally:
        ckpt.close()


# ----------------------------------------------------------------------------------------------------------- saving
def save_wan(model: nn.Module, path: str | Path, layout: str = "original", dtype: Optional[torch.dtype] = None) -> Path:
    """Write the video path as a Wan checkpoint; motion-only parameters are left out.

    layout="original": one `.safetensors` file in Wan's names (its header carries Wan's config fields, so `from_wan` can read
    the head count back). layout="diffusers": a directory with `config.json` + `diffusion_pytorch_model.safetensors` that
    `diffusers.WanTransformer3DModel.from_pretrained` loads. Files are written to a temporary name and renamed into place,
    so an interrupted save never leaves a truncated file. Returns the written path.
    """
    path = check_wan_path(path, layout)
    cfg: ModelConfig = model.config
    state = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in video_state_dict(model).items()}
    if layout == "original":
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": "pt", METADATA_CONFIG_KEY: json.dumps(_original_config(cfg))}
        atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=meta))
        return path
    path.mkdir(parents=True, exist_ok=True)
    renamed = {original_to_diffusers_key(k): v for k, v in state.items()}
    # Weights first, config last: a reader that finds the config finds the matching weights.
    atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(renamed, str(tmp), metadata={"format": "pt"}))
    atomic_write(path / CONFIG_NAME, lambda tmp: tmp.write_text(json.dumps(_diffusers_config(cfg), indent=2) + "\n"))
    return path


def check_wan_path(path: str | Path, layout: str) -> Path:
    """Where `save_wan(layout=...)` may write, checked on its own so a caller can refuse a bad path before slow work."""
    path = Path(path)
    if layout == "original":
        if path.suffix != ".safetensors":
            raise ValueError(f"Wan's original layout is one .safetensors file; got {path}: give it a .safetensors name")
    elif layout == "diffusers":
        if path.suffix:
            raise ValueError(f"the diffusers layout is a directory; got {path}: drop the suffix")
    else:
        raise ValueError(f"unknown layout {layout!r}: choose 'original' or 'diffusers'")
    return path


def _original_config(cfg: ModelConfig) -> dict[str, Any]:
    """Wan's config.json fields (WanModel) for this model's video path."""
    return {
        "_class_name": ORIGINAL_CLASS,
        "dim": cfg.dim,
        "ffn_dim": cfg.ffn_dim,
        "freq_dim": cfg.freq_dim,
        "in_dim": cfg.in_channels,
        "out_dim": cfg.out_channels,
        "num_heads": cfg.num_heads,
        "num_layers": cfg.num_layers,
        "patch_size": list(cfg.patch_size),
        "text_dim": cfg.text_dim,
        "text_len": cfg.text_len,
        "eps": cfg.eps,
    }


def _diffusers_config(cfg: ModelConfig) -> dict[str, Any]:
    """WanTransformer3DModel's config.json for this model's video path (T2V: no image projection)."""
    return {
        "_class_name": DIFFUSERS_CLASS,
        "patch_size": list(cfg.patch_size),
        "num_attention_heads": cfg.num_heads,
        "attention_head_dim": cfg.dim // cfg.num_heads,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "text_dim": cfg.text_dim,
        "freq_dim": cfg.freq_dim,
        "ffn_dim": cfg.ffn_dim,
        "num_layers": cfg.num_layers,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": cfg.eps,
        "image_dim": None,
        "added_kv_proj_dim": None,
        "rope_max_seq_len": 1024,
        "pos_embed_seq_len": None,
    }


__all__ = [
    "WanCheckpoint",
    "WanCheckpointError",
    "diffusers_to_original_key",
    "is_diffusers_layout",
    "load_wan",
    "open_checkpoint",
    "original_to_diffusers_key",
    "save_wan",
    "video_state_dict",
    "wan_config",
]
