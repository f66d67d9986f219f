"""Transport: shard and file downloads that retry transient object-store failures, and the Stream that uses them.

- Object stores fail transiently: each file download is retried with exponential backoff, then stops with an error naming the
  file, the endpoint and what to check. A shard whose size or hash is wrong stops with an error naming the shard. A cached
  shard failing the size or hash check is deleted too, since streaming trusts any shard file it finds in the cache.
- A remote stream's cache folder is named after its URL (echomotion/data/loader.py), and is cleared when the remote
  index.json differs from the cached one, since streaming reads a cached index.json instead of the remote one (a new
  source path or a rewritten dataset would otherwise train on the old shards).
"""
from __future__ import annotations

import logging
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

from streaming import Stream
from streaming.base.constant import TICK
from streaming.base.format import get_index_basename
from streaming.base.hashing import get_hash
from streaming.base.storage import CloudDownloader
from streaming.base.world import World

from ..files import atomic_write
from .errors import DataError, ShardCorruptError, ShardFetchError

log = logging.getLogger(__name__)
T = TypeVar("T")

_TRANSIENT_S3_CODES = frozenset({
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeoutException",
})


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
