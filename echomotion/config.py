"""The project's one config schema: omegaconf structured configs, loaded from YAML, merged with dotlist overrides, validated.

Every section is a dataclass; `load_config` is the only way a run builds its config, so every entry point sees the same
validation and the same actionable errors.
"""
from __future__ import annotations

import importlib.util
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
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
    # A toy-scale aid, off for Wan: "sincos" adds a parameter-free sinusoidal embedding of each token's position to the
    # token after its input embedding (video by (t, h, w), motion by (frame / ratio, token index); see
    # docs/method-decisions.md). "none" keeps Wan exact.
    abs_pos: str = "none"
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


SOURCE_KINDS = ("paired", "motion_only")


@dataclass
class SourceConfig:
    """One MDS stream of the training mixture (docs/data.md, "Sources"). A paired source holds one latent shape (one
    resolution / duration bucket); batches never mix sources, so a batch never mixes shapes or kinds."""

    path: Optional[str] = None  # a local folder or s3://bucket/prefix holding index.json
    kind: str = "paired"  # "paired" (video + motion) | "motion_only" (has_video = 0); each sample is checked against it
    weight: Optional[float] = None  # relative share of an epoch's samples; None on every source = each sample once


@dataclass
class DataConfig:
    """HuMoVe MDS shards streamed with mosaicml-streaming (echomotion/data/loader.py; docs/data.md).

    The mixture is `sources`, or its shorthand `path` (paired) + `motion_only_path` + `proportions` (`data_sources`
    expands it). Batches never mix sources, so every batch has one latent shape.
    """

    sources: list[SourceConfig] = field(default_factory=list)  # the mixture; empty = the shorthand below
    path: Optional[str] = None  # shorthand: the paired source, a local folder or s3://bucket/prefix holding index.json
    motion_only_path: Optional[str] = None  # shorthand: a motion-only source (has_video = 0)
    proportions: Optional[list[float]] = None  # shorthand: [path, motion_only_path] weights; None = each sample once
    epoch_size: Optional[int] = None  # samples per epoch over all streams; None = the streams' natural size
    cache_dir: Optional[str] = None  # local shard cache, unique per run; None = the run's own (train passes run_dir)
    cache_limit: Optional[str] = None  # e.g. "200gb": evict the coldest shards beyond this; None = keep everything
    batch_size: int = 1  # per rank (per replication group: TP x SP ranks share each sample)
    num_workers: int = 4
    prefetch_factor: int = 2  # batches each DataLoader worker prepares ahead
    shuffle: bool = True
    shuffle_seed: int = 9176
    shuffle_algo: str = "py1e"
    shuffle_block_size: Optional[int] = None  # None = streaming's default (max(4M / canonical nodes, 2^18))
    num_canonical_nodes: Optional[int] = None  # fix it to resume on a different node count with the same order
    predownload: Optional[int] = None  # samples to fetch ahead per worker; None = 8 x batch_size
    download_retry: int = 8  # retries of a transient object-store failure (connection, timeout, 5xx) per file
    retry_base_delay: float = 1.0  # seconds before the first retry; doubles each time
    retry_max_delay: float = 30.0
    download_timeout: float = 120.0  # seconds one shard download may take
    validate_hash: Optional[str] = None  # e.g. "sha1": every shard (remote or local) vs index.json's hash, once a run
    text_len: Optional[int] = None  # text tokens per sample after padding/truncation; None = model.text_len
    # Motion frames per training sample: longer motion-only clips are cropped to a random window (seeded by shuffle_seed,
    # epoch and sample id, so resume is exact), shorter ones padded with masked frames; None = pad to the batch's longest.
    motion_frames: Optional[int] = None
    sp_multiple: int = 1  # pad motion so its token count (frames x 51) is a multiple of this (the sequence-parallel size)
    # The empty prompt's embedding [L, text_dim] and the motion normalization stats; None = null_text.pt /
    # motion_stats.json in the first paired source's folder (the first source's if none is paired): `assets_root`
    null_text_path: Optional[str] = None
    stats_path: Optional[str] = None
    clean_stale_shm: bool = True  # unlink streaming's leftover shared memory at start (one job per node)


@dataclass
class TrainConfig:
    """The training job (echomotion/train.py). Paper defaults: AdamW, lr 8e-6, weight decay 1e-3."""

    run_dir: str = "runs/default"
    phase: int = 1  # 1: motion-only pretraining (video expert frozen and absent); 2: motion-video multi-task
    steps: int = 15000
    seed: int = 0
    resume: str = "auto"  # "auto": newest complete checkpoint in run_dir, if any; "never"; or a checkpoint folder
    init_wan: Optional[str] = None  # pretrained Wan checkpoint (original or diffusers layout) for a fresh run
    init_from: Optional[str] = None  # a checkpoint folder or exported .safetensors to start from (Phase 2 <- Phase 1)
    checkpoint_every: int = 500
    keep_last: int = 3
    # Write checkpoints in the background (host-memory copy, then a writer thread; echomotion/checkpoint.py): training
    # waits only for the copy. None = yes where the engine can (fsdp), no under deepspeed, whose engine saves itself.
    async_checkpoint: Optional[bool] = None
    log_every: int = 1
    lr: float = 8e-6
    weight_decay: float = 1e-3
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    schedule: str = "constant"  # "constant" | "cosine" | "linear" (after warmup, down to min_lr_ratio * lr)
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0  # max global grad norm; 0 = no clipping
    grad_accum: int = 1  # micro-batches per optimizer step
    ema_decay: float = 0.0  # 0 = no EMA copy
    max_nan_streak: int = 10  # stop after this many skipped (NaN/Inf) steps in a row
    precision: str = "fp32"  # "fp32" | "bf16" (autocast on CUDA; modulation, norms and RoPE stay fp32)
    metrics_port: int = 0  # Prometheus exporter port of local rank 0 (local rank l uses port + l, on every node); 0 = off
    metrics_addr: str = "0.0.0.0"
    peak_flops: float = 0.0  # per device, for MFU; 0 = look up the GPU (H100: 989e12), none on CPU
    progress: bool = True  # rank 0 reports progress: a bar on a terminal, else a plain line every print_every steps
    # Where each step record goes: "jsonl" (metrics.jsonl, which resume and the tools read; always kept) and optionally
    # "tensorboard" (run_dir/tensorboard) and "wandb" (a W&B run in run_dir/wandb): scalars, sample grids and the
    # resolved config; each needs its package (pip install 'echomotion[loggers]')
    loggers: list[str] = field(default_factory=lambda: ["jsonl"])
    wandb_project: str = "echomotion"
    # "offline" by default: training clusters often have no route to the internet, and an online init would then stall
    # or fail the job; the run is written to run_dir/wandb and uploaded later with `wandb sync`. "online" | "disabled".
    wandb_mode: str = "offline"
    print_every: int = 100  # the plain progress line where stdout is a log file (Slurm, Kubernetes), not a terminal
    # Seconds a collective may wait for the other ranks before the job fails (PyTorch's default is 30 min, long to hold
    # a 64-GPU job on one stuck rank). On a timeout the flight recorder dumps each rank's recent collectives to
    # run_dir/flight_recorder/ (docs/operations.md, "A hung collective").
    collective_timeout: float = 1800.0
    # Seconds from SIGTERM to SIGKILL the job runs under (Kubernetes terminationGracePeriodSeconds; the manifests set it
    # to theirs). Only reported (echomotion_termination_grace_seconds), so an alert can compare checkpoint time with it.
    termination_grace: int = 300
    # Count collective bytes by kind (metrics `comm/<kind>_bytes`) on step 1 and every this many steps; 0 = never. A counted
    # step runs every op through a Python dispatch mode (a few us each) and torch.compile'd blocks eagerly.
    count_collectives_every: int = 50
    # In-loop validation (docs/operations.md, "Validation and samples during training"). Every eval_every steps (and at
    # the last step) the flow loss per task on held-out clips at the fixed noise levels eval_sigmas with fixed noise,
    # so values compare across steps, runs and parallel layouts (a training loss mixes random sigmas and tasks); 0 = off.
    eval_every: int = 0
    # A local folder of MDS shards of held-out clips (HuMoVe-mini: <root>/heldout); needed when eval_every or
    # sample_every is on. Clips are read in index order; sampling also needs the dataset.json of its parent folder.
    eval_data: Optional[str] = None
    eval_clips: int = 8  # the first N clips of eval_data (fewer if it holds fewer); cost: N x tasks forwards of one clip
    # Noise levels (sigma in Wan's convention, after any shift: 1 = pure noise) the validation loss is taken at.
    eval_sigmas: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    # Every sample_every steps (and at the last step), rank 0 samples the phase's tasks on the first sample_clips held-out
    # clips with the `sample` settings into run_dir/samples/step-N/<task>/grid.png (and to the image loggers); on
    # HuMoVe-mini also the evaluation metrics (echomotion/evaluate.py) as eval/<metric>; 0 = off.
    sample_every: int = 0
    sample_clips: int = 2  # >= 2: the evaluation's baselines pair each clip with another


@dataclass
class ParallelConfig:
    """How a run splits over its processes (parallel/, docs/parallelism.md). The product
    dp_replicate x dp_shard x sp x tp must equal the world size; dp_shard=-1 fills what the others leave."""

    dp_replicate: int = 1  # HSDP replica groups (each holds a full sharded copy); 1 = plain FSDP
    dp_shard: int = -1  # FSDP/ZeRO-3 shard degree over data-parallel ranks; -1 = world / (dp_replicate x sp x tp)
    sp: int = 1  # Ulysses sequence parallel: ranks that split one sample's [video; motion] tokens
    tp: int = 1  # tensor parallel: ranks that split every expert's linears (heads, FFN width)
    engine: str = "fsdp"  # "fsdp": torch FSDP2 (+ DTensor TP); "deepspeed": DeepSpeed ZeRO-3 (no TP)
    deepspeed_config: Optional[str] = None  # JSON whose keys override the DeepSpeed config generated from this one
    zero_stage: int = 3  # DeepSpeed ZeRO stage (engine=deepspeed)
    reshard_after_forward: bool = True  # FSDP2: free gathered parameters after each block's forward (ZeRO-3 style)
    param_dtype: str = "fp32"  # FSDP2 compute dtype of gathered parameters: "fp32" | "bf16" (modulation and norms stay fp32)
    reduce_dtype: str = "fp32"  # FSDP2 gradient reduce-scatter dtype
    cpu_offload: bool = False  # parameters, gradients, optimizer state in host memory (FSDP2 offload / ZeRO-Offload)
    activation_checkpointing: str = "none"  # "none" | "full" (every block) | "every_k" (every k-th block, k = ac_every)
    ac_every: int = 2
    compile: bool = False  # torch.compile each block (after activation checkpointing, before FSDP)
    # "none" | "te": expert linears as Transformer Engine modules under fp8_autocast (CUDA only) | "torchao": as torchao
    # Float8Linears (docs/parallelism.md, FP8)
    fp8: str = "none"
    # scaling: te "delayed" | "current"; torchao "current" (per tensor) | "rowwise"; None = the backend's first
    fp8_recipe: Optional[str] = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    @property
    def text_len(self) -> int:
        """The length text embeddings are padded / cut to: data.text_len, else the model's."""
        return self.data.text_len or self.model.text_len


CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Schema defaults <- YAML file (its `include:` list of other YAML files first) <- dotlist overrides; then validate."""
    cfg = OmegaConf.structured(Config)
    try:
        if path is not None:
            cfg = OmegaConf.merge(cfg, _read_yaml(Path(path)))
        if overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as e:
        first = str(getattr(e, "msg", e)).splitlines()[0]  # omegaconf appends full_key / reference_type lines
        where = f"{e.full_key}: " if getattr(e, "full_key", None) else ""
        raise ConfigError(f"{where}{first} (check the key name and type against echomotion/config.py)") from e
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
    """One YAML file over the files its `include:` list names (paths relative to it, merged in order, each first)."""
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    raw = OmegaConf.load(path)
    merged = OmegaConf.create()
    for inc in _includes(raw, path) if isinstance(raw, DictConfig) else []:
        merged = OmegaConf.merge(merged, _read_yaml((path.parent / inc).resolve()))
    return OmegaConf.merge(merged, raw)


def _includes(raw: DictConfig, path: Path) -> list[str]:
    """Pop the file's include list. `defaults:`, its old name, still works with a warning (a FutureWarning: Python shows
    those to users, while a DeprecationWarning outside __main__ is hidden)."""
    if "defaults" in raw:
        if "include" in raw:
            raise ConfigError(f"{path}: has both `include:` and `defaults:`; merge them into `include:`")
        warnings.warn(f"{path}: `defaults:` is deprecated, rename it to `include:` (the same list of YAML files)",
                      FutureWarning, stacklevel=3)
    entries = raw.pop("include" if "include" in raw else "defaults", None)
    if entries is None:
        return []
    if not isinstance(entries, ListConfig):
        raise ConfigError(f"{path}: `include:` must be a list of YAML paths, e.g. `include: [model/tiny.yaml]`")
    for entry in entries:
        if isinstance(entry, str):
            continue
        shown = OmegaConf.to_container(entry) if isinstance(entry, (DictConfig, ListConfig)) else entry
        hint = "model/tiny.yaml"
        if isinstance(shown, dict) and len(shown) == 1:
            ((group, name),) = shown.items()
            hint = f"{group}/{name}.yaml"
        raise ConfigError(f"{path}: include entry {shown!r} is not a file path; `include:` is not Hydra's `defaults:` "
                          f"(there are no config groups): name the YAML file relative to {path.name}, e.g. `- {hint}`")
    return list(entries)


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
    if m.abs_pos not in ("none", "sincos"):
        problems.append(f"model.abs_pos={m.abs_pos!r}: choose 'none' (Wan) or 'sincos' (toy models trained from scratch)")
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
    problems += _data_problems(cfg.data)
    problems += _train_problems(cfg.train)
    problems += _parallel_problems(cfg.parallel, m, cfg.train)
    if problems:
        raise ConfigError(listed("invalid config", problems))


def listed(head: str, problems: list[str]) -> str:
    """One line, `head: problem; problem`: a scheduler's log and torchrun's failure report show a job's last line."""
    return f"{head}: " + "; ".join(problems)


_SHUFFLE_ALGOS = ("py1e", "py1br", "py1s", "py2s", "naive")
_BYTES = re.compile(r"^\d+(\.\d+)?\s*(b|kb|mb|gb|tb|pb)$", re.IGNORECASE)


def data_sources(d: DataConfig) -> list[SourceConfig]:
    """The mixture: `data.sources`, or the one expansion of the shorthand (`data.path` paired, then
    `data.motion_only_path` motion-only, weighed by `data.proportions`)."""
    if d.sources:
        return list(d.sources)
    paths = [(d.path, "paired"), (d.motion_only_path, "motion_only")]
    weights = list(d.proportions) if d.proportions is not None else [None, None]
    return [SourceConfig(path=p, kind=k, weight=w) for (p, k), w in zip(paths, weights) if p is not None]


def s3_paths(d: DataConfig) -> list[str]:
    """The sources read from an object store (a launcher passes the store's settings through to such a job)."""
    return [s.path for s in data_sources(d) if s.path is not None and s.path.startswith("s3://")]


def source_key(d: DataConfig, index: int) -> str:
    """How messages name a source: the config key a user would edit."""
    if d.sources:
        return f"data.sources[{index}]"
    return "data.path" if d.path is not None and index == 0 else "data.motion_only_path"


def assets_source(d: DataConfig) -> Optional[int]:
    """The index of the source whose folder holds the run's motion_stats.json and null_text.pt unless data.stats_path /
    data.null_text_path name them (the data tools write both next to index.json): the first paired source, else the
    first source; None without sources."""
    kinds = [s.kind for s in data_sources(d)]
    return kinds.index("paired") if "paired" in kinds else (0 if kinds else None)


def assets_root(d: DataConfig) -> Optional[str]:
    """The folder of `assets_source`, without a trailing slash."""
    i = assets_source(d)
    path = None if i is None else data_sources(d)[i].path
    return None if path is None else path.rstrip("/")


def _source_problems(d: DataConfig) -> list[str]:
    """The mixture: shorthand or list (not both), kinds, weights, and paths."""
    if d.sources and (d.path is not None or d.motion_only_path is not None or d.proportions is not None):
        return ["data.sources is given together with data.path / data.motion_only_path / data.proportions, their "
                "shorthand: list every stream in data.sources (kind: paired | motion_only) and drop the shorthand keys "
                "(data.path=null on the command line when the config file sets it)"]
    if d.proportions is not None and (d.path is None or d.motion_only_path is None):
        return ["data.proportions weighs the two shorthand streams [data.path, data.motion_only_path]: set both, or "
                "drop data.proportions (or list the streams with weights in data.sources)"]
    if d.proportions is not None and len(d.proportions) != 2:
        return [f"data.proportions={list(d.proportions)} must be two weights [data.path, data.motion_only_path]"]
    sources = data_sources(d)
    problems = []
    for i, s in enumerate(sources):
        key = source_key(d, i)
        if not s.path:
            problems.append(f"{key} has no path: give a local folder or s3://bucket/prefix holding index.json")
        if s.kind not in SOURCE_KINDS:
            problems.append(f"{key}.kind={s.kind!r}: choose 'paired' (video + motion) or 'motion_only'")
        if s.weight is not None and s.weight < 0:
            problems.append(f"{key}.weight={s.weight} is negative: weights are relative shares of an epoch, >= 0")
    weights = [s.weight for s in sources]
    if any(w is None for w in weights) and any(w is not None for w in weights):
        problems.append("some data sources have a weight and others not: give every source a weight (relative shares "
                        "of an epoch), or none (every sample once an epoch)")
    elif weights and all(w == 0 for w in weights):
        problems.append(f"the data source weights {weights} are all 0: give at least one source a positive weight")
    paths = [s.path.rstrip("/") for s in sources if s.path]
    if len(set(paths)) < len(paths):
        problems.append(f"a data source is listed twice ({sorted(p for p in set(paths) if paths.count(p) > 1)}): "
                        "list each stream once and set its weight instead")
    return problems


def _data_problems(d: DataConfig) -> list[str]:
    problems = _source_problems(d)
    for key in ("batch_size", "prefetch_factor", "sp_multiple"):
        if getattr(d, key) < 1:
            problems.append(f"data.{key}={getattr(d, key)} must be >= 1")
    for key in ("epoch_size", "shuffle_block_size", "num_canonical_nodes", "predownload", "text_len", "motion_frames"):
        if getattr(d, key) is not None and getattr(d, key) < 1:
            problems.append(f"data.{key}={getattr(d, key)} must be >= 1 (or null for the default)")
    if d.num_workers < 0:
        problems.append(f"data.num_workers={d.num_workers} must be >= 0")
    if d.download_retry < 0:
        problems.append(f"data.download_retry={d.download_retry} must be >= 0")
    if not 0 < d.retry_base_delay <= d.retry_max_delay:
        problems.append(
            f"data.retry_base_delay={d.retry_base_delay} and data.retry_max_delay={d.retry_max_delay} must satisfy 0 < base <= max"
        )
    if d.download_timeout <= 0:
        problems.append(f"data.download_timeout={d.download_timeout} must be > 0 seconds")
    if d.shuffle_algo not in _SHUFFLE_ALGOS:
        problems.append(f"data.shuffle_algo={d.shuffle_algo!r}: choose one of {', '.join(_SHUFFLE_ALGOS)}")
    if d.shuffle_seed < 0:
        problems.append(f"data.shuffle_seed={d.shuffle_seed} must be >= 0")
    if d.cache_limit is not None and not _BYTES.match(d.cache_limit.strip()):
        problems.append(f"data.cache_limit={d.cache_limit!r} must be a size like '500mb' or '200gb' (or null for no limit)")
    return problems


LOGGERS = ("jsonl", "tensorboard", "wandb")
WANDB_MODES = ("online", "offline", "disabled")


def _logger_problems(t: TrainConfig) -> list[str]:
    loggers = list(t.loggers)
    unknown = [x for x in loggers if x not in LOGGERS]
    if unknown:
        return [f"train.loggers={loggers}: unknown {unknown}; choose from {list(LOGGERS)}"]
    if "jsonl" not in loggers:
        return [f"train.loggers={loggers} must keep 'jsonl': metrics.jsonl is what resume and the tools read"]
    problems = [f"train.loggers includes {name!r} but the {name} package is not installed: "
                "pip install 'echomotion[loggers]' (or drop it from train.loggers)"
                for name in ("tensorboard", "wandb") if name in loggers and importlib.util.find_spec(name) is None]
    if t.wandb_mode not in WANDB_MODES:
        problems.append(f"train.wandb_mode={t.wandb_mode!r}: choose 'offline' (written to run_dir/wandb, uploaded later "
                        "with `wandb sync`), 'online' (needs a network route and WANDB_API_KEY) or 'disabled'")
    return problems


def _train_problems(t: TrainConfig) -> list[str]:
    problems = []
    if t.phase not in (1, 2):
        problems.append(f"train.phase={t.phase}: choose 1 (motion-only pretraining) or 2 (motion-video multi-task)")
    for key in ("steps", "checkpoint_every", "log_every", "print_every", "grad_accum", "max_nan_streak"):
        if getattr(t, key) < 1:
            problems.append(f"train.{key}={getattr(t, key)} must be >= 1")
    if t.count_collectives_every < 0:
        problems.append(f"train.count_collectives_every={t.count_collectives_every} must be >= 0 (0 = never)")
    problems += _logger_problems(t)
    if not t.collective_timeout > 0:
        problems.append(f"train.collective_timeout={t.collective_timeout} must be > 0 seconds (PyTorch's default is 1800)")
    if t.termination_grace <= 0:
        problems.append(f"train.termination_grace={t.termination_grace} must be > 0 seconds (Kubernetes' default is 30)")
    if t.keep_last < 0:
        problems.append(f"train.keep_last={t.keep_last} must be >= 0 (0 keeps every checkpoint)")
    if t.lr <= 0 or t.weight_decay < 0 or t.warmup_steps < 0 or t.grad_clip < 0:
        problems.append("train.lr must be > 0 and train.weight_decay, train.warmup_steps, train.grad_clip >= 0")
    if len(t.adam_betas) != 2 or not all(0 <= b < 1 for b in t.adam_betas):
        problems.append(f"train.adam_betas={list(t.adam_betas)} must be two numbers in [0, 1)")
    if t.schedule not in ("constant", "cosine", "linear"):
        problems.append(f"train.schedule={t.schedule!r}: choose 'constant', 'cosine' or 'linear'")
    if not 0 <= t.min_lr_ratio <= 1:
        problems.append(f"train.min_lr_ratio={t.min_lr_ratio} must be in [0, 1]")
    if not 0 <= t.ema_decay < 1:
        problems.append(f"train.ema_decay={t.ema_decay} must be in [0, 1) (0 = off)")
    if t.precision not in ("fp32", "bf16"):
        problems.append(f"train.precision={t.precision!r}: choose 'fp32' or 'bf16'")
    if t.resume not in ("auto", "never") and not (Path(t.resume) / "meta.json").is_file():
        problems.append(f"train.resume={t.resume!r} is neither 'auto', 'never' nor a complete checkpoint folder (a step-N "
                        "folder with meta.json; an interrupted save leaves a .partial folder, which cannot be loaded)")
    if t.init_wan and t.init_from:
        problems.append("set only one of train.init_wan (pretrained Wan) and train.init_from (an EchoMotion checkpoint)")
    return problems + _validation_problems(t)


def _validation_problems(t: TrainConfig) -> list[str]:
    """In-loop validation and sampling keys; the held-out folder is checked here, before any training step is spent."""
    problems = [f"train.{key}={getattr(t, key)} must be >= 0 (0 = off)" for key in ("eval_every", "sample_every")
                if getattr(t, key) < 0]
    if t.eval_clips < 1:
        problems.append(f"train.eval_clips={t.eval_clips} must be >= 1")
    if t.sample_clips < 2:
        problems.append(f"train.sample_clips={t.sample_clips} must be >= 2 (the evaluation's baselines pair each clip "
                        "with another)")
    if not t.eval_sigmas or not all(0 < s < 1 for s in t.eval_sigmas):
        problems.append(f"train.eval_sigmas={list(t.eval_sigmas)} must be one or more noise levels strictly between 0 "
                        "(clean) and 1 (pure noise), e.g. [0.25, 0.5, 0.75]")
    if t.eval_every <= 0 and t.sample_every <= 0:
        return problems
    if t.eval_data is None:
        problems.append("train.eval_every / train.sample_every need held-out clips: set train.eval_data to a local folder "
                        "of MDS shards (HuMoVe-mini: <root>/heldout), or set both to 0")
    elif not (Path(t.eval_data) / "index.json").is_file():
        problems.append(f"train.eval_data={t.eval_data} holds no index.json: point it at a local folder of MDS shards "
                        "(HuMoVe-mini: <root>/heldout; copy a remote split to local disk first)")
    elif t.sample_every > 0 and not (Path(t.eval_data).parent / "dataset.json").is_file():
        problems.append(f"train.sample_every needs {Path(t.eval_data).parent / 'dataset.json'} (the video codec and fps "
                        "the data tools record): use a split folder inside a dataset written by the data tools, or set "
                        "train.sample_every=0")
    return problems


def _parallel_problems(p: ParallelConfig, m: ModelConfig, t: TrainConfig) -> list[str]:
    """Layout checks that need no world size (parallel.mesh checks the product against it at start-up)."""
    problems = []
    for key in ("dp_replicate", "sp", "tp", "ac_every"):
        if getattr(p, key) < 1:
            problems.append(f"parallel.{key}={getattr(p, key)} must be >= 1")
    if p.dp_shard == 0 or p.dp_shard < -1:
        problems.append(f"parallel.dp_shard={p.dp_shard} must be >= 1, or -1 to fill the world size")
    if p.tp >= 1 and p.sp >= 1 and m.num_heads % (p.tp * p.sp):
        valid = [(t, s) for t in range(1, m.num_heads + 1) for s in range(1, m.num_heads + 1) if m.num_heads % (t * s) == 0]
        problems.append(
            f"model.num_heads={m.num_heads} is not divisible by parallel.tp x parallel.sp = {p.tp} x {p.sp}: TP splits the "
            f"heads and Ulysses scatters the rest; valid (tp, sp) pairs: {', '.join(f'({t}, {s})' for t, s in valid)}"
        )
    if p.tp > 1 and (m.ffn_dim % p.tp or m.dim % p.tp):
        problems.append(f"parallel.tp={p.tp} must divide model.dim={m.dim} and model.ffn_dim={m.ffn_dim}")
    if p.engine not in ("fsdp", "deepspeed"):
        problems.append(f"parallel.engine={p.engine!r}: choose 'fsdp' (torch FSDP2) or 'deepspeed' (ZeRO)")
    if p.engine == "deepspeed":
        if p.tp > 1:
            problems.append("parallel.engine=deepspeed does not combine with tensor parallel: set parallel.tp=1, or use engine=fsdp")
        if p.dp_replicate > 1:
            problems.append("parallel.engine=deepspeed shards over all data-parallel ranks: set parallel.dp_replicate=1")
        if t.ema_decay > 0:
            problems.append("train.ema_decay > 0 keeps an EMA copy the DeepSpeed engine does not checkpoint: set "
                            "train.ema_decay=0 with parallel.engine=deepspeed, or use engine=fsdp")
        if t.async_checkpoint:
            problems.append("train.async_checkpoint=true: DeepSpeed's engine writes its own checkpoint files, synchronously "
                            "here; leave train.async_checkpoint unset (or false) with parallel.engine=deepspeed")
        if p.zero_stage not in (1, 2, 3):
            problems.append(f"parallel.zero_stage={p.zero_stage}: choose 1, 2 or 3")
        if p.deepspeed_config is not None and not Path(p.deepspeed_config).is_file():
            problems.append(f"parallel.deepspeed_config={p.deepspeed_config} is not a file")
    if p.param_dtype == "bf16" and t.precision != "bf16":
        problems.append("parallel.param_dtype=bf16 gathers bf16 weights, which only bf16 autocast can multiply: set "
                        "train.precision=bf16 (CUDA), or keep parallel.param_dtype=fp32")
    for key in ("param_dtype", "reduce_dtype"):
        if getattr(p, key) not in ("fp32", "bf16"):
            problems.append(f"parallel.{key}={getattr(p, key)!r}: choose 'fp32' or 'bf16'")
    if p.activation_checkpointing not in ("none", "full", "every_k"):
        problems.append(f"parallel.activation_checkpointing={p.activation_checkpointing!r}: choose 'none', 'full' or 'every_k'")
    return problems + _fp8_problems(p)


FP8_RECIPES = {"te": ("delayed", "current"), "torchao": ("current", "rowwise")}  # per backend; the first is the default


def fp8_recipe(p: ParallelConfig) -> str:
    """The scaling recipe parallel.fp8 runs with: parallel.fp8_recipe, or the backend's default."""
    return p.fp8_recipe or FP8_RECIPES[p.fp8][0]


def _fp8_problems(p: ParallelConfig) -> list[str]:
    if p.fp8 == "none":
        return []
    if p.fp8 not in FP8_RECIPES:
        return [f"parallel.fp8={p.fp8!r}: choose 'none', 'te' (Transformer Engine, CUDA only) or 'torchao'"]
    problems = []
    if p.fp8 == "te" and p.activation_checkpointing != "none":
        problems.append("parallel.fp8=te with activation checkpointing would recompute the checkpointed blocks outside FP8 "
                        "autocast (in bf16): set parallel.activation_checkpointing=none, or parallel.fp8=torchao/none")
    if fp8_recipe(p) not in FP8_RECIPES[p.fp8]:
        problems.append(f"parallel.fp8_recipe={p.fp8_recipe!r} with parallel.fp8={p.fp8}: choose one of "
                        f"{list(FP8_RECIPES[p.fp8])} (or leave it unset for {FP8_RECIPES[p.fp8][0]!r})")
    if p.tp > 1:
        problems.append(f"parallel.fp8={p.fp8} with parallel.tp > 1 is not supported (the FP8 linears are not DTensor "
                        "tensor-parallel here): use parallel.tp=1 with FSDP/SP, or parallel.fp8=none")
    return problems
