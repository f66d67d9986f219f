"""The data errors: each message names the file or setting and what to check."""
from __future__ import annotations


class DataError(RuntimeError):
    """The data cannot be read; the message names the file and what to check."""


class ShardFetchError(DataError):
    """A file could not be downloaded (after retries, for transient failures)."""


class ShardCorruptError(DataError):
    """A shard is truncated, fails its hash, or holds a sample that cannot be decoded."""
