"""A weighted three-source mixture (two paired buckets of different latent shapes plus motion-only) on two ranks under
torchrun: a run stopped mid-epoch and resumed from state_dict() in fresh processes continues exactly as the uninterrupted
run (also on one rank with the same global batch), and every step's global batch comes from one source on both ranks."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from echomotion.config import load_config
from echomotion.data.loader import build_dataloader

from tests.distributed.launch import run_stream_phases
from tests.tiny_shards import MIXTURE, mixture_override, mixture_source, write_mixture

NPROC, BATCH, EPOCH, RESUME_AFTER = 2, 2, 64, 5
WEIGHTS = {"big": 2.0, "small": 1.0, "mo": 1.0}  # 32, 16 and 16 samples of the 64-sample epoch


def phase(root: Path, name: str, **extra) -> dict:
    overrides = [mixture_override(root, WEIGHTS), f"data.epoch_size={EPOCH}", f"data.batch_size={BATCH}",
                 "data.num_workers=1", "data.clean_stale_shm=false"]
    return {"name": name, "overrides": overrides, **extra}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Run A reads the epoch straight; run B stops after RESUME_AFTER steps with the loader state saved; new processes
    load that state and read the rest."""
    root = tmp_path_factory.mktemp("mixture")
    write_mixture(root)
    state = root / "state.json"
    first, _ = run_stream_phases(root / "first", [
        phase(root, "straight"),
        phase(root, "interrupted", stop_after=RESUME_AFTER, save_state=[str(state), RESUME_AFTER]),
    ], NPROC)
    resumed, _ = run_stream_phases(root / "resumed", [phase(root, "resumed", load_state=str(state))], NPROC)
    return {**first, **resumed, "state": json.loads(state.read_text()), "root": str(root)}


def test_mixture_resumes_exactly_in_fresh_processes(runs: dict) -> None:
    assert runs["state"]["sample_in_epoch"] == RESUME_AFTER * BATCH * NPROC
    for r in range(NPROC):
        straight = runs["straight"][r]["batches"]
        assert runs["interrupted"][r]["batches"] == straight[:RESUME_AFTER]
        assert runs["resumed"][r]["batches"] == straight[RESUME_AFTER:]


def test_mixture_resumes_on_one_rank_with_the_same_global_batch(runs: dict) -> None:
    """streaming resumes on another rank count when the global batch and num_canonical_nodes stay the same: one rank
    with twice the batch then reads, at each step, the union of what the two ranks read."""
    cfg = load_config(None, [*phase(Path(runs["root"]), "one")["overrides"], f"data.batch_size={BATCH * NPROC}",
                             "data.num_workers=0"])
    _, loader = build_dataloader(cfg, rank=0, world_size=1)
    loader.load_state_dict(runs["state"])
    r0, r1 = runs["straight"]
    union = [sorted(a + b) for a, b in zip(r0["batches"], r1["batches"])]
    assert [sorted(b.clip_ids) for b in loader] == union[RESUME_AFTER:]


def test_every_global_batch_is_one_source_with_its_share(runs: dict) -> None:
    r0, r1 = runs["straight"]
    assert len(r0["batches"]) == len(r1["batches"]) == EPOCH // (BATCH * NPROC)
    per_source: Counter = Counter()
    for b0, b1, shapes in zip(r0["batches"], r1["batches"], r0["shapes"]):
        (name,) = {mixture_source(c) for c in b0 + b1}  # both ranks, one source at each step
        latent = MIXTURE[name][2]
        assert shapes[1] == (None if latent is None else [BATCH, *latent])
        per_source[name] += len(b0) + len(b1)
    total = sum(WEIGHTS.values())
    assert per_source == {name: EPOCH * w / total for name, w in WEIGHTS.items()}
