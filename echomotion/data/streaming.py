"""HuMoVe MDS shards (a local folder or s3://) streamed into uniform, padded batches for training.

Why it is built this way:
- mosaicml-streaming fixes one global sample order per epoch (from the seed and `num_canonical_nodes`), caches shards per
  node, gives every rank of a TP x SP group the same samples (`replication`) and resumes mid-epoch from a five-number state.
  Nothing here reorders samples, so that state alone makes resume exact.
- Uniform batches come from `batching_method="per_stream"`: each global batch is drawn from one stream, and a stream holds
  one latent shape (one shape bucket; motion-only streams may vary in length and are padded). A per-rank bucketing buffer
  would instead have to be saved in the resume state, and it lives inside DataLoader worker processes where the trainer
  cannot see it. Per-stream batching also keeps all ranks on the same stream at each step (the same task, video or not).
- Object stores fail transiently: each file download is retried with exponential backoff, then stops with an error naming the
  file, the endpoint and what to check. A shard whose size or hash is wrong, or that holds a sample that cannot be decoded,
  stops with an error naming the shard. A cached shard failing the size or hash check is deleted too, since streaming
  trusts any shard file it finds in the cache.
- A remote stream's cache folder is named after its URL, and is cleared when the remote index.json differs from the cached
  one, since streaming reads a cached index.json instead of the remote one (a new data.path or a rewritten dataset would
  otherwise train on the old shards).
"""
from __future__ import annotations

import hashlib
import logging
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from math import gcd
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import numpy as np
import torch
from streaming import Stream, StreamingDataLoader, StreamingDataset
from streaming.base.constant import TICK
from streaming.base.dataset import _ShardState
from streaming.base.format import get_index_basename
from streaming.base.hashing import get_hash, get_hashes
from streaming.base.storage import CloudDownloader
from streaming.base.util import clean_stale_shared_memory
from streaming.base.world import World

from ..config import Config, DataConfig
from ..files import atomic_write
from ..motion.smpl import MOTION_FEATURE_DIM, MOTION_TOKENS_PER_FRAME, MotionStats
from .encoders import pad_text
from .schema import decode_sample

log = logging.getLogger(__name__)
T = TypeVar("T")

STATS_FILENAME = "motion_stats.json"


class DataError(RuntimeError):
    """The data cannot be read; the message names the file and what to check."""


class ShardFetchError(DataError):
    """A file could not be downloaded (after retries, for transient failures)."""


class ShardCorruptError(DataError):
    """A shard is truncated, fails its hash, or holds a sample that cannot be decoded."""


# ----------------------------------------------------------------------------------------------------------------------
# Retries


_TRANSIENT_S3_CODES = {
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeoutException",
}


def is_transient(err: BaseException) -> bool:
    """Whether retrying can help: connection failures, timeouts, throttling and 5xx, not missing objects or bad keys."""
    from botocore.exceptions import ClientError, ConnectionError as BotoConnectionError, HTTPClientError, IncompleteReadError
    from s3transfer.exceptions import RetriesExceededError

    if isinstance(err, ClientError):
        status = int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        code = str(err.response.get("Error", {}).get("Code", ""))
        return status >= 500 or status == 429 or code in _TRANSIENT_S3_CODES or code.startswith("5")
    return isinstance(
        err, (BotoConnectionError, HTTPClientError, IncompleteReadError, RetriesExceededError, ConnectionError, TimeoutError)
    )


def with_retries(
    fn: Callable[[], T],
    *,
    what: str,
    retries: int,
    base_delay: float,
    max_delay: float,
    on_retry: Optional[Callable[[], None]] = None,
) -> T:
    """Call `fn`, retrying transient failures `retries` times with exponential backoff (and 0-25% jitter so that the
    ranks of a job do not retry in lockstep). Non-transient failures and the last transient one propagate."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as e:
            if attempt == retries or not is_transient(e):
                raise
            delay = min(max_delay, base_delay * 2**attempt) * (1 + 0.25 * random.random())
            log.warning("%s failed (attempt %d of %d): %s; retrying in %.1f s", what, attempt + 1, retries + 1, e, delay)
            if on_retry is not None:
                on_retry()
            time.sleep(delay)
    raise AssertionError("unreachable")


def _endpoint(remote: str) -> str:
    if remote.startswith("s3://"):
        return f"S3 endpoint {os.environ.get('S3_ENDPOINT_URL') or 'AWS default (S3_ENDPOINT_URL unset)'}"
    return f"the {remote.split('://')[0]} object store"


def download(
    downloader: CloudDownloader,
    remote: str,
    local: str,
    *,
    timeout: float,
    retries: int,
    base_delay: float,
    max_delay: float,
) -> None:
    """Download one file with streaming's downloader for its scheme, retrying transient failures; else ShardFetchError."""
    try:
        with_retries(
            lambda: downloader.download(remote, local, timeout),
            what=f"download of {remote}",
            retries=retries,
            base_delay=base_delay,
            max_delay=max_delay,
            on_retry=downloader.clean_up,  # a fresh client drops pooled connections to a restarted server
        )
    except Exception as e:
        raise ShardFetchError(_fetch_message(remote, e, retries)) from e


def _fetch_message(remote: str, err: BaseException, retries: int) -> str:
    where = _endpoint(remote)
    if is_transient(err):
        return (
            f"could not download {remote} from {where} after {retries + 1} attempts: {err}. Check that the store is up and "
            "reachable from this node (S3_ENDPOINT_URL, network, proxy), or raise data.download_retry / "
            "data.retry_max_delay to ride out longer outages."
        )
    return (
        f"downloading {remote} from {where} failed with a non-retryable error: {err}. Check that the object exists "
        "(the dataset path and prefix), and the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE)."
    )


# ----------------------------------------------------------------------------------------------------------------------
# Streams and dataset


class RetryingStream(Stream):
    """A Stream whose downloads retry transient failures with backoff, whose cache follows the remote index.json, and whose
    shards are checked on first use: after download, and for a stream read in place, against index.json's hashes too."""

    def __init__(self, *, retry_base_delay: float, retry_max_delay: float, **kwargs: Any):
        super().__init__(**kwargs)
        self.retry_base_delay = retry_base_delay
        self.retry_max_delay = retry_max_delay

    def _download_file(self, from_basename: str, to_basename: Optional[str] = None) -> str:
        local = os.path.join(self.local, self.split, to_basename or from_basename)
        if self.remote is None:
            if not os.path.exists(local):
                raise ShardFetchError(f"{local} is missing, and a stream read in place has nowhere to fetch it from")
            return local
        remote = os.path.join(self.remote, self.split, from_basename)
        download(
            self._downloader,
            remote,
            local,
            timeout=self.download_timeout,
            retries=self.download_retry,
            base_delay=self.retry_base_delay,
            max_delay=self.retry_max_delay,
        )
        return local

    def get_shards(self, world: World, allow_unsafe_types: bool) -> list[Any]:
        if self.remote is not None:
            self._sync_index(world)
        return super().get_shards(world, allow_unsafe_types)

    def _sync_index(self, world: World) -> None:
        """Make the cached index.json the remote one: the node's leader clears the cache when they differ (the dataset was
        rewritten), the other ranks wait until the cache holds the index they fetched themselves."""
        basename = get_index_basename()
        cached = os.path.join(self.local, self.split, basename)
        with tempfile.TemporaryDirectory(prefix="echomotion-index-") as tmp:
            download(
                self._downloader,
                os.path.join(self.remote, self.split, basename),  # type: ignore[arg-type]
                os.path.join(tmp, basename),
                timeout=self.download_timeout,
                retries=self.download_retry,
                base_delay=self.retry_base_delay,
                max_delay=self.retry_max_delay,
            )
            remote_index = Path(tmp, basename).read_bytes()
        current = _read_or_none(cached)
        if world.is_local_leader:
            if current is not None and current != remote_index:
                log.warning("%s/index.json changed since it was cached: clearing the cache %s", self.remote, self.local)
                shutil.rmtree(self.local)
            if current != remote_index:
                os.makedirs(os.path.dirname(cached), exist_ok=True)
                atomic_write(Path(cached), lambda tmp: tmp.write_bytes(remote_index))  # no rank reads half an index
            return
        deadline = time.time() + self.download_timeout
        while current != remote_index:
            if time.time() > deadline:
                raise DataError(
                    f"{cached} still differs from {self.remote}/index.json after {self.download_timeout:.0f} s: the node's "
                    "first rank did not update it (see its log), or the dataset was rewritten while this job started. "
                    "Restart once the dataset is complete, or raise data.download_timeout."
                )
            time.sleep(TICK)
            current = _read_or_none(cached)

    def set_up_local(self, shards: list[Any], cache_usage_per_shard: Any) -> None:
        super().set_up_local(shards, cache_usage_per_shard)
        if self.remote is None and self.validate_hash:
            cache_usage_per_shard[:] = 0  # "not present": each shard then passes prepare_shard's hash check once per run

    def prepare_shard(self, shard: Any) -> int:
        names = ", ".join(raw.basename for raw, _ in shard.file_pairs)
        where = self.remote or self.local
        if self.validate_hash:
            self._check_hash_listed(shard)
        try:
            delta = super().prepare_shard(shard)
        except DataError:
            raise
        except Exception as e:  # checksum failure, undecompressable zip
            self._drop_cached(shard)
            raise ShardCorruptError(f"shard {names} of {where} is corrupt: {e}. {self._remedy()}") from e
        for raw, _ in shard.file_pairs:
            path = os.path.join(self.local, self.split, raw.basename)
            size = os.path.getsize(path)
            if size != raw.bytes:
                self._drop_cached(shard)
                raise ShardCorruptError(
                    f"shard {raw.basename} of {where} has {size} bytes but index.json says {raw.bytes}: the object is "
                    f"truncated or was rewritten after the index. {self._remedy()}"
                )
            if self.remote is None and self.validate_hash:  # streaming only checks hashes after a download
                with open(path, "rb") as f:
                    if get_hash(self.validate_hash, f.read()) != raw.hashes[self.validate_hash]:
                        raise ShardCorruptError(
                            f"shard {raw.basename} of {where} fails its {self.validate_hash} check against index.json: "
                            f"it changed after the index was written. {self._remedy()}"
                        )
        return delta

    def _check_hash_listed(self, shard: Any) -> None:
        """streaming can only check hashes that the writer stored; a missing one is a setting to fix, not a corrupt shard."""
        for raw, zip_info in shard.file_pairs:
            for info in (raw, zip_info):
                if info is not None and self.validate_hash not in info.hashes:
                    raise DataError(
                        f"data.validate_hash={self.validate_hash!r}, but index.json of {self.remote or self.local} lists "
                        f"{', '.join(sorted(info.hashes)) or 'no'} hashes for {info.basename}: set data.validate_hash to one "
                        "of those (or null), or rewrite the dataset with that hash"
                    )

    def _drop_cached(self, shard: Any) -> None:
        """Delete a bad shard's cached files (raw and zip), so that a rerun with the same cache downloads it again instead
        of trusting it; a stream read in place keeps its files, which are the dataset itself."""
        if self.remote is None:
            return
        for pair in shard.file_pairs:
            for info in pair:
                if info is not None:
                    path = os.path.join(self.local, self.split, info.basename)
                    if os.path.exists(path):
                        os.remove(path)

    def _remedy(self) -> str:
        """What to do about a bad shard: a cached copy is gone, a stream read in place needs its files rewritten."""
        if self.remote is None:
            return "Rewrite the dataset (or restore the shard from a good copy)."
        return (
            "Its cached copy was deleted; re-upload the shard (or rewrite the dataset) and make sure uploads finish "
            "before training starts."
        )


def _read_or_none(path: str) -> Optional[bytes]:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        return None


@dataclass
class Item:
    """One decoded sample as the collate function needs it."""

    clip_id: str
    caption: str
    video: Optional[torch.Tensor]  # [C, F_lat, H_lat, W_lat], stored dtype; None for motion-only samples
    motion: torch.Tensor  # [F, 235] normalized, float32
    text: torch.Tensor  # [text_length, text_dim], stored dtype (float16)


def crop_motion(motion: torch.Tensor, frames: int, seed: int, epoch: int, sample_id: int) -> torch.Tensor:
    """A random `frames`-long window of a longer motion-only clip (shorter clips are returned whole; collate pads them).

    The window depends only on (seed, epoch, sample id): no RNG state lives in the DataLoader workers, so a resumed run
    (streaming restores the epoch and position) crops exactly as the uninterrupted one, and each epoch sees new windows.
    """
    extra = motion.shape[0] - frames
    if extra <= 0:
        return motion
    start = int(np.random.default_rng([int(seed), int(epoch), int(sample_id)]).integers(extra + 1))
    return motion[start : start + frames]


def _reporting_exit(loop: Callable[[Any], None], it: Any) -> None:
    """Run one of streaming's epoch loops, which reports its exit to `it` only when it returns: report it on an error too."""
    try:
        loop(it)
    except BaseException:
        it.on_exit()
        raise


class HuMoVeStreamingDataset(StreamingDataset):
    """StreamingDataset of `Item`s: decodes, normalizes motion, and turns every read failure into an error naming the shard.

    streaming downloads ahead in a background thread; when that thread fails, streaming ends the epoch early and quietly.
    This class keeps the thread's exception and raises it, so an epoch is either complete or fails loudly. Two of
    streaming's waits have no timeout and would spin forever after such a failure; the overrides below end them:
    - the end of an epoch waits until its three loops (download, ready, yield) have each reported their exit, and a loop
      that raised never reports it;
    - a reader that needs a shard another thread is downloading waits for it to leave PREPARING, which a failed download
      never did.
    """

    def __init__(self, *, stats: MotionStats, motion_frames: Optional[int] = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.stats = stats
        self.motion_frames = motion_frames
        self._background_error: Optional[BaseException] = None

    def on_exception(self, future: Any) -> None:
        err = future.exception()
        if err is not None:
            if self._background_error is None:
                self._background_error = err
            self._event.set()  # stop streaming's other threads; the error is raised by the reading thread

    def _prepare_thread(self, it: Any) -> None:
        _reporting_exit(super()._prepare_thread, it)

    def _ready_thread(self, it: Any) -> None:
        _reporting_exit(super()._ready_thread, it)

    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        try:
            super().prepare_shard(shard_id, blocking)
        except DataError:  # raised by RetryingStream after streaming marked the shard PREPARING (and let go of the lock)
            with self._cache_filelock:
                self._shard_states[shard_id] = _ShardState.REMOTE  # a waiting reader now downloads it itself, or fails
            raise

    def _raise_background_error(self) -> None:
        if self._background_error is not None:
            raise self._background_error

    def __iter__(self):  # type: ignore[override]
        self._background_error = None
        yield from super().__iter__()
        self._raise_background_error()

    def get_item(self, sample_id: int, retry: int = 7) -> Item:  # type: ignore[override]
        self._raise_background_error()
        shard_id, index = self.spanner[sample_id]
        try:
            record = super().get_item(sample_id, retry)
        except DataError:
            raise
        except Exception as e:
            self._raise_background_error()
            raise self._read_error(shard_id, index, e) from e
        try:
            return self._to_item(record, sample_id)
        except Exception as e:
            raise self._read_error(shard_id, index, e) from e

    def _to_item(self, record: dict[str, Any], sample_id: int) -> Item:
        s = decode_sample(record)
        motion = s.features()  # stored at preparation time (schema v2), computed here for v1 records
        if self.motion_frames is not None and s.video_latent is None:
            # next_epoch is the epoch being iterated + 1 (streaming sets it when an epoch starts); 0 outside iteration
            motion = crop_motion(motion, self.motion_frames, self.shuffle_seed, max(self.next_epoch - 1, 0), sample_id)
        return Item(s.clip_id, s.caption, s.video_latent, self.stats.normalize(motion), s.text_embedding)

    def _read_error(self, shard_id: int, index: int, err: BaseException) -> ShardCorruptError:
        shard = self.shards[shard_id]
        stream = self.streams[int(self.stream_per_shard[shard_id])]
        raw = shard.file_pairs[0][0]
        path = os.path.join(stream.local, stream.split, raw.basename)
        size = os.path.getsize(path) if os.path.exists(path) else None
        size_note = "" if size is None or size == raw.bytes else f" (it has {size} bytes, index.json says {raw.bytes})"
        return ShardCorruptError(
            f"sample {index} of shard {raw.basename} ({path}, stream {stream.remote or stream.local}) cannot be read"
            f"{size_note}: {type(err).__name__}: {err}. Rewrite or re-upload that shard."
        )


# ----------------------------------------------------------------------------------------------------------------------
# Batches


@dataclass
class Batch:
    """A training batch. Every sample shares one latent shape; motion and text are zero-padded with masks / lengths."""

    video: Optional[torch.Tensor]  # [B, C, F_lat, H_lat, W_lat] in the stored dtype, or None for a motion-only batch
    motion: torch.Tensor  # [B, F, 235] normalized float32, F padded to the longest clip (or
    # data.motion_frames for motion-only batches) and to the sp multiple
    motion_mask: torch.Tensor  # [B, F] bool, True = a real frame
    text: torch.Tensor  # [B, text_len, text_dim] stored dtype, zero-padded (Wan pads text with zeros, unmasked)
    text_lengths: torch.Tensor  # [B] long, true lengths (after truncation)
    has_video: torch.Tensor  # [B] bool
    clip_ids: list[str]
    captions: list[str]

    def __len__(self) -> int:
        return len(self.clip_ids)

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Batch":
        return Batch(
            video=None if self.video is None else fn(self.video),
            motion=fn(self.motion),
            motion_mask=fn(self.motion_mask),
            text=fn(self.text),
            text_lengths=fn(self.text_lengths),
            has_video=fn(self.has_video),
            clip_ids=self.clip_ids,
            captions=self.captions,
        )

    def pin_memory(self) -> "Batch":
        """Called by the DataLoader (pin_memory=True) so host-to-device copies can be asynchronous."""
        return self._map(torch.Tensor.pin_memory)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))


def motion_frame_multiple(sp_multiple: int) -> int:
    """Smallest frame count step that keeps frames x 51 tokens divisible by `sp_multiple`."""
    return sp_multiple // gcd(MOTION_TOKENS_PER_FRAME, sp_multiple)


class Collate:
    """Items -> Batch. Pads motion per modality for sequence parallelism (video token counts are fixed by the latent grid;
    parallel/ pads those at its token-sharding point), pads or truncates text to `text_len`."""

    def __init__(self, text_len: int, sp_multiple: int = 1, motion_frames: Optional[int] = None):
        self.text_len = text_len
        self.frame_step = motion_frame_multiple(sp_multiple)
        self.motion_frames = motion_frames
        self._warned_truncation = False

    def __call__(self, items: list[Item]) -> Batch:
        if not items:
            raise ValueError("collate got an empty batch")
        has_video = [it.video is not None for it in items]
        if any(has_video) and not all(has_video):
            raise DataError(
                f"batch mixes paired and motion-only samples ({_ids(items)}): a stream must hold one kind; put motion-only "
                "samples in data.motion_only_path"
            )
        video = None
        if all(has_video):
            shapes = {tuple(it.video.shape) for it in items}  # type: ignore[union-attr]
            if len(shapes) > 1:
                raise DataError(
                    f"batch mixes latent shapes {sorted(shapes)} ({_ids(items)}): each stream must hold one latent shape "
                    "(write one stream per resolution / length bucket)"
                )
            video = torch.stack([it.video for it in items])  # type: ignore[misc]

        most = max(it.motion.shape[0] for it in items)
        if self.motion_frames is not None and video is None and most > self.motion_frames:
            raise DataError(f"a motion-only clip has {most} frames, more than data.motion_frames={self.motion_frames}: "
                            "the dataset crops them (build it with motion_frames, as build_dataloader does)")
        frames = most if self.motion_frames is None or video is not None else self.motion_frames
        frames = -(-frames // self.frame_step) * self.frame_step
        motion = torch.zeros(len(items), frames, MOTION_FEATURE_DIM)
        motion_mask = torch.zeros(len(items), frames, dtype=torch.bool)
        for i, it in enumerate(items):
            motion[i, : it.motion.shape[0]] = it.motion
            motion_mask[i, : it.motion.shape[0]] = True

        text_dims = {it.text.shape[1] for it in items}
        if len(text_dims) > 1:
            raise DataError(f"batch mixes text embedding widths {sorted(text_dims)} ({_ids(items)})")
        longest = max(it.text.shape[0] for it in items)
        if longest > self.text_len and not self._warned_truncation:
            log.warning("text embeddings of %d tokens truncated to text_len=%d (shown once)", longest, self.text_len)
            self._warned_truncation = True
        text = torch.stack([pad_text(it.text, self.text_len) for it in items])
        lengths = torch.tensor([min(it.text.shape[0], self.text_len) for it in items], dtype=torch.long)

        return Batch(
            video=video,
            motion=motion,
            motion_mask=motion_mask,
            text=text,
            text_lengths=lengths,
            has_video=torch.tensor(has_video),
            clip_ids=[it.clip_id for it in items],
            captions=[it.caption for it in items],
        )


def share_by_filename(worker_id: int) -> None:
    """A worker hands its batches over as named shared-memory files instead of one file descriptor per tensor, which
    costs the main process a new authenticated connection to the worker for every tensor of every batch (about 1 ms
    each on a busy CPU, docs/PERFORMANCE.md "Data loading"). Set in the workers only: the main process and the rest of
    training keep torch's default."""
    torch.multiprocessing.set_sharing_strategy("file_system")


def _ids(items: list[Item]) -> str:
    ids = [it.clip_id for it in items]
    return ", ".join(ids[:4]) + (", ..." if len(ids) > 4 else "")


class HuMoVeDataLoader(StreamingDataLoader):
    """StreamingDataLoader that counts `Batch`es (streaming's own counter only knows dicts, tensors and sequences).

    Resume: `state_dict()` on rank 0 after a step, saved with the checkpoint; `load_state_dict()` on every rank before
    iterating. The state carries the epoch, the position, the seed and num_canonical_nodes; keep the global batch
    (batch_size x world_size / replication) the same, since per-stream batching resumes at whole global batches.
    """

    def _get_batch_size(self, batch: Any) -> int:
        return len(batch) if isinstance(batch, Batch) else super()._get_batch_size(batch)


# ----------------------------------------------------------------------------------------------------------------------
# Building


def _is_remote(path: str) -> bool:
    return "://" in path


def load_motion_stats(d: DataConfig) -> MotionStats:
    """The motion normalization stats: `data.stats_path`, else motion_stats.json next to the main stream's index.json."""
    if d.path is None and d.stats_path is None:
        raise DataError("data.path is not set, so there are no motion stats to load; set data.path or data.stats_path")
    src = d.stats_path or os.path.join(d.path, STATS_FILENAME)  # type: ignore[arg-type]
    if not _is_remote(src):
        if not os.path.exists(src):
            raise DataError(f"motion stats {src} not found: the dataset tools write it; or set data.stats_path")
        return MotionStats.load(src)
    with tempfile.TemporaryDirectory(prefix="echomotion-stats-") as tmp:
        local = os.path.join(tmp, STATS_FILENAME)
        downloader = CloudDownloader.get(src)
        download(
            downloader,
            src,
            local,
            timeout=d.download_timeout,
            retries=d.download_retry,
            base_delay=d.retry_base_delay,
            max_delay=d.retry_max_delay,
        )
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


def _cache_folder(cache: str, name: str, remote: str) -> str:
    """One cache folder per dataset URL: a stream cached under its name alone would keep the old data's index and shards
    when data.path changes."""
    return os.path.join(cache, f"{name}-{hashlib.sha1(remote.rstrip('/').encode()).hexdigest()[:12]}")


_shm_cleaned = False


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
    """The dataset and loader for this rank.

    replication: consecutive ranks that must see identical samples (TP x SP of one model-parallel group, placed on
    consecutive ranks). batch_size: per rank, default `data.batch_size`. stats: default from `load_motion_stats`.
    cache_dir: where remote shards are cached when `data.cache_dir` is unset (the trainer passes <run_dir>/data_cache);
    local streams are read in place.
    """
    d = cfg.data
    if d.path is None:
        raise DataError("data.path is not set: point it at a folder or s3://bucket/prefix holding index.json")
    _check_world(rank, world_size, replication)
    if d.validate_hash is not None and d.validate_hash not in get_hashes():
        raise DataError(f"data.validate_hash={d.validate_hash!r} is not a known hash; choose one of {sorted(get_hashes())}")
    batch_size = batch_size or d.batch_size
    cache = d.cache_dir or (str(cache_dir) if cache_dir is not None else None)
    paths: dict[str, str] = {"main": d.path} | ({"motion_only": d.motion_only_path} if d.motion_only_path else {})
    remote = {name: _is_remote(p) for name, p in paths.items()}
    if any(remote.values()) and cache is None:
        raise DataError("a data stream is remote but no cache folder is given; set data.cache_dir")
    if d.cache_limit is not None and not all(remote.values()):
        raise DataError(
            "data.cache_limit evicts shards from the cache, and local streams are read in place (eviction would delete "
            "the dataset's own files); drop data.cache_limit or serve the data from an object store"
        )
    global _shm_cleaned
    if d.clean_stale_shm and not _shm_cleaned:
        clean_stale_shared_memory()  # leftovers of killed runs; only once, since later calls would hit our own datasets
        _shm_cleaned = True
    if stats is None:
        stats = load_motion_stats(d)

    weights = d.proportions or [None, None]
    streams = [
        RetryingStream(
            remote=p if remote[name] else None,  # remote streams are cached per URL; local ones are read in place
            local=_cache_folder(cache, name, p) if remote[name] else p,  # type: ignore[arg-type]
            proportion=w,
            download_retry=d.download_retry,
            download_timeout=d.download_timeout,
            validate_hash=d.validate_hash,
            retry_base_delay=d.retry_base_delay,
            retry_max_delay=d.retry_max_delay,
        )
        for (name, p), w in zip(paths.items(), weights)
    ]
    dataset = HuMoVeStreamingDataset(
        stats=stats,
        motion_frames=d.motion_frames,
        streams=streams,
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
        drop_last=False,
        worker_init_fn=share_by_filename,
    )
    return dataset, loader
