"""tools/prepare_humove.py: round trips (pixel codec, tiny Wan VAE), rejection report, resume, 2 ranks, s3://."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import imageio.v2 as iio
import numpy as np
import pytest
import torch

from echomotion.data import prepare
from echomotion.data.encoders import HashTextEncoder, PixelCodec, WanVAECodec
from echomotion.data.shards import compute_motion_stats, iter_samples
from echomotion.data.synthetic import generate_humove_mini
from echomotion.motion import MotionStats, SMPLLayer, write_synthetic_smpl_model
from tests.s3_server import free_port, s3_client
from tests.tiny_encoders import tiny_vae

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "prepare_humove.py"
CLIPS = 12


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """12 HuMoVe-mini clips, encoded directly and as raw files (lossless mp4 + SMPL npz + manifest)."""
    root = tmp_path_factory.mktemp("raw")
    generate_humove_mini(root, CLIPS, 3, heldout_fraction=0.0, raw=True, progress=False)
    return root


def _args(raw: Path, out, *extra: str, manifest: Path | None = None) -> list[str]:
    return ["--manifest", str(manifest or raw / "raw" / "manifest.jsonl"), "--out", str(out),
            "--smpl-model", str(raw / "smpl_synthetic.pkl"), "--no-progress", *extra]


def _by_id(root) -> dict:
    samples = list(iter_samples(root))
    by_id = {s.clip_id: s for s in samples}
    assert len(by_id) == len(samples), "a clip was written twice"
    return by_id


def test_round_trip_pixel_codec_is_exact(raw, tmp_path):
    counts = prepare.main(_args(raw, tmp_path / "out", "--chunk-size", "5", "--batch-size", "4"))
    assert counts["encoded"] == CLIPS and counts["summary"]["rejected"] == 0
    direct, prepared = _by_id(raw / "train"), _by_id(tmp_path / "out")
    assert prepared.keys() == direct.keys()
    for cid, s in prepared.items():
        d = direct[cid]
        assert torch.equal(s.video_latent, d.video_latent)  # lossless mp4 -> the same pixels -> the same latent
        assert torch.equal(s.text_embedding, HashTextEncoder().encode([s.caption])[0].half())
        for f in ("betas", "global_orient", "body_pose", "transl"):
            assert torch.equal(getattr(s, f), getattr(d, f)), f
        assert torch.allclose(s.joints, d.joints, atol=1e-6)
        assert (s.caption, s.category, s.source, s.fps, s.num_frames) == (d.caption, d.category, d.source, 16.0, 17)
    # the decoded latent is exactly what the video file holds
    some = sorted(prepared)[0]
    with iio.get_reader(str(raw / "raw" / "clips" / f"{some}.mp4"), format="ffmpeg") as r:
        frames = np.stack([f for f in r])  # list(r) trips over the reader's infinite len()
    assert np.array_equal(PixelCodec().decode(prepared[some].video_latent[None].float())[0], frames)
    # motion stats accumulated while writing == stats recomputed from the shards
    info = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert info["latent_shape"] == [48, 5, 16, 16] and info["counts"]["clips"] == CLIPS
    saved, again = MotionStats.load(tmp_path / "out" / "motion_stats.json"), compute_motion_stats(tmp_path / "out")
    assert saved.count == again.count == CLIPS * 17
    assert torch.allclose(saved.mean, again.mean, atol=1e-6) and torch.allclose(saved.std, again.std, atol=1e-5)


def test_round_trip_tiny_wan_vae(raw, tmp_path):
    lines = (raw / "raw" / "manifest.jsonl").read_text().splitlines()[:2]
    manifest = raw / "raw" / "two.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    vae = tiny_vae(tmp_path / "vae")
    out = tmp_path / "out"
    prepare.main(_args(raw, out, "--codec", "wan-vae", "--vae-path", str(vae), "--latent-dtype", "float32",
                       "--batch-size", "2", manifest=manifest))
    codec = WanVAECodec(vae)
    entries, _ = prepare.read_manifest(manifest)
    prepared = _by_id(out)
    assert len(prepared) == 2
    for e in entries:
        video, _ = prepare.load_clip(e, 16.0, 17, 32, 32)
        expected = codec.encode(video[None])[0]
        got = prepared[e.clip_id].video_latent
        assert got.shape == (4, 5, 4, 4) and got.dtype == torch.float32
        assert torch.allclose(got, expected, atol=1e-5)  # batched vs single encode differ only in rounding
        assert torch.equal(prepared[e.clip_id].text_embedding, HashTextEncoder().encode([e.caption])[0].half())


def _write_video(path: Path, frames: np.ndarray, fps: float) -> None:
    with iio.get_writer(str(path), format="ffmpeg", fps=fps, codec="libx264rgb", pixelformat="rgb24",
                        ffmpeg_params=["-qp", "0"], macro_block_size=1, ffmpeg_log_level="error") as w:
        for f in frames:
            w.append_data(f)


def _smpl(n: int) -> dict:
    """n frames of SMPL parameters whose global orientation encodes the frame index."""
    k = np.arange(n, dtype=np.float32)
    return {"betas": np.full(10, 0.5, np.float32), "global_orient": np.stack([0.01 * k, 0 * k, 0 * k], 1),
            "body_pose": np.zeros((n, 69), np.float32), "transl": np.stack([0 * k, 0 * k, 0.1 * k], 1)}


@pytest.fixture
def messy(tmp_path):
    """A manifest with two good clips and one of every kind of problem."""
    d = tmp_path / "messy"
    d.mkdir()
    # good: 30 fps, 48x40 with red bars the 1:1 center crop must remove; frame k is grey level 5k
    src = np.zeros((36, 40, 48, 3), np.uint8)
    src[:] = (5 * np.arange(36, dtype=np.uint8))[:, None, None, None]
    src[:, :, :4] = src[:, :, -4:] = (255, 0, 0)
    _write_video(d / "good.mp4", src, 30)
    np.savez(d / "good.npz", fps=30.0, **_smpl(36))
    small = np.full((17, 32, 32, 3), 90, np.uint8)
    _write_video(d / "good16.mp4", small, 16)
    np.savez(d / "good16.npz", **_smpl(17))  # no fps: the video's
    np.savez(d / "nokeys.npz", **{k: v for k, v in _smpl(17).items() if k != "transl"})
    np.savez(d / "mismatch.npz", fps=30.0, **_smpl(18))
    (d / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
    _write_video(d / "short.mp4", small[:10], 16)
    np.savez(d / "short.npz", **_smpl(10))
    rows = [
        {"clip_id": "good", "video": "good.mp4", "smpl": "good.npz", "caption": "a person stands", "category": "x"},
        {"clip_id": "good16", "video": "good16.mp4", "smpl": "good16.npz", "caption": "a person waits"},
        {"clip_id": "nokeys", "video": "good16.mp4", "smpl": "nokeys.npz", "caption": "c"},
        {"clip_id": "mismatch", "video": "good.mp4", "smpl": "mismatch.npz", "caption": "c"},
        {"clip_id": "corrupt", "video": "corrupt.mp4", "smpl": "good16.npz", "caption": "c"},
        {"clip_id": "missing", "video": "missing.mp4", "smpl": "good16.npz", "caption": "c"},
        {"clip_id": "short", "video": "short.mp4", "smpl": "short.npz", "caption": "c"},
        {"clip_id": "nocaption", "video": "good16.mp4", "smpl": "good16.npz", "caption": " "},
        {"clip_id": "good", "video": "good16.mp4", "smpl": "good16.npz", "caption": "duplicate id"},
        {"clip_id": "nosmpl", "video": "good16.mp4"},
    ]
    text = "\n".join(json.dumps(r) for r in rows) + "\nnot json\n"
    (d / "manifest.jsonl").write_text(text)
    return d


EXPECTED_KINDS = {
    "nokeys": "missing_smpl_keys", "mismatch": "frame_count_mismatch", "corrupt": "unreadable_video",
    "missing": "missing_file", "short": "too_short", "nocaption": "empty_caption", "good": "duplicate_clip_id",
    "nosmpl": "bad_manifest_line", "line-11": "bad_manifest_line",
}


def test_bad_clips_are_reported_and_good_ones_written(messy, tmp_path, raw):
    out = tmp_path / "out"
    prepare.main(_args(raw, out, "--batch-size", "3", manifest=messy / "manifest.jsonl"))
    report = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert {r["clip_id"]: r["kind"] for r in report} == EXPECTED_KINDS
    reasons = {r["clip_id"]: r["reason"] for r in report}
    assert "transl" in reasons["nokeys"] and "18 frames" in reasons["mismatch"] and "missing.mp4" in reasons["missing"]
    prepared = _by_id(out)
    assert set(prepared) == {"good", "good16"}
    good = prepared["good"]
    frames = PixelCodec().decode(good.video_latent[None].float())[0]
    src_idx = np.round(np.arange(17) / 16 * 30).astype(int)  # nearest source frame in time
    assert frames.shape == (17, 32, 32, 3)
    assert np.array_equal(frames, np.broadcast_to((5 * src_idx).astype(np.uint8)[:, None, None, None], frames.shape))
    assert torch.allclose(good.global_orient[:, 0], torch.from_numpy(0.01 * src_idx).float())  # SMPL at the same times
    fk = SMPLLayer(raw / "smpl_synthetic.pkl").joints(good.betas, good.global_orient, good.body_pose, good.transl)
    assert torch.allclose(good.joints, fk, atol=1e-6)
    assert json.loads((out / "dataset.json").read_text())["counts"]["rejected"] == len(EXPECTED_KINDS)

    # fix one clip's file and retry the rejected ones: it joins, the report shrinks, nothing is duplicated
    shutil.copy(messy / "good16.mp4", messy / "missing.mp4")
    counts = prepare.main(_args(raw, out, "--retry-rejected", manifest=messy / "manifest.jsonl"))
    assert counts["skipped_done"] == 2
    assert set(_by_id(out)) == {"good", "good16", "missing"}
    report = [json.loads(line)["clip_id"] for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert sorted(report) == sorted(set(EXPECTED_KINDS) - {"missing"})


def test_changed_settings_refuse_to_resume(messy, tmp_path, raw):
    out = tmp_path / "out"
    prepare.main(_args(raw, out, manifest=messy / "manifest.jsonl"))
    with pytest.raises(SystemExit, match="other settings"):
        prepare.main(_args(raw, out, "--fps", "8", manifest=messy / "manifest.jsonl"))
    other = write_synthetic_smpl_model(tmp_path / "other_smpl.pkl", seed=1)  # another body model: other joints
    with pytest.raises(SystemExit, match="other settings.*smpl_model_sha1"):
        prepare.main([*_args(raw, out, manifest=messy / "manifest.jsonl"), "--smpl-model", str(other)])
    copy = shutil.copy(raw / "smpl_synthetic.pkl", tmp_path / "same_smpl.pkl")  # the same model elsewhere resumes
    assert prepare.main([*_args(raw, out, manifest=messy / "manifest.jsonl"), "--smpl-model", str(copy)])["encoded"] == 0


def test_resume_after_a_crash_redoes_only_unfinished_clips(raw, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="stopped after 5 clips"):  # interrupted inside the second chunk
        prepare.main(_args(raw, out, "--chunk-size", "3", "--batch-size", "1", "--stop-after-clips", "5"))
    progress = [json.loads(line) for line in (out / "_progress" / "rank-00000.jsonl").read_text().splitlines()]
    assert [len(r["clips"]) for r in progress] == [3]  # the chunk cut short at clip 5 was never recorded
    assert not (out / "index.json").exists()
    counts = prepare.main(_args(raw, out, "--chunk-size", "3", "--batch-size", "1"))
    assert (counts["skipped_done"], counts["encoded"]) == (3, CLIPS - 3)
    assert set(_by_id(out)) == {f"hm-{i:06d}" for i in range(CLIPS)}
    counts = prepare.main(_args(raw, out, "--chunk-size", "3"))
    assert (counts["skipped_done"], counts["encoded"]) == (CLIPS, 0)
    assert len(_by_id(out)) == CLIPS


def test_torchrun_two_ranks_write_every_clip_once(raw, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(TOOL), *_args(raw, out, "--chunk-size", "4")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert proc.returncode == 0 and f"prepare_humove: {CLIPS} clips in" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert set(_by_id(out)) == {f"hm-{i:06d}" for i in range(CLIPS)}
    parts = json.loads((out / "dataset.json").read_text())["parts"]
    assert {p.split("-")[1] for p in parts} == {"r00000", "r00001"}


def test_s3_output_round_trip(raw, tmp_path, s3_server):
    s3 = s3_client(s3_server.endpoint)
    s3.create_bucket(Bucket="humove")
    counts = prepare.main(_args(raw, "s3://humove/prepared", "--local-dir", str(tmp_path / "stage"),
                                "--chunk-size", "5"))
    assert counts["encoded"] == CLIPS
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="humove")["Contents"]}
    for name in ("index.json", "rejected.jsonl", "motion_stats.json", "dataset.json", "_progress/rank-00000.jsonl"):
        assert f"prepared/{name}" in keys
    assert not list((tmp_path / "stage").glob("part-*/*.mds"))  # uploaded shards are not kept locally
    remote = _by_id("s3://humove/prepared")
    assert set(remote) == set(_by_id(raw / "train"))
    # a restart elsewhere (fresh staging folder) finds the finished clips through the uploaded progress
    counts = prepare.main(_args(raw, "s3://humove/prepared", "--local-dir", str(tmp_path / "stage2")))
    assert (counts["skipped_done"], counts["encoded"]) == (CLIPS, 0)
    assert len(_by_id("s3://humove/prepared")) == CLIPS
