"""The dataset: decoded `Item`s from the mixture's streams, each checked against its source's kind, with every read failure
turned into an error naming the shard.

mosaicml-streaming fixes one global sample order per epoch (from the seed and `num_canonical_nodes`), caches shards per
node, gives every rank of a TP x SP group the same samples (`replication`) and resumes mid-epoch from a five-number state.
Nothing here reorders samples, so that state alone makes resume exact.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from streaming import StreamingDataset
from streaming.base.dataset import _ShardState

from ..motion.smpl import MotionStats
from .errors import DataError, ShardCorruptError
from .schema import decode_sample

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

    def __init__(self, *, stats: MotionStats, kinds: Sequence[str], labels: Sequence[str],
                 motion_frames: Optional[int] = None, **kwargs: Any):
        """kinds / labels: per stream (in `streams` order), its source kind and how messages name it."""
        super().__init__(**kwargs)
        self.stats = stats
        self.kinds, self.labels = list(kinds), list(labels)
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
            item = self._to_item(record, sample_id)
        except Exception as e:
            raise self._read_error(shard_id, index, e) from e
        self._check_kind(item, int(self.stream_per_shard[shard_id]))
        return item

    def _check_kind(self, item: Item, stream_id: int) -> None:
        """A sample of the other kind means a mislisted folder: it would train the wrong task on part of the mixture."""
        kind = "motion_only" if item.video is None else "paired"
        if kind != self.kinds[stream_id]:
            fix = "data.motion_only_path" if kind == "motion_only" else "data.path"
            raise DataError(
                f"{self.labels[stream_id]} is a {self.kinds[stream_id]} source, but its sample {item.clip_id} is "
                f"{kind}: list that folder with kind: {kind} in data.sources (or as {fix})"
            )

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
