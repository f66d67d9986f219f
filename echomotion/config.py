"""The project's one config schema: omegaconf structured configs, loaded from YAML, merged with dotlist overrides, validated.

Every section is a dataclass; `load_config` is the only way a run builds its config, so every entry point sees the same
validation and the same actionable errors.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A config value a run cannot start with; the message names the key and a fix."""


@dataclass
class MotionConfig:
    """Motion tokens (SMPL per frame -> 51 tokens) and their MLP projectors; see docs/method-decisions.md."""

    mlp_hidden: int = 0  # hidden width of the input/output MLPs; 0 = the model width
    smpl_model_path: Optional[str] = None  # SMPL .pkl used for forward kinematics (data preparation, evaluation)


@dataclass
class RopeConfig:
    """MVS-RoPE: where motion tokens sit relative to the video grid."""

    motion_layout: str = "mvs"  # "mvs": (f/ratio, H+i, W+i) (paper Eq. 3) | "collision": (f/ratio, i, i) (paper Eq. 15)
    temporal_ratio: float = 4.0  # motion frame f sits at latent time f / temporal_ratio (Wan VAE: 4 frames per latent)
    theta: float = 10000.0


@dataclass
class ModelConfig:
    """The dual-stream DiT. Video fields mirror Wan's config names; presets live in configs/model/*.yaml."""

    name: str = "tiny"
    patch_size: list[int] = field(default_factory=lambda: [1, 2, 2])
    in_channels: int = 16
    out_channels: int = 16
    dim: int = 64
    ffn_dim: int = 128
    num_heads: int = 2
    num_layers: int = 2
    freq_dim: int = 256
    text_dim: int = 32
    text_len: int = 16
    eps: float = 1e-6
    # Which layers carry a motion expert: "all", "none", "first_half", "second_half", "even", "odd",
    # or an explicit comma-separated list of layer indices ("0,2,4").
    dual_layers: str = "all"
    task_hint: bool = True
    attention_backend: str = "sdpa"  # "sdpa" (any device) | "flash" (flash-attn varlen, CUDA only)
    motion: MotionConfig = field(default_factory=MotionConfig)
    rope: RopeConfig = field(default_factory=RopeConfig)


@dataclass
class DiffusionConfig:
    """Flow matching in Wan's convention (sigma = 1 is pure noise; model timestep = 1000 * sigma)."""

    num_train_timesteps: int = 1000
    shift: float = 8.0
    video_loss_weight: float = 1.0
    motion_loss_weight: float = 1.0
    # Phase 2 task mix (joint / motion->video / video->motion) and condition dropping (paper Sec. 3.2).
    task_probs: list[float] = field(default_factory=lambda: [0.4, 0.3, 0.3])
    joint_text_drop: float = 0.1
    m2v_text_drop: float = 0.1
    m2v_motion_drop: float = 0.1
    v2m_video_drop: float = 0.1
    t2m_text_drop: float = 0.1


@dataclass
class SampleConfig:
    """Sampling defaults from the paper's Tables 7-8 (50 steps, shift 8, guidance 6)."""

    steps: int = 50
    shift: float = 8.0
    solver: str = "euler"  # "euler" | "heun"
    text_guidance: float = 6.0  # omega_1
    condition_guidance: float = 2.0  # omega_2 (motion in Eq. 5, video in Eq. 6); not given by the paper
    seed: int = 0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Schema defaults <- YAML file (its `defaults:` list of other YAML files first) <- dotlist overrides; then validate."""
    cfg = OmegaConf.structured(Config)
    try:
        if path is not None:
            cfg = OmegaConf.merge(cfg, _read_yaml(Path(path)))
        if overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as e:
        raise ConfigError(f"{e.msg if hasattr(e, 'msg') else e} (check the key name and type against echomotion/config.py)") from e
    obj: Config = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    validate(obj)
    return obj


def model_preset(name: str, overrides: list[str] | None = None) -> ModelConfig:
    """The model section of a preset in configs/model/ (tiny, wan2.1-1.3b, wan2.2-5b)."""
    path = CONFIG_DIR / "model" / f"{name}.yaml"
    if not path.exists():
        choices = sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))
        raise ConfigError(f"unknown model preset {name!r}; choose one of {choices}")
    return load_config(path, overrides).model


def _read_yaml(path: Path) -> DictConfig:
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    raw = OmegaConf.load(path)
    includes = raw.pop("defaults", []) if isinstance(raw, DictConfig) else []
    merged = OmegaConf.create()
    for inc in includes:
        merged = OmegaConf.merge(merged, _read_yaml((path.parent / str(inc)).resolve()))
    return OmegaConf.merge(merged, raw)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_from_dict(d: dict[str, Any]) -> Config:
    """Rebuild a Config saved next to a checkpoint (validated like a fresh one)."""
    obj: Config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), d))  # type: ignore[assignment]
    validate(obj)
    return obj


def dual_layer_indices(m: ModelConfig) -> list[int]:
    """Resolve `model.dual_layers` to sorted layer indices."""
    n, spec = m.num_layers, m.dual_layers.strip()
    named = {
        "all": range(n),
        "none": range(0),
        "first_half": range(n // 2),
        "second_half": range(n // 2, n),
        "even": range(0, n, 2),
        "odd": range(1, n, 2),
    }
    if spec in named:
        return list(named[spec])
    try:
        idx = sorted({int(s) for s in spec.split(",") if s.strip()})
    except ValueError:
        raise ConfigError(
            f"model.dual_layers={spec!r} is neither a name ({', '.join(named)}) nor a comma-separated list of layer indices"
        ) from None
    bad = [i for i in idx if not 0 <= i < n]
    if bad:
        raise ConfigError(f"model.dual_layers lists layers {bad} outside 0..{n - 1} (model.num_layers={n})")
    return idx


def validate(cfg: Config) -> None:
    m = cfg.model
    problems: list[str] = []
    if m.dim % m.num_heads:
        problems.append(f"model.dim={m.dim} is not divisible by model.num_heads={m.num_heads}")
    else:
        head_dim = m.dim // m.num_heads
        if head_dim % 2 or head_dim < 6:
            problems.append(f"head dim model.dim/model.num_heads={head_dim} must be even and >= 6 for 3D RoPE")
    if len(m.patch_size) != 3 or min(m.patch_size) < 1:
        problems.append(f"model.patch_size={list(m.patch_size)} must be three positive ints (t, h, w)")
    for key in ("in_channels", "out_channels", "ffn_dim", "num_layers", "freq_dim", "text_dim", "text_len"):
        if getattr(m, key) < 1:
            problems.append(f"model.{key}={getattr(m, key)} must be positive")
    if m.freq_dim % 2:
        problems.append(f"model.freq_dim={m.freq_dim} must be even")
    if m.rope.motion_layout not in ("mvs", "collision"):
        problems.append(f"model.rope.motion_layout={m.rope.motion_layout!r}: choose 'mvs' or 'collision'")
    if m.rope.temporal_ratio <= 0:
        problems.append(f"model.rope.temporal_ratio={m.rope.temporal_ratio} must be > 0")
    if m.attention_backend not in ("sdpa", "flash"):
        problems.append(f"model.attention_backend={m.attention_backend!r}: choose 'sdpa' or 'flash'")
    if m.motion.mlp_hidden < 0:
        problems.append("model.motion.mlp_hidden must be >= 0 (0 = model width)")
    try:
        dual_layer_indices(m)
    except ConfigError as e:
        problems.append(str(e))
    d = cfg.diffusion
    if len(d.task_probs) != 3 or min(d.task_probs) < 0 or abs(sum(d.task_probs) - 1) > 1e-6:
        problems.append(f"diffusion.task_probs={list(d.task_probs)} must be 3 non-negative numbers (joint, m2v, v2m) summing to 1")
    for key in ("joint_text_drop", "m2v_text_drop", "m2v_motion_drop", "v2m_video_drop", "t2m_text_drop"):
        if not 0 <= getattr(d, key) <= 1:
            problems.append(f"diffusion.{key}={getattr(d, key)} must be a probability in [0, 1]")
    if d.shift <= 0:
        problems.append(f"diffusion.shift={d.shift} must be > 0")
    s = cfg.sample
    if s.steps < 1:
        problems.append(f"sample.steps={s.steps} must be >= 1")
    if s.solver not in ("euler", "heun"):
        problems.append(f"sample.solver={s.solver!r}: choose 'euler' or 'heun'")
    if s.shift <= 0:
        problems.append(f"sample.shift={s.shift} must be > 0")
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))
