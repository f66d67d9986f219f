"""tools/prepare_motion.py: AMASS (SMPL-H and SMPL) + HumanML3D captions -> motion-only shards; resampling, the joint
mapping, caption segments, rejections with reasons, resume, s3://, two ranks, and a few Phase 1 steps on the output."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from echomotion.config import load_config
from echomotion.data import prepare_motion
from echomotion.data.encoders import HashTextEncoder
from echomotion.data.shards import compute_motion_stats, iter_samples
from echomotion.data.loader import build_dataloader
from echomotion.distributed import DistEnv
from echomotion.metrics import read_metrics
from echomotion.motion import MotionStats, SMPLLayer, write_synthetic_smpl_model
from echomotion.train import Trainer
from tests.s3_server import free_port, s3_client

REPO = Path(__file__).resolve().parents[2]
GOOD = {  # clip -> (pose width, source fps, frames): 2 s of SMPL-H at 120 fps, 2.5 s of SMPL at 60 fps, 1.5 s at 30
    "CMU/01/walk_poses": (156, 120.0, 240),
    "KIT/3/jump_poses": (72, 60.0, 150),
    "KIT/4/turn_poses": (156, 30.0, 46),
}
CAPTIONS = {
    "CMU/01/walk_poses": ["a person walks forward.#a/DET person/NOUN#0.0#0.0",
                          "someone takes two steps#someone/PRON#0.5#1.5",
                          "a brief shuffle#a/DET#0.0#0.4"],  # 0.4 s -> 7 frames at 16 fps: too short
    "KIT/3/jump_poses": ["a person jumps up#a/DET#nan#nan"],
}
REJECTS = {"BML/short_poses": "too_short", "BML/nan_poses": "bad_values", "BML/odd_poses": "unknown_format",
           "BML/shape": "unknown_format", "BML/broken_poses": "unreadable"}


def _poses(width: int, frames: int, seed: int) -> np.ndarray:
    t = np.arange(frames)[:, None]
    rng = np.random.default_rng(seed)
    return (0.3 * np.sin(t * rng.uniform(0.02, 0.1, width) + rng.uniform(0, 6, width))).astype(np.float32)


def _write_clip(path: Path, width: int, fps: float, frames: int, seed: int, **override) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    d = {"poses": _poses(width, frames, seed), "trans": np.cumsum(np.full((frames, 3), 0.01, np.float32), 0),
         "betas": np.linspace(-1, 1, 16).astype(np.float32), "gender": np.array("neutral"),
         "mocap_framerate": np.array(fps)}
    np.savez(path, **{**d, **override})


@pytest.fixture(scope="module")
def amass(tmp_path_factory) -> Path:
    """AMASS-style clips (three good, five bad) and HumanML3D-style captions for two of the good ones."""
    root = tmp_path_factory.mktemp("amass")
    for i, (clip, (width, fps, frames)) in enumerate(GOOD.items()):
        _write_clip(root / "amass" / f"{clip}.npz", width, fps, frames, i)
    _write_clip(root / "amass/BML/short_poses.npz", 156, 30.0, 10, 7)
    nan = _poses(156, 60, 8)
    nan[5, 10] = np.nan
    _write_clip(root / "amass/BML/nan_poses.npz", 156, 30.0, 60, 8, poses=nan)
    _write_clip(root / "amass/BML/odd_poses.npz", 99, 30.0, 60, 9)
    np.savez(root / "amass/BML/shape.npz", betas=np.zeros(16, np.float32), gender=np.array("female"))
    (root / "amass/BML/broken_poses.npz").write_bytes(b"PK\x03\x04 not really a zip")
    for clip, lines in CAPTIONS.items():
        (root / "texts" / clip).parent.mkdir(parents=True, exist_ok=True)
        (root / "texts" / f"{clip}.txt").write_text("\n".join(lines) + "\n")
    write_synthetic_smpl_model(root / "smpl.pkl")
    return root


def _args(root: Path, out, *extra: str) -> list[str]:
    return ["--input", str(root / "amass"), "--out", str(out), "--smpl-model", str(root / "smpl.pkl"), "--no-progress",
            *extra]


def _by_id(out) -> dict:
    samples = list(iter_samples(out))
    assert len({s.clip_id for s in samples}) == len(samples), "a sample was written twice"
    return {s.clip_id: s for s in samples}


def _source_frame(i: int, src_fps: float, first: int = 0) -> float:
    """Independent definition of the resampling: output frame i at 16 fps lies at i / 16 s after the segment start."""
    return first + i / 16.0 * src_fps


def test_amass_and_humanml3d_become_motion_only_samples(amass: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    counts = prepare_motion.main(_args(amass, out, "--texts", str(amass / "texts"), "--chunk-size", "3"))
    got = _by_id(out)
    assert set(got) == {"CMU/01/walk_poses#0", "CMU/01/walk_poses#1", "KIT/3/jump_poses#0"}
    rejected = {x["clip_id"]: x for x in map(json.loads, (out / "rejected.jsonl").read_text().splitlines())}
    assert {k: x["kind"] for k, x in rejected.items()} == {
        **REJECTS, "CMU/01/walk_poses#2": "too_short", "KIT/4/turn_poses": "missing_text"}
    assert "NaN" in rejected["BML/nan_poses"]["reason"] and "[T,156]" in rejected["BML/odd_poses"]["reason"]
    assert counts["summary"]["samples"] == 3 and counts["summary"]["rejected"] == 7

    layer, tenc = SMPLLayer(amass / "smpl.pkl"), HashTextEncoder()
    walk = np.load(amass / "amass/CMU/01/walk_poses.npz")["poses"]
    for sid, first, seconds in (("CMU/01/walk_poses#0", 0, 239 / 120), ("CMU/01/walk_poses#1", 60, 1.0)):
        s = got[sid]
        assert s.video_latent is None and (s.fps, s.height, s.width) == (16.0, 0, 0)
        assert s.num_frames == int(seconds * 16 + 1e-6) + 1 == s.body_pose.shape[0]
        for i in range(s.num_frames):  # a nearest source frame (either, on a tie), SMPL-H body joints 1..21 kept
            t = _source_frame(i, 120.0, first)
            nearest = [k for k in (int(np.floor(t)), int(np.ceil(t))) if abs(k - t) <= 0.5]
            assert any(torch.equal(s.body_pose[i, :21].reshape(-1), torch.from_numpy(walk[k, 3:66])) and
                       torch.equal(s.global_orient[i], torch.from_numpy(walk[k, :3])) for k in nearest), i
        assert not s.body_pose[:, 21:].any() and s.category == "CMU"  # SMPL's hand joints: zero rotation
        assert torch.allclose(s.joints, layer.joints(s.betas, s.global_orient, s.body_pose, s.transl), atol=1e-6)
        assert torch.equal(s.betas[0], torch.from_numpy(np.linspace(-1, 1, 16).astype(np.float32)[:10]))
    assert got["CMU/01/walk_poses#1"].caption == "someone takes two steps"
    assert torch.equal(got["KIT/3/jump_poses#0"].text_embedding, tenc.encode(["a person jumps up"])[0].half())
    jump = np.load(amass / "amass/KIT/3/jump_poses.npz")["poses"]  # an SMPL file: all 23 body joints kept
    assert got["KIT/3/jump_poses#0"].num_frames == int(149 / 60 * 16) + 1
    assert torch.equal(got["KIT/3/jump_poses#0"].body_pose[3].reshape(-1), torch.from_numpy(jump[round(3 / 16 * 60), 3:]))

    stats, recomputed = MotionStats.load(out / "motion_stats.json"), compute_motion_stats(out)
    assert torch.allclose(stats.mean, recomputed.mean, atol=1e-4) and torch.allclose(stats.std, recomputed.std, atol=1e-4)
    assert (out / "null_text.pt").exists() and json.loads((out / "dataset.json").read_text())["kind"] == "motion_only"


def test_humanml3d_index_maps_segments_and_captions_back_to_amass_frames(amass: Path, tmp_path: Path) -> None:
    """HumanML3D as distributed (index.csv + texts/<id>.txt): its frame k is AMASS frame (trim + k) * int(rate / 20),
    after a 3 s head trim for Eyes_Japan_Dataset; HumanAct12 rows are skipped; clips without a row have no captions."""
    root = tmp_path / "amass"
    for clip, (width, fps, frames) in GOOD.items():
        _write_clip(root / f"{clip}.npz", width, fps, frames, 1)
    _write_clip(root / "Eyes_Japan_Dataset/aita/bow_poses.npz", 156, 120.0, 720, 2)  # 6 s, of which HumanML3D drops 3
    hml = tmp_path / "HumanML3D"
    (hml / "texts").mkdir(parents=True)
    (hml / "index.csv").write_text("source_path,start_frame,end_frame,new_name\n"
                                   "./pose_data/CMU/01/walk_poses.npy,5,35,000001.npy\n"
                                   "./pose_data/Eyes_Japan_Dataset/aita/bow_poses.npy,0,50,000002.npy\n"
                                   "./pose_data/humanact12/humanact12/P01G01R01F0001T0064A0101.npy,0,60,000003.npy\n")
    (hml / "texts/000001.txt").write_text("a person walks#a/DET#0.0#0.0\nsteps on#s/NOUN#0.25#1.5\nbrief#b/ADJ#0.5#1.0\n")
    (hml / "texts/000002.txt").write_text("a person bows#a/DET#0.0#0.0\n")
    write_synthetic_smpl_model(tmp_path / "smpl.pkl")
    out = tmp_path / "out"
    prepare_motion.main(["--input", str(root), "--out", str(out), "--smpl-model", str(tmp_path / "smpl.pkl"),
                         "--humanml3d", str(hml), "--no-progress"])
    got = _by_id(out)
    # (sample, first AMASS frame, last AMASS frame): 120 fps -> every 6th frame is a HumanML3D frame
    expect = {"CMU/01/walk_poses#000001.0": (5 * 6, 34 * 6), "CMU/01/walk_poses#000001.1": (10 * 6, 34 * 6),
              "Eyes_Japan_Dataset/aita/bow_poses#000002.0": ((60 + 0) * 6, (60 + 49) * 6)}
    assert set(got) == set(expect)
    for sid, (first, last) in expect.items():
        s = got[sid]
        trans = np.load(root / f"{sid.split('#')[0]}.npz")["trans"]
        assert s.num_frames == int((last - first) / 120 * 16 + 1e-6) + 1, sid
        assert torch.equal(s.transl[0], torch.from_numpy(trans[first])), sid
    assert got["CMU/01/walk_poses#000001.1"].caption == "steps on"
    rejected = {x["clip_id"]: x["kind"] for x in map(json.loads, (out / "rejected.jsonl").read_text().splitlines())}
    assert rejected == {"CMU/01/walk_poses#000001.2": "too_short", "KIT/3/jump_poses": "missing_text",
                        "KIT/4/turn_poses": "missing_text"}


def test_without_captions_every_clip_is_one_sample(amass: Path, tmp_path: Path) -> None:
    prepare_motion.main(_args(amass, tmp_path / "out", "--fps", "20"))
    got = _by_id(tmp_path / "out")
    assert set(got) == set(GOOD) and all(s.caption == "" and s.fps == 20.0 for s in got.values())
    assert got["KIT/4/turn_poses"].num_frames == int(45 / 30 * 20) + 1


def test_resume_redoes_only_the_unfinished_chunk_and_settings_are_pinned(amass: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    # sorted clips: 5 bad BML ones, CMU walk, KIT jump, KIT turn; chunks of 2: the 4th is cut short after KIT jump
    with pytest.raises(SystemExit, match="stopped after 2 clips"):
        prepare_motion.main(_args(amass, out, "--chunk-size", "2", "--stop-after-clips", "2"))
    progress = [json.loads(x) for x in (out / "_progress/rank-00000.jsonl").read_text().splitlines()]
    assert [r["clips"] for r in progress] == [[], [], ["CMU/01/walk_poses"]] and not (out / "index.json").exists()
    counts = prepare_motion.main(_args(amass, out, "--chunk-size", "2"))
    assert (counts["skipped_done"], counts["written"]) == (6, 2) and set(_by_id(out)) == set(GOOD)
    with pytest.raises(SystemExit, match="other settings"):
        prepare_motion.main(_args(amass, out, "--fps", "30"))


def test_s3_output_and_restart_elsewhere(amass: Path, tmp_path: Path, s3_server) -> None:
    s3_client(s3_server.endpoint).create_bucket(Bucket="motion")
    counts = prepare_motion.main(_args(amass, "s3://motion/amass", "--local-dir", str(tmp_path / "stage")))
    assert counts["summary"]["samples"] == 3 and set(_by_id("s3://motion/amass")) == set(GOOD)
    again = prepare_motion.main(_args(amass, "s3://motion/amass", "--local-dir", str(tmp_path / "stage2")))
    assert (again["skipped_done"], again["written"]) == (len(GOOD) + len(REJECTS), 0)


def test_bad_arguments_name_the_fix(amass: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        prepare_motion.main(_args(amass, tmp_path / "o", "--texts", str(tmp_path / "nope")))
    assert "HumanML3D's texts/ folder" in capsys.readouterr().err


def test_torchrun_two_ranks_write_every_clip_once(amass: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(REPO / "tools/prepare_motion.py"), *_args(amass, out, "--chunk-size", "2")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert proc.returncode == 0 and f"prepare_motion: {len(GOOD)} clips in" in proc.stdout, proc.stderr[-3000:]
    assert set(_by_id(out)) == set(GOOD)
    assert {p.split("-")[1] for p in json.loads((out / "dataset.json").read_text())["parts"]} == {"r00000", "r00001"}


@pytest.fixture(scope="module")
def prepared(amass: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "motion"
    prepare_motion.main(_args(amass, out, "--texts", str(amass / "texts")))
    return out  # walk#0: 32 frames, walk#1: 17, jump#0: 40 (at 16 fps)


def _windows(out: Path, *overrides: str) -> dict[str, torch.Tensor]:
    cfg = load_config(None, [f"data.motion_only_path={out}", "data.batch_size=1", "data.num_workers=0", "data.motion_frames=24",
                             "data.clean_stale_shm=false",
                             *overrides])
    _, loader = build_dataloader(cfg, rank=0, world_size=1)
    return {b.clip_ids[0]: b.motion[0, b.motion_mask[0]] for b in loader}


def test_streamed_clips_are_cropped_the_same_way_every_time(prepared: Path) -> None:
    first, again, other = _windows(prepared), _windows(prepared), _windows(prepared, "data.shuffle_seed=5")
    assert {k: len(v) for k, v in first.items()} == {"CMU/01/walk_poses#0": 24, "CMU/01/walk_poses#1": 17,
                                                     "KIT/3/jump_poses#0": 24}
    assert all(torch.equal(first[k], again[k]) for k in first)  # a rerun (or resume) crops the same windows
    assert any(not torch.equal(first[k], other[k]) for k in first)  # the seed chooses them


def test_phase1_trains_on_the_prepared_motion(prepared: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = load_config(REPO / "configs/tiny.yaml", [
        "data.path=null", f"data.motion_only_path={prepared}", f"data.stats_path={prepared / 'motion_stats.json'}",
        f"data.null_text_path={prepared / 'null_text.pt'}", "data.batch_size=2", "data.num_workers=0",
        "data.motion_frames=24", "data.clean_stale_shm=false",
        "model.num_layers=1", "train.progress=false", f"train.run_dir={run}", "train.phase=1", "train.steps=3",
        "train.checkpoint_every=3"])
    Trainer(cfg, DistEnv(0, 1, 0, torch.device("cpu"))).run()
    records = [r for r in read_metrics(run) if "motion_pad_fraction" in r]
    assert [r["step"] for r in records] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in records)
    # batches of two clips cut to 24 frames: only walk#1 (17 frames) is padded, 7 of 48 frames; alone 7 of 24
    assert {round(r["motion_pad_fraction"], 6) for r in records} <= {0.0, round(7 / 48, 6), round(7 / 24, 6)}
    assert any(r["motion_pad_fraction"] > 0 for r in records)


def test_dataset_json_reports_the_padding_and_cropping_of_each_window(prepared: Path) -> None:
    lengths = json.loads((prepared / "dataset.json").read_text())["lengths"]
    assert list(lengths) == [str(w) for w in prepare_motion.REPORT_FRAMES]
    # clips of 32, 17 and 40 frames in 32-frame windows: 15 of 96 trained frames are padding, 8 of 89 frames cut away
    assert lengths["32"] == {"pad_fraction": 15 / 96, "crop_fraction": 8 / 89}
    assert lengths["160"]["crop_fraction"] == 0 and lengths["160"]["pad_fraction"] == (128 + 143 + 120) / 480
