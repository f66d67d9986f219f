"""The loader builder: the configured sources (`data.sources`, or its shorthand) as one StreamingDataset and loader.

- Uniform batches come from `batching_method="per_stream"`: each global batch is drawn from one stream, and a stream holds
  one latent shape (one bucket: a paired source per resolution and duration; motion-only sources may vary in length and
  are padded). A per-rank bucketing buffer would instead have to be saved in the resume state, and it lives inside
  DataLoader worker processes where the trainer cannot see it. Per-stream batching also keeps all ranks on the same
  stream at each step (the same task, video or not).
- Source weights are streaming's relative `proportion`s: all sources weighed, or none (each sample once an epoch).
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from streaming import StreamingDataLoader
from streaming.base.hashing import get_hashes
from streaming.base.storage import CloudDownloader

from ..config import Config, DataConfig, SourceConfig, assets_root, data_sources, source_key
from ..motion.smpl import MotionStats
from .batch import Batch, Collate
from .dataset import HuMoVeStreamingDataset
from .errors import DataError
from .shards import is_remote
from .transport import RetryingStream, download

STATS_FILENAME = "motion_stats.json"


class HuMoVeDataLoader(StreamingDataLoader):
    """StreamingDataLoader that counts `Batch`es (streaming's own counter only knows dicts, tensors and sequences).

    Resume: `state_dict()` on rank 0 after a step, saved with the checkpoint; `load_state_dict()` on every rank before
    iterating. The state carries the epoch, the position, the seed and num_canonical_nodes; keep the global batch
    (batch_size x world_size / replication) the same, since per-stream batching resumes at whole global batches.
    """

    def _get_batch_size(self, batch: Any) -> int:
        return len(batch) if isinstance(batch, Batch) else super()._get_batch_size(batch)


def load_motion_stats(d: DataConfig) -> MotionStats:
    """The motion normalization stats: `data.stats_path`, else motion_stats.json in `assets_root` (the first paired
    source's folder)."""
    root = assets_root(d)
    if root is None and d.stats_path is None:
        raise DataError("no data source is set, so there are no motion stats to load; set data.path (or data.sources) "
                        "or data.stats_path")
    src = d.stats_path or f"{root}/{STATS_FILENAME}"
    if not is_remote(src):
        if not os.path.exists(src):
            raise DataError(f"motion stats {src} not found: the dataset tools write it; or set data.stats_path")
        return MotionStats.load(src)
    with tempfile.TemporaryDirectory(prefix="echomotion-stats-") as tmp:
        local = os.path.join(tmp, STATS_FILENAME)
        downloader = CloudDownloader.get(src)
        download(downloader, src, local, timeout=d.download_timeout, retries=d.download_retry,
                 base_delay=d.retry_base_delay, max_delay=d.retry_max_delay)
        downloader.clean_up()
        return MotionStats.load(local)


def _check_world(rank: int, world_size: int, replication: int) -> None:
    """mosaicml-streaming reads RANK / WORLD_SIZE / LOCAL_WORLD_SIZE from the environment; make sure they agree with the
    caller, since a mismatch silently gives ranks overlapping samples."""
    env_rank, env_world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if (env_rank, env_world) != (rank, world_size):
        raise DataError(
            f"rank {rank} / world size {world_size} disagree with the environment (RANK={env_rank}, WORLD_SIZE={env_world}) "
            "that mosaicml-streaming partitions by; launch with torchrun (or export RANK, WORLD_SIZE, LOCAL_RANK, "
            "LOCAL_WORLD_SIZE)"
        )
    if world_size > 1 and "LOCAL_WORLD_SIZE" not in os.environ:
        raise DataError(
            "LOCAL_WORLD_SIZE is not set: mosaicml-streaming would treat every rank as its own node (one shard cache and "
            "shared-memory region per rank). Launch with torchrun, or export LOCAL_RANK and LOCAL_WORLD_SIZE."
        )
    if replication < 1 or world_size % replication:
        raise DataError(f"replication {replication} must be >= 1 and divide the world size {world_size}")


def cache_folder(cache: str, kind: str, remote: str) -> str:
    """One cache folder per dataset URL: a stream cached under its kind alone would keep the old data's index and shards
    when its path changes."""
    return os.path.join(cache, f"{kind}-{hashlib.sha1(remote.rstrip('/').encode()).hexdigest()[:12]}")


def _cache_root(d: DataConfig, sources: list[SourceConfig], cache_dir: Optional[str | Path]) -> Optional[str]:
    """Where remote sources are cached (data.cache_dir, else the caller's folder); checks the cache settings."""
    cache = d.cache_dir or (str(cache_dir) if cache_dir is not None else None)
    remote = [is_remote(s.path) for s in sources]  # type: ignore[arg-type]
    if any(remote) and cache is None:
        raise DataError("a data source is remote but no cache folder is given; set data.cache_dir")
    if d.cache_limit is not None and not all(remote):
        raise DataError(
            "data.cache_limit evicts shards from the cache, and local sources are read in place (eviction would delete "
            "the dataset's own files); drop data.cache_limit or serve the data from an object store"
        )
    return cache


def _stream(d: DataConfig, source: SourceConfig, cache: Optional[str]) -> RetryingStream:
    """A remote source is cached per URL; a local one is read in place."""
    path: str = source.path  # type: ignore[assignment]
    remote = is_remote(path)
    return RetryingStream(
        remote=path if remote else None,
        local=cache_folder(cache, source.kind, path) if remote else path,  # type: ignore[arg-type]
        proportion=source.weight,
        download_retry=d.download_retry,
        download_timeout=d.download_timeout,
        validate_hash=d.validate_hash,
        retry_base_delay=d.retry_base_delay,
        retry_max_delay=d.retry_max_delay,
    )


def share_by_filename(worker_id: int) -> None:
    """A worker hands its batches over as named shared-memory files instead of one file descriptor per tensor, which
    costs the main process a new authenticated connection to the worker for every tensor of every batch (about 1 ms
    each on a busy CPU, docs/PERFORMANCE.md "Loader speed"). Set in the workers only: the main process and the rest of
    training keep torch's default."""
    torch.multiprocessing.set_sharing_strategy("file_system")


def build_dataloader(
    cfg: Config,
    *,
    rank: int,
    world_size: int,
    replication: int = 1,
    batch_size: Optional[int] = None,
    stats: Optional[MotionStats] = None,
    cache_dir: Optional[str | Path] = None,
) -> tuple[HuMoVeStreamingDataset, HuMoVeDataLoader]:
    """The dataset and loader over the configured sources for this rank.

    replication: consecutive ranks that must see identical samples (TP x SP of one model-parallel group, placed on
    consecutive ranks). batch_size: per rank, default `data.batch_size`. stats: default from `load_motion_stats`.
    cache_dir: where remote shards are cached when `data.cache_dir` is unset (the trainer passes <run_dir>/data_cache).
    """
    d = cfg.data
    sources = data_sources(d)
    if not sources:
        raise DataError("no data source is set: point data.path (or data.sources) at a folder or s3://bucket/prefix "
                        "holding index.json")
    _check_world(rank, world_size, replication)
    if d.validate_hash is not None and d.validate_hash not in get_hashes():
        raise DataError(f"data.validate_hash={d.validate_hash!r} is not a known hash; choose one of {sorted(get_hashes())}")
    batch_size = batch_size or d.batch_size
    cache = _cache_root(d, sources, cache_dir)
    dataset = HuMoVeStreamingDataset(
        stats=stats if stats is not None else load_motion_stats(d),
        kinds=[s.kind for s in sources],
        labels=[f"{source_key(d, i)} ({s.path})" for i, s in enumerate(sources)],
        motion_frames=d.motion_frames,
        streams=[_stream(d, s, cache) for s in sources],
        epoch_size=d.epoch_size,
        predownload=d.predownload,
        cache_limit=d.cache_limit,
        num_canonical_nodes=d.num_canonical_nodes,
        batch_size=batch_size,
        shuffle=d.shuffle,
        shuffle_algo=d.shuffle_algo,
        shuffle_seed=d.shuffle_seed,
        shuffle_block_size=d.shuffle_block_size,
        batching_method="per_stream",
        replication=replication,
    )
    loader = HuMoVeDataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=d.num_workers,
        prefetch_factor=d.prefetch_factor if d.num_workers > 0 else None,
        collate_fn=Collate(cfg.text_len, d.sp_multiple, d.motion_frames),
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=share_by_filename,
        drop_last=False,
    )
    return dataset, loader
