"""Streaming HuMoVe shards in one process: decoding, collate padding, config checks, retries, and errors that name the shard.

Multi-rank behaviour (exactly once, replication, resume, S3 restart) is in tests/distributed/test_streaming_dist.py.
"""
from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path
from typing import Callable

import pytest
import torch

from echomotion.config import ConfigError, load_config
from echomotion.data.batch import Collate, motion_frame_multiple
from echomotion.data.dataset import Item
from echomotion.data.errors import DataError, ShardCorruptError, ShardFetchError
from echomotion.data.loader import build_dataloader
from echomotion.data.transport import is_transient, with_retries
from echomotion.motion.smpl import MOTION_FEATURE_DIM, MotionStats, SMPLMotion
from tests.s3_server import S3Server, s3_client
from tests.tiny_shards import write_tiny_shards

REPEATS = 40  # failed epochs per run of the hang test: a hang-prone build fails it with probability ~1 - 0.9**40 = 0.985
FAST = ["data.num_workers=0", "data.clean_stale_shm=false", "data.retry_base_delay=0.05", "data.retry_max_delay=0.1"]


def config(path: str, *overrides: str):
    return load_config(None, [f"data.path={path}", "data.batch_size=4", *FAST, *overrides])


def read_all(cfg, **kwargs) -> list:
    _, loader = build_dataloader(cfg, rank=0, world_size=1, **kwargs)
    return list(loader)


def item(clip: str, frames: int, text_tokens: int, video_shape=(4, 2, 3, 3)) -> Item:
    return Item(
        clip_id=clip,
        caption=clip,
        video=None if video_shape is None else torch.randn(video_shape),
        motion=torch.randn(frames, MOTION_FEATURE_DIM),
        text=torch.randn(text_tokens, 8),
    )


# --------------------------------------------------------------------------------------------------------------- collate


def test_collate_pads_motion_for_sp_and_text_to_the_longest_prompt() -> None:
    items = [item("a", 5, 3), item("b", 9, 6)]
    batch = Collate(text_len=4, sp_multiple=4)(items)
    assert batch.video is not None and batch.video.shape == (2, 4, 2, 3, 3)
    assert batch.motion.shape == (2, 12, MOTION_FEATURE_DIM)  # longest clip 9 -> 12: 12 * 51 tokens is a multiple of 4
    assert batch.motion_mask.sum(1).tolist() == [5, 9]
    assert torch.equal(batch.motion[1, :9], items[1].motion) and not batch.motion[0, 5:].any()
    assert batch.text.shape == (2, 4, 8) and batch.text_lengths.tolist() == [3, 4]
    assert torch.equal(batch.text[0, :3], items[0].text) and not batch.text[0, 3:].any()
    assert torch.equal(batch.text[1], items[1].text[:4])
    assert batch.has_video.tolist() == [True, True] and batch.clip_ids == ["a", "b"] and len(batch) == 2
    roomy = Collate(text_len=16)(items)  # the batch's longest prompt (6), not text_len: the device pads the rest
    assert roomy.text.shape == (2, 6, 8) and roomy.text_lengths.tolist() == [3, 6]
    assert torch.equal(roomy.text[1], items[1].text) and not roomy.text[0, 3:].any()


def test_collate_warns_once_on_text_truncation(caplog: pytest.LogCaptureFixture) -> None:
    collate = Collate(text_len=2)
    with caplog.at_level(logging.WARNING, logger="echomotion.data.batch"):
        collate([item("a", 3, 5)])
        collate([item("b", 3, 5)])
    assert sum("truncated" in r.message for r in caplog.records) == 1


def test_motion_only_batch_has_no_video_and_mixed_batches_are_refused() -> None:
    batch = Collate(text_len=4)([item("a", 3, 2, None), item("b", 7, 2, None)])
    assert batch.video is None and batch.has_video.tolist() == [False, False] and batch.motion.shape[1] == 7
    with pytest.raises(DataError, match="mixes paired and motion-only"):
        Collate(text_len=4)([item("a", 3, 2), item("b", 3, 2, None)])
    with pytest.raises(DataError, match="one latent shape"):
        Collate(text_len=4)([item("a", 3, 2), item("b", 3, 2, (4, 3, 3, 3))])


def test_motion_frame_multiple() -> None:
    assert [motion_frame_multiple(sp) for sp in (1, 2, 3, 4, 8, 17, 51)] == [1, 2, 1, 4, 8, 1, 1]


# ---------------------------------------------------------------------------------------------------------------- config


def test_data_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.proportions=[1,1]", "data.batch_size=0", "data.cache_limit=lots", "data.shuffle_algo=x"])
    for key in ("data.proportions", "data.batch_size", "data.cache_limit", "data.shuffle_algo"):
        assert key in str(e.value)


def test_build_checks_world_against_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(DataError, match="disagree with the environment"):
        build_dataloader(config("/nowhere"), rank=1, world_size=2)
    with pytest.raises(DataError, match="no data source is set"):
        build_dataloader(load_config(), rank=0, world_size=1)
    with pytest.raises(DataError, match="set data.cache_dir"):
        build_dataloader(config("s3://bucket/x"), rank=0, world_size=1)
    with pytest.raises(DataError, match="read in place"):
        build_dataloader(config("/local/data", "data.cache_limit=1gb"), rank=0, world_size=1, cache_dir="/tmp/c")


# --------------------------------------------------------------------------------------------------------------- retries


def test_transient_errors_are_retried_with_backoff_then_raised() -> None:
    from botocore.exceptions import ClientError, EndpointConnectionError

    def client_error(code: str, status: int) -> ClientError:
        return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")

    assert is_transient(EndpointConnectionError(endpoint_url="http://x")) and is_transient(client_error("SlowDown", 503))
    assert not is_transient(client_error("NoSuchKey", 404)) and not is_transient(FileNotFoundError("x"))

    calls: list[int] = []

    def fails(times: int, err: Exception):
        def fn() -> str:
            calls.append(1)
            if len(calls) <= times:
                raise err
            return "ok"

        return fn

    assert with_retries(fails(2, ConnectionResetError()), what="t", retries=3, base_delay=0.01, max_delay=0.02) == "ok"
    assert len(calls) == 3
    calls.clear()
    with pytest.raises(ConnectionResetError):  # out of retries
        with_retries(fails(9, ConnectionResetError()), what="t", retries=2, base_delay=0.01, max_delay=0.01)
    assert len(calls) == 3
    calls.clear()
    with pytest.raises(FileNotFoundError):  # not transient: no retry
        with_retries(fails(9, FileNotFoundError()), what="t", retries=5, base_delay=1, max_delay=1)
    assert len(calls) == 1


# --------------------------------------------------------------------------------------------------------------- reading


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    root = tmp_path_factory.mktemp("shards") / "paired"
    return root, write_tiny_shards(root, 12, prefix="u", hashes=["xxh3_64"])


def test_local_read_decodes_normalized_motion_and_every_sample_once(shards: tuple[Path, list]) -> None:
    root, samples = shards
    batches = read_all(config(str(root), "data.shuffle=false"))
    stats = MotionStats.load(root / "motion_stats.json")
    by_id = {s.clip_id: s for s in samples}
    got = [c for b in batches for c in b.clip_ids]
    assert sorted(got) == sorted(by_id) and len(got) == len(set(got))
    b = batches[0]
    s = by_id[b.clip_ids[0]]
    want = stats.normalize(SMPLMotion(s.betas, s.global_orient, s.body_pose, s.transl, s.joints).to_features().float())
    torch.testing.assert_close(b.motion[0], want)
    assert torch.equal(b.video[0], s.video_latent.half()) and b.text.shape == (4, 7, 32)  # the longest prompt, not model.text_len (16)
    assert torch.equal(b.text[0, :7], s.text_embedding.half()) and b.text_lengths.tolist() == [7] * 4


def test_truncated_s3_shard_names_the_shard(shards: tuple[Path, list], s3_server: S3Server, tmp_path: Path) -> None:
    root, _ = shards
    s3_server.upload(root, "s3://unit/trunc")
    shard = (root / "shard.00002.mds").read_bytes()
    s3_client(s3_server.endpoint).put_object(Bucket="unit", Key="trunc/shard.00002.mds", Body=shard[: len(shard) // 2])
    with pytest.raises(ShardCorruptError, match=r"shard\.00002\.mds .*index\.json says"):
        read_all(config("s3://unit/trunc", f"data.cache_dir={tmp_path}", "data.shuffle=false"))


def test_corrupt_shard_fails_its_hash_and_names_the_shard(
    shards: tuple[Path, list], s3_server: S3Server, tmp_path: Path
) -> None:
    root, _ = shards
    s3_server.upload(root, "s3://unit/flipped")
    data = bytearray((root / "shard.00001.mds").read_bytes())
    data[-100:] = bytes(100)  # same size, different bytes: only the hash can tell
    s3_client(s3_server.endpoint).put_object(Bucket="unit", Key="flipped/shard.00001.mds", Body=bytes(data))
    cfg = config("s3://unit/flipped", f"data.cache_dir={tmp_path}", "data.validate_hash=xxh3_64", "data.shuffle=false")
    for run in ("first", "rerun with the same cache"):  # streaming trusts any cached shard: the bad one must be gone
        with pytest.raises(ShardCorruptError, match=r"shard\.00001\.mds.*Checksum failure.*cached copy was deleted"):
            read_all(cfg)
        assert not list(tmp_path.glob("*/shard.00001.mds")), run


def test_local_shards_read_in_place_are_checked_against_their_hashes(shards: tuple[Path, list], tmp_path: Path) -> None:
    root, samples = shards
    assert len(read_all(config(str(root), "data.validate_hash=xxh3_64", "data.num_workers=1"))) == len(samples) // 4
    with pytest.raises(DataError, match=r"validate_hash='sha1'.*lists xxh3_64 hashes for shard\.\d+\.mds"):
        read_all(config(str(root), "data.validate_hash=sha1"))
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    data = bytearray((copy / "shard.00001.mds").read_bytes())
    data[-100:] = bytes(100)  # same size, different bytes
    (copy / "shard.00001.mds").write_bytes(bytes(data))
    with pytest.raises(ShardCorruptError, match=r"shard\.00001\.mds .*fails its xxh3_64 check"):
        read_all(config(str(copy), "data.validate_hash=xxh3_64", "data.shuffle=false"))
    assert (copy / "shard.00001.mds").read_bytes() == bytes(data)  # the dataset's own file is left alone


def test_cache_follows_the_remote_path_and_its_rewrites(s3_server: S3Server, tmp_path: Path) -> None:
    """streaming reads a cached index.json instead of the remote one: a cache reused across data.path values, or kept while
    the dataset at one path is rewritten, must not serve the old shards."""
    for name in ("a", "b"):
        write_tiny_shards(tmp_path / name, 8, prefix=name)
        s3_server.upload(tmp_path / name, f"s3://unit/cache-{name}")
    cache = f"data.cache_dir={tmp_path / 'cache'}"

    def clips(path: str) -> set[str]:
        return {c for b in read_all(config(path, cache)) for c in b.clip_ids}

    assert {c[0] for c in clips("s3://unit/cache-a")} == {"a"}
    assert {c[0] for c in clips("s3://unit/cache-b")} == {"b"}
    write_tiny_shards(tmp_path / "a2", 6, prefix="z")  # the dataset at cache-a rewritten in place
    s3_server.upload(tmp_path / "a2", "s3://unit/cache-a")
    assert {c[0] for c in clips("s3://unit/cache-a")} == {"z"}


def test_truncated_local_shard_read_in_place_names_the_shard(shards: tuple[Path, list], tmp_path: Path) -> None:
    root, _ = shards
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    data = (copy / "shard.00003.mds").read_bytes()
    (copy / "shard.00003.mds").write_bytes(data[: len(data) - 5000])
    with pytest.raises(ShardCorruptError, match=r"shard\.00003\.mds .*index\.json says"):
        read_all(config(str(copy), "data.shuffle=false"))


def test_unreachable_store_fails_with_an_error_naming_file_and_endpoint(
    shards: tuple[Path, list], s3_server: S3Server, tmp_path: Path
) -> None:
    root, _ = shards
    s3_server.upload(root, "s3://unit/down")
    cfg = config("s3://unit/down", f"data.cache_dir={tmp_path}", "data.download_retry=2", "data.num_workers=1")
    _, loader = build_dataloader(cfg, rank=0, world_size=1)  # index and stats fetched while the server is up
    s3_server.stop()
    try:
        expected = rf"shard\.\d+\.mds from S3 endpoint {s3_server.endpoint} after 3 attempts"
        with pytest.raises(ShardFetchError, match=expected):
            list(loader)
    finally:
        s3_server.start()


def test_failed_downloads_end_the_epoch_with_the_error_every_time(
    shards: tuple[Path, list], s3_server: S3Server, tmp_path: Path
) -> None:
    """streaming's epoch end waits, without a timeout, for its download threads to report that they exited; one that failed
    never did, so roughly one failed epoch in ten hung forever (which side of a thread race wins). Many epochs, each watched.
    A reader waiting for a shard whose download failed elsewhere must not wait forever either."""
    root, _ = shards
    s3_server.upload(root, "s3://unit/flaky")
    built = []
    for i in range(REPEATS + 1):  # REPEATS epochs and one reader
        cfg = config("s3://unit/flaky", f"data.cache_dir={tmp_path / str(i)}", "data.download_retry=0")
        built.append(build_dataloader(cfg, rank=0, world_size=1))
    s3_server.stop()
    try:
        for i, (_, loader) in enumerate(built[:REPEATS]):
            assert isinstance(_watched(lambda: list(loader), f"epoch {i} of {REPEATS}"), ShardFetchError)
        dataset = built[-1][0]
        with pytest.raises(ShardFetchError):
            dataset.prepare_shard(0, blocking=False)  # as the download thread does
        assert isinstance(_watched(lambda: dataset.prepare_shard(0), "a reader waiting for shard 0"), ShardFetchError)
    finally:
        s3_server.start()


def _watched(fn: Callable[[], object], what: str, timeout: float = 60) -> BaseException | None:
    """The exception `fn` raises in a thread, or None; fails the test if `fn` is still running after `timeout` s."""
    outcome: list[BaseException | None] = [None]

    def run() -> None:
        try:
            fn()
        except BaseException as e:
            outcome[0] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"{what} hung"
    return outcome[0]


def test_cache_limit_evicts_and_still_reads_everything(
    shards: tuple[Path, list], s3_server: S3Server, tmp_path: Path
) -> None:
    root, samples = shards
    s3_server.upload(root, "s3://unit/limited")
    shard_bytes = max(f.stat().st_size for f in root.glob("shard.*.mds"))
    limit = f"{5 * shard_bytes}b"  # streaming needs at least 4 shards of room; the dataset has 6
    batches = read_all(config("s3://unit/limited", f"data.cache_dir={tmp_path}", f"data.cache_limit={limit}"))
    assert sorted(c for b in batches for c in b.clip_ids) == sorted(s.clip_id for s in samples)
    (cache,) = tmp_path.glob("paired-*")  # the source's own cache folder, named after its kind and URL
    assert sum(f.stat().st_size for f in cache.glob("shard.*")) <= 5 * shard_bytes


def test_proportions_mix_streams_per_batch(shards: tuple[Path, list], tmp_path: Path) -> None:
    root, _ = shards
    frames = [5, 9, 13, 6, 7, 8, 10, 11]
    write_tiny_shards(tmp_path / "mo", 8, prefix="m", latent_shape=None, frames=frames, with_stats=False)
    cfg = config(str(root), f"data.motion_only_path={tmp_path / 'mo'}", "data.proportions=[3,1]", "data.epoch_size=16")
    batches = read_all(cfg)
    kinds = sorted(("video" if b.video is not None else "motion", len(b)) for b in batches)
    assert kinds == [("motion", 4), ("video", 4), ("video", 4), ("video", 4)]
    motion_batch = next(b for b in batches if b.video is None)
    assert all(c.startswith("m") for c in motion_batch.clip_ids)
    assert motion_batch.motion.shape[1] == int(motion_batch.motion_mask.sum(1).max())
