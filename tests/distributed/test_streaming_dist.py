"""Two ranks under torchrun stream HuMoVe shards from a real S3-compatible server (moto on 127.0.0.1).

Checks: every sample exactly once per epoch; replication 2 gives both ranks identical samples; two streams (paired +
motion-only) never mix inside a batch and all ranks take the same stream at each step; a run stopped after k batches and
resumed from state_dict() in fresh processes yields exactly the rest of the uninterrupted run, in order; an S3 server stopped
and restarted mid-epoch still gives every sample exactly once.
"""
from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.distributed.launch import run_stream_phases
from tests.s3_server import S3Server
from tests.tiny_shards import write_tiny_shards

NPROC, BATCH = 2, 4
RESUME_AFTER = 3
# Short backoff so that the fault test's few-second outage is ridden out quickly.
RETRY = ["data.download_retry=8", "data.retry_base_delay=0.25", "data.retry_max_delay=2", "data.clean_stale_shm=false"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, s3_server: S3Server) -> dict:
    root = tmp_path_factory.mktemp("humove")
    paired = [s.clip_id for s in write_tiny_shards(root / "paired", 48, prefix="pair")]
    frames = [9 + (i * 5) % 22 for i in range(16)]
    motion_only = write_tiny_shards(root / "motion_only", 16, prefix="mo", latent_shape=None, frames=frames)
    motion_only = [s.clip_id for s in motion_only]
    s3_server.upload(root / "paired", "s3://humove/paired")
    s3_server.upload(root / "motion_only", "s3://humove/motion_only")
    return {"root": root, "paired": paired, "motion_only": motion_only}


def launch(out: Path, phases: list[dict], **kwargs) -> tuple[dict[str, list[dict]], str]:
    return run_stream_phases(out, phases, NPROC, **kwargs)


def phase(name: str, cache: Path, *overrides: str, **extra) -> dict:
    base = ["data.path=s3://humove/paired", f"data.batch_size={BATCH}", f"data.cache_dir={cache / name}", *RETRY]
    return {"name": name, "overrides": [*base, *overrides], **extra}


def seen(record: dict) -> list[str]:
    return [clip for batch in record["batches"] for clip in batch]


@pytest.fixture(scope="module")
def first_run(data: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("first_run")
    state = out / "state.json"
    phases = [
        phase("epoch", out, "data.num_workers=2"),
        phase("interrupted", out, "data.num_workers=2", stop_after=RESUME_AFTER, save_state=[str(state), RESUME_AFTER]),
        phase("replicated", out, "data.num_workers=1", replication=2),
        phase("mixed", out, "data.num_workers=2", "data.motion_only_path=s3://humove/motion_only", "data.sp_multiple=4"),
    ]
    return {"records": launch(out, phases)[0], "state": state}


def test_every_sample_exactly_once(data: dict, first_run: dict) -> None:
    ranks = first_run["records"]["epoch"]
    counts = Counter(seen(ranks[0]) + seen(ranks[1]))
    assert sorted(counts) == sorted(data["paired"])
    assert set(counts.values()) == {1}
    assert [len(b) for b in ranks[0]["batches"]] == [BATCH] * (48 // (NPROC * BATCH))
    assert set(seen(ranks[0])).isdisjoint(seen(ranks[1]))


def test_replication_gives_ranks_identical_samples(data: dict, first_run: dict) -> None:
    r0, r1 = first_run["records"]["replicated"]
    assert r0["batches"] == r1["batches"]
    assert sorted(seen(r0)) == sorted(data["paired"])  # the replicated pair is one consumer of the whole epoch


def test_streams_do_not_mix_and_ranks_agree(data: dict, first_run: dict) -> None:
    r0, r1 = first_run["records"]["mixed"]
    counts = Counter(seen(r0) + seen(r1))
    assert sorted(counts) == sorted(data["paired"] + data["motion_only"]) and set(counts.values()) == {1}
    assert r0["has_video"] == r1["has_video"]  # same stream (task) on every rank at each step
    for rec in (r0, r1):
        for clips, has_video, (motion_shape, video_shape) in zip(rec["batches"], rec["has_video"], rec["shapes"]):
            assert all(c.startswith("pair" if has_video else "mo") for c in clips)
            assert (video_shape is not None) == has_video
            assert motion_shape[1] % 4 == 0  # 51 tokens per frame, so frames pad to a multiple of 4 for sp 4


def test_resume_in_fresh_processes_continues_exactly(data: dict, first_run: dict, tmp_path: Path) -> None:
    interrupted = first_run["records"]["interrupted"]
    full = first_run["records"]["epoch"]
    for r in range(NPROC):
        assert interrupted[r]["batches"] == full[r]["batches"][:RESUME_AFTER]
    state = json.loads(first_run["state"].read_text())
    assert state["sample_in_epoch"] == RESUME_AFTER * BATCH * NPROC
    resumed, _ = launch(tmp_path, [phase("resumed", tmp_path, "data.num_workers=2", load_state=str(first_run["state"]))])
    for r in range(NPROC):
        assert resumed["resumed"][r]["batches"] == full[r]["batches"][RESUME_AFTER:]


def test_s3_restart_mid_epoch_still_yields_every_sample_once(data: dict, s3_server: S3Server, tmp_path: Path) -> None:
    # One worker fetching one batch ahead, and few samples predownloaded, so most shards are fetched after the outage.
    fault = phase(
        "fault", tmp_path, "data.shuffle=false", "data.num_workers=1", "data.prefetch_factor=1", f"data.predownload={BATCH}",
        pause_after=1,
    )
    result: dict = {}

    def run() -> None:
        try:
            result["records"], result["output"] = launch(tmp_path, [fault], timeout=240)
        except BaseException as e:  # reported by the test thread
            result["error"] = e

    runner = threading.Thread(target=run)
    runner.start()
    try:
        deadline = time.time() + 180
        while not all((tmp_path / f"fault.rank{r}.paused").exists() for r in range(NPROC)):
            assert runner.is_alive() and time.time() < deadline, f"workers never reached the pause point: {result}"
            time.sleep(0.2)
        s3_server.stop()
    finally:
        (tmp_path / "fault.go").touch()
    time.sleep(3)  # the ranks read on and hit the dead server
    s3_server.start()
    runner.join(timeout=300)
    if "error" in result:
        raise result["error"]
    r0, r1 = result["records"]["fault"]
    counts = Counter(seen(r0) + seen(r1))
    assert sorted(counts) == sorted(data["paired"]) and set(counts.values()) == {1}
    assert "retrying in" in result["output"], "no download failed during the outage: the test did not exercise retries"
