"""Reading MDS shard folders without a StreamingDataset, and the motion normalization statistics computed from them.

Tools (statistics, tests, inspection) need to walk every record of a folder once, in index order, without the shared
memory and cache machinery of `StreamingDataset`. A folder is local, or remote (`s3://...`, endpoint from
S3_ENDPOINT_URL), in which case its index and shards are downloaded one at a time into a temporary folder.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from echomotion.data.schema import Sample, decode_sample
from echomotion.motion import MotionStats

__all__ = ["SHARD_BYTES", "SHARD_HASHES", "is_remote", "iter_records", "iter_samples", "motion_features",
           "compute_motion_stats"]

SHARD_BYTES = 1 << 26  # 64 MiB shards, streaming's default
SHARD_HASHES = ["sha1"]  # recorded in index.json, so readers can check shards (data.validate_hash=sha1)


def is_remote(path: str | Path) -> bool:
    return "://" in str(path)


def iter_records(root: str | Path, download_timeout: float = 600.0) -> Iterator[dict]:
    """Every raw MDS record under `root` (which holds index.json), in index order."""
    from streaming.base.format import reader_from_json
    from streaming.base.storage.download import CloudDownloader

    if not is_remote(root):
        yield from _iter_local(Path(root), reader_from_json)
        return
    remote = str(root).rstrip("/")
    with tempfile.TemporaryDirectory(prefix="echomotion-shards-") as tmp:
        CloudDownloader.direct_download(f"{remote}/index.json", os.path.join(tmp, "index.json"), download_timeout)
        index = json.loads(Path(tmp, "index.json").read_text())
        for shard in index["shards"]:
            files = [shard[k]["basename"] for k in ("raw_data", "raw_meta") if shard.get(k)]
            for name in files:
                CloudDownloader.direct_download(f"{remote}/{name}", os.path.join(tmp, name), download_timeout)
            reader = reader_from_json(tmp, None, shard)
            for i in range(reader.samples):
                yield reader.get_item(i)
            for name in files:
                os.remove(os.path.join(tmp, name))


def _iter_local(root: Path, reader_from_json) -> Iterator[dict]:
    index_path = root / "index.json"
    if not index_path.is_file():
        raise FileNotFoundError(
            f"{index_path} not found: {root} is not an MDS shard folder (tools/prepare_humove.py and "
            "tools/make_humove_mini.py write one index.json per dataset folder)"
        )
    for shard in json.loads(index_path.read_text())["shards"]:
        if shard.get("compression"):
            raise ValueError(f"{root}: shard {shard['raw_data']['basename']} is compressed; these tools write "
                             "uncompressed shards (latents do not compress), so rewrite it without compression")
        reader = reader_from_json(str(root), None, shard)
        for i in range(reader.samples):
            yield reader.get_item(i)


def iter_samples(root: str | Path) -> Iterator[Sample]:
    for rec in iter_records(root):
        yield decode_sample(rec)


def motion_features(s: Sample):
    """The [F, 235] motion features of a decoded sample (the model's diffusion target before normalization)."""
    return s.features()


def compute_motion_stats(root: str | Path, min_std: float = 1e-2) -> MotionStats:
    """Per-feature mean/std over every frame of every sample under `root`."""
    return MotionStats.compute((motion_features(s) for s in iter_samples(root)), min_std=min_std)
