"""Start-up checks that need no model: every configured input exists and can be read, and the layout fits the world size.

A wrong `data.path` used to surface only after the Wan weights had loaded and FSDP had wrapped the model on every GPU; these
checks run first, in the trainer (every rank: each node sees its own filesystem) and in `python -m launcher` before it
prints or starts a command. Config values are checked by `config.validate`; this module checks what they point at.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional

from .config import Config, ConfigError, DataConfig, assets_root, assets_source, data_sources, listed, source_key

INDEX = "index.json"
STATS = "motion_stats.json"  # echomotion.data.loader.STATS_FILENAME (not imported: that pulls in torch and streaming)
NULL_TEXT = "null_text.pt"


def _remote(path: str) -> bool:
    return "://" in path


def _local_problem(key: str, path: str, want_dir: bool = False) -> Optional[str]:
    """None when `path` is a readable file (or a listable folder with `want_dir`), else what is wrong and the key to fix."""
    p = Path(path)
    if not p.exists():
        return f"{key}: {path} does not exist"
    if want_dir != p.is_dir():
        return f"{key}: {path} is {'not a folder' if want_dir else 'a folder, not a file'}"
    if not os.access(p, os.R_OK | (os.X_OK if want_dir else 0)):
        return f"{key}: {path} is not readable by this user (uid {os.getuid()}): check its permissions"
    return None


def _remote_problem(key: str, url: str, d: DataConfig) -> Optional[str]:
    """Fetch the small object `url` with the loader's own downloader and retries: a missing bucket, key or credential is
    reported now, not after the model is built."""
    from streaming.base.storage import CloudDownloader

    from .data.errors import DataError
    from .data.transport import download

    downloader = CloudDownloader.get(url)
    try:
        with tempfile.TemporaryDirectory(prefix="echomotion-preflight-") as tmp:
            download(downloader, url, os.path.join(tmp, os.path.basename(url)), timeout=d.download_timeout,
                     retries=d.download_retry, base_delay=d.retry_base_delay, max_delay=d.retry_max_delay)
    except DataError as e:
        return f"{key}: {e}"
    finally:
        downloader.clean_up()
    return None


def _problem(key: str, path: str, d: DataConfig) -> Optional[str]:
    return _remote_problem(key, path, d) if _remote(path) else _local_problem(key, path)


def _data_problems(d: DataConfig) -> list[str]:
    sources = data_sources(d)
    if not sources:
        return ["no data source is set: point data.path (or data.sources) at a folder or s3://bucket/prefix holding "
                "index.json"]
    problems = [_problem(source_key(d, i), f"{str(s.path).rstrip('/')}/{INDEX}", d) for i, s in enumerate(sources)]
    problems.append(_problem("data.stats_path" if d.stats_path else f"{_assets_key(d)} (its motion_stats.json)",
                             d.stats_path or f"{assets_root(d)}/{STATS}", d))
    problems.append(null_text_problem(d))
    return [p for p in problems if p]


def _assets_key(d: DataConfig) -> str:
    """The key naming the source whose folder holds the default motion stats and null text."""
    return source_key(d, assets_source(d) or 0)


def null_text_path(d: DataConfig) -> str:
    """The empty prompt's embedding: data.null_text_path, else the one the data tools write next to the shards of the
    first paired source (config.assets_root)."""
    return d.null_text_path or f"{assets_root(d)}/{NULL_TEXT}"


def null_text_problem(d: DataConfig) -> Optional[str]:
    """It is read with torch.load, so it must be local."""
    if d.null_text_path:
        return _local_problem("data.null_text_path", d.null_text_path)
    root = assets_root(d)
    if root is None:
        return "no data source is set, so there is no null_text.pt next to it: set data.null_text_path"
    if _remote(root):
        return f"{_assets_key(d)} is remote: copy its null_text.pt locally and set data.null_text_path"
    return _local_problem(f"{_assets_key(d)} (its null_text.pt; or set data.null_text_path)", null_text_path(d))


def _init_problems(cfg: Config) -> list[str]:
    """The starting weights of a fresh run (a resumed one never reads them)."""
    t = cfg.train
    if t.init_wan:  # a single .safetensors / .pth file, or a diffusers folder
        return [p for p in [_local_problem("train.init_wan", t.init_wan, want_dir=Path(t.init_wan).is_dir())] if p]
    if not t.init_from:
        return []
    if t.init_from.endswith(".safetensors"):
        return [p for p in [_local_problem("train.init_from", t.init_from)] if p]
    problem = _local_problem("train.init_from", t.init_from, want_dir=True)
    if problem is None and not (Path(t.init_from) / "meta.json").is_file():
        problem = (f"train.init_from: {t.init_from} is neither an exported .safetensors nor a complete checkpoint folder "
                   "(a step-N folder with meta.json)")
    return [problem] if problem else []


def input_problems(cfg: Config, resuming: bool) -> list[str]:
    """What is missing or unreadable among the run's inputs: data streams (index.json), motion stats, the null-text
    embedding, the SMPL model, the DeepSpeed JSON and, unless `resuming`, the starting weights."""
    problems = _data_problems(cfg.data)
    for key, path in (("model.motion.smpl_model_path", cfg.model.motion.smpl_model_path),
                      ("parallel.deepspeed_config", cfg.parallel.deepspeed_config)):
        if path:
            problems.append(_local_problem(key, path))
    if not resuming:
        problems += _init_problems(cfg)
    return [p for p in problems if p]


def will_resume(cfg: Config) -> bool:
    """Whether the run starts from a checkpoint in (or named by) train.resume, so train.init_* are not read. Only looks
    for a complete one: verifying it (a read of the whole checkpoint, collective, and setting a corrupt one aside) is the
    trainer's job at start-up, once."""
    from .checkpoint import CheckpointManager

    t = cfg.train
    if t.resume == "never":
        return False
    return t.resume != "auto" or CheckpointManager(t.run_dir, 0, 0).latest() is not None


def check_inputs(cfg: Config, world_size: Optional[int] = None) -> None:
    """Raise ConfigError listing every input problem (and, given `world_size`, a layout that does not fit it)."""
    problems = input_problems(cfg, will_resume(cfg))
    if world_size is not None:
        from parallel.mesh import resolve_layout

        try:
            resolve_layout(cfg.parallel, world_size, cfg.model)
        except ConfigError as e:
            problems.append(str(e))
    if problems:
        raise ConfigError(listed("cannot start", problems))
