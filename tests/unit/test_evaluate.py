"""Held-out evaluation: metric functions against brute force, the caption parser, an oracle that must score ~0 and beat
every baseline, and an end-to-end CLI run of a tiny random model on a tiny HuMoVe-mini."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from echomotion.config import load_config
from echomotion.data.synthetic import ACTIONS, COLOURS, generate_humove_mini, sample_spec
from echomotion.data.encoders import pad_text
from echomotion.evaluate import (
    mean_pose_joints,
    BASELINES,
    CHECKS,
    METRICS,
    EvalData,
    EvalSettings,
    EvaluationError,
    Generated,
    build_report,
    clip_batches,
    derangement,
    evaluate,
    fk_joints,
    mean_abs_pixel_error,
    parse_caption_colours,
    root_relative_mpjpe,
    score,
    without_depth,
)
from echomotion.export import load_exported, save_exported
from echomotion.models import EchoMotionDiT
from echomotion.models.echomotion import Prediction, Task
from tests.tool_scripts import load_tool

ROOT = Path(__file__).resolve().parents[2]


def _brute_mpjpe(pred: np.ndarray, gt: np.ndarray) -> float:
    total, count = 0.0, 0
    for f in range(gt.shape[0]):
        p = pred[min(f, pred.shape[0] - 1)]
        for j in range(gt.shape[1]):
            d = (p[j] - p[0]) - (gt[f, j] - gt[f, 0])
            total += math.sqrt(float(d[0]) ** 2 + float(d[1]) ** 2 + float(d[2]) ** 2)
            count += 1
    return 1000.0 * total / count


# --- metric functions --------------------------------------------------------------------------------------------------


def test_mpjpe_matches_brute_force_loop():
    rng = np.random.default_rng(0)
    gt, pred = rng.normal(size=(2, 5, 24, 3))
    assert root_relative_mpjpe(pred, gt) == pytest.approx(_brute_mpjpe(pred, gt), rel=1e-12)
    one = pred[:1]  # one pose for every frame (the mean-pose baseline)
    assert root_relative_mpjpe(one, gt) == pytest.approx(_brute_mpjpe(one, gt), rel=1e-12)
    assert root_relative_mpjpe(torch.from_numpy(pred), torch.from_numpy(gt)) == pytest.approx(_brute_mpjpe(pred, gt))


def test_mpjpe_is_root_relative_in_mm_equivalent():
    rng = np.random.default_rng(1)
    gt = rng.normal(size=(4, 24, 3))
    moved = gt + rng.normal(size=(4, 1, 3)) * 10  # a different global translation per frame
    assert root_relative_mpjpe(moved, gt) == pytest.approx(0.0, abs=1e-9)
    off = gt.copy()
    off[:, 5] += [0.0, 0.003, 0.004]  # one joint of 24 off by 5 mm in every frame
    assert root_relative_mpjpe(off, gt) == pytest.approx(5.0 / 24)
    with pytest.raises(ValueError, match="joints must be"):
        root_relative_mpjpe(gt[:2], gt)


def test_depth_unknown_reference_is_the_mean_depth_offset():
    """Flattening depth moves each joint by its depth relative to the pelvis, so the reference is mean |z_j - z_0|."""
    rng = np.random.default_rng(2)
    gt = torch.from_numpy(rng.normal(size=(3, 24, 3)))
    flat = without_depth(gt)
    assert torch.equal(flat[..., :2], gt[..., :2]) and torch.equal(flat[..., 2], gt[:, :1, 2].expand(3, 24))
    want = 1000.0 * (gt[..., 2] - gt[:, :1, 2]).abs().mean().item()
    assert root_relative_mpjpe(flat, gt) == pytest.approx(want, rel=1e-12)
    planar = gt.clone()
    planar[..., 2] = 0.7  # a body in a plane facing the camera loses nothing
    assert root_relative_mpjpe(without_depth(planar), planar) == 0.0


def test_mean_abs_pixel_error_on_hand_made_frames():
    a = np.zeros((2, 2, 2, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0] = 255  # 3 values of 24 differ by 255 (a uint8 difference would wrap to 1)
    b[1, 1, 1, 0] = 24
    assert mean_abs_pixel_error(a, b) == pytest.approx((3 * 255 + 24) / 24)
    assert mean_abs_pixel_error(b, a) == mean_abs_pixel_error(a, b)
    assert mean_abs_pixel_error(b, b) == 0.0
    with pytest.raises(ValueError, match="shape"):
        mean_abs_pixel_error(a, b[:1])
    with pytest.raises(ValueError, match="uint8"):
        mean_abs_pixel_error(a.astype(np.float32), b)


def test_derangement_has_no_fixed_points_and_is_seeded():
    for n in range(2, 40):
        for seed in range(5):
            perm = derangement(n, seed)
            assert sorted(perm.tolist()) == list(range(n))
            assert not np.any(perm == np.arange(n)), (n, seed, perm)
    assert np.array_equal(derangement(20, 3), derangement(20, 3))
    assert not np.array_equal(derangement(20, 3), derangement(20, 4))
    with pytest.raises(EvaluationError, match=">= 2 clips"):
        derangement(1, 0)


def test_caption_colours_round_trip_every_generated_caption():
    rng = np.random.default_rng(0)
    for _ in range(50):
        for action in ACTIONS:
            spec = sample_spec(rng, action)
            assert parse_caption_colours(spec.caption()) == (spec.shirt, spec.trousers, spec.background)
    caption = "a person in an orange shirt and grey trousers runs quickly on a white background"
    assert parse_caption_colours(caption) == ("orange", "grey", "white")
    with pytest.raises(EvaluationError, match="not a HuMoVe-mini caption"):
        parse_caption_colours("a person runs")
    with pytest.raises(EvaluationError, match="unknown colours"):
        parse_caption_colours("a person in a teal shirt and grey trousers runs on a white background")
    assert "teal" not in COLOURS


def test_pad_text_zero_pads_and_truncates_like_collate():
    emb = torch.arange(12, dtype=torch.float16).reshape(4, 3)
    padded = pad_text(emb, 6)
    assert padded.dtype == torch.float16 and padded.shape == (6, 3)
    assert torch.equal(padded[:4], emb) and not padded[4:].any()
    assert torch.equal(pad_text(emb, 2), emb[:2])
    assert pad_text(torch.zeros(0, 3), 5).shape == (5, 3)  # the empty prompt


def test_clip_batches_cover_every_clip_in_order():
    assert [list(b) for b in clip_batches(5, 2)] == [[0, 1], [2, 3], [4]]
    assert [list(b) for b in clip_batches(3, 8)] == [[0, 1, 2]]


# --- on a tiny HuMoVe-mini ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    data = root / "humove-mini"
    generate_humove_mini(data, clips=8, num_frames=9, heldout_fraction=0.5, progress=False)
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["model.num_layers=1", "model.dim=32", "model.ffn_dim=64",
                                                       "sample.steps=2"])
    torch.manual_seed(0)
    ckpt = save_exported(EchoMotionDiT(cfg.model), cfg, root / "model.safetensors")
    yield data, ckpt, root


def test_oracle_scores_zero_and_beats_every_baseline(setup):
    """The ground truth fed in as the 'generated' outputs: every metric ~0, every baseline clearly above it."""
    data_dir, _, _ = setup
    data = EvalData.load(data_dir, "heldout", text_len=16)
    assert len(data.clips) == 4
    gt = Generated(
        v2m_motion=[c.motion for c in data.clips],
        m2v_video=[c.latent for c in data.clips],
        t2vm_video=[c.latent for c in data.clips],
        t2vm_motion=[c.motion for c in data.clips],
    )
    metrics, checks, records = score(data, gt, seed=0)
    # render_clip(gt joints, caption colours) reproduces the stored pixel-codec video exactly.
    assert checks["render_vs_gt_video_error"] == 0.0
    assert checks["fk_vs_gt_joints_mpjpe"] < 1e-3  # FK of the stored SMPL parameters gives the stored joints
    assert metrics["v2m_mpjpe"] < 1e-3 and metrics["v2m_mpjpe_tokens"] < 1e-3
    assert metrics["m2v_error"] == 0.0
    assert metrics["t2vm_consistency"] < 0.05  # FK joints vs stored joints differ by float rounding only
    assert metrics["v2m_mpjpe_mean_pose"] > 20.0
    assert 0.0 < metrics["v2m_mpjpe_depth_unknown"] < metrics["v2m_mpjpe_mean_pose"]
    assert metrics["m2v_error_shuffled"] > 1.0 and metrics["t2vm_consistency_mismatched"] > 1.0
    report = build_report(data, EvalSettings(steps=1), metrics, checks, records)
    assert all(report["better_than_baseline"].values())
    assert [r["clip_id"] for r in records] == [c.clip_id for c in data.clips]


def test_mean_pose_is_the_training_clips_mean_root_relative_pose(setup):
    """The baseline, brute force: every training frame's root-relative joints averaged, against what motion_stats gives."""
    data_dir, _, _ = setup
    train = EvalData.load(data_dir, "train", text_len=16)
    frames = torch.cat([c.joints - c.joints[:, :1] for c in train.clips])  # [frames, 24, 3]
    got = mean_pose_joints(train.stats)
    torch.testing.assert_close(got - got[:, :1], frames.mean(0, keepdim=True), atol=1e-5, rtol=0)


def test_cli_end_to_end_on_a_tiny_random_model(setup, capsys):
    data_dir, ckpt, root = setup
    out = root / "report.json"
    cli = load_tool("evaluate")
    cli.main(["--checkpoint", str(ckpt), "--data", str(data_dir), "--out", str(out), "--max-clips", "3",
              "--batch-size", "2", "--seed", "5", "--no-progress"])
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert set(report["metrics"]) == set(METRICS) and set(report["checks"]) == set(CHECKS)
    assert all(math.isfinite(v) for v in (*report["metrics"].values(), *report["checks"].values()))
    assert set(report["better_than_baseline"]) == set(BASELINES)
    assert all(isinstance(v, bool) for v in report["better_than_baseline"].values())
    assert set(report["units"]) >= set(METRICS) | set(CHECKS)
    assert report["counts"] == {"clips": 3, "frames": 27, "batches": 2}
    assert report["settings"]["steps"] == 2 and report["settings"]["seed"] == 5  # steps from the exported config
    assert report["checkpoint"] == str(ckpt) and report["data"] == str(data_dir) and report["split"] == "heldout"
    assert len(report["per_clip"]) == 3
    assert report["checks"]["render_vs_gt_video_error"] == 0.0
    assert "v2m_mpjpe_mean_pose" in printed and str(out) in printed

    # Deterministic for a seed: the library call with the same settings reproduces the CLI's numbers.
    model, cfg = load_exported(ckpt)
    settings = EvalSettings.from_config(cfg.sample, seed=5, batch_size=2, max_clips=3)
    again = evaluate(model, cfg, data_dir, settings, checkpoint=str(ckpt))
    assert again["metrics"] == report["metrics"]

    with pytest.raises(EvaluationError, match="holds no shards"):
        evaluate(model, cfg, data_dir, settings, split="nope")


@pytest.mark.parametrize("args, message", [
    (["--max-clips", "1"], "max_clips must be >= 2"),
    (["--split", "motion_only"], "motion_only holds no shards"),
    (["--split", "nope"], "nope holds no shards"),
    (["--steps", "0"], "steps must be >= 1, got 0"),
    (["--batch-size", "0"], "batch_size must be >= 1, got 0"),
    (["--checkpoint", "missing.safetensors"], "missing.safetensors does not exist; create it with tools/export_checkpoint.py"),
    (["--checkpoint", "model.yaml"], "model.yaml is not a safetensors file .*; pass the .safetensors an export writes"),
    (["--checkpoint", "."], "is a folder, not an exported .safetensors file; .* export it first"),
])
def test_cli_user_errors_are_one_line_and_exit_2(setup, capsys, args, message):
    """A bad flag, split or checkpoint is the user's to fix: `evaluate: <message>` and exit 2, not a traceback."""
    data_dir, ckpt, root = setup
    given = dict(zip(args[::2], args[1::2]))
    if "--checkpoint" in given:
        given["--checkpoint"] = str(root / given["--checkpoint"])  # model.yaml: the export's config copy, not weights
    flags = {"--checkpoint": str(ckpt), "--data": str(data_dir), "--out": str(root / "bad.json"), **given}
    with pytest.raises(SystemExit) as exited:
        load_tool("evaluate").main([*(w for kv in flags.items() for w in kv), "--no-progress"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1
    assert re.fullmatch(rf"evaluate: .*{message}.*\n", err), err
    assert not (root / "bad.json").exists()


# --- tools/probe_conditioning.py ---------------------------------------------------------------------------------------


class _LookupOracle(nn.Module):
    """Knows every clip's clean motion by its video latent and answers V2M with the exact velocity (x_sigma - x0) / sigma:
    the posterior mean is then that clip's motion. With the video hidden it answers the dataset's mean (0 normalized)."""

    def __init__(self, clips):
        super().__init__()
        self.clips = clips

    def forward(self, video, video_timestep, video_mask, motion, motion_timestep, text, task):
        assert bool((video_timestep == 0).all()) and bool((task == int(Task.V2M)).all())
        sigma = motion_timestep[:, None, None] / 1000.0
        x0 = torch.stack([
            next(c.motion for c in self.clips if torch.equal(c.latent, v)) if shown else torch.zeros_like(motion[0])
            for v, shown in zip(video, video_mask)
        ])
        return Prediction(None, (motion - x0) / sigma)


def test_probe_reads_the_posterior_mean_of_each_condition(setup, capsys):
    """Against a lookup oracle: own video -> that clip's motion (MPJPE ~0); another clip's video -> that clip's motion
    (MPJPE = brute-force MPJPE between the two clips); hidden -> the mean pose. Flow MSE against the true velocity is ~0
    with the own video only."""
    data_dir, ckpt, _ = setup
    tool = load_tool("probe_conditioning")
    data = EvalData.load(data_dir, "heldout", text_len=16)
    clips = data.clips
    report = tool.probe(_LookupOracle(clips), data, sigmas=[0.5, 1.0], seed=3, batch_size=3)
    other = derangement(len(clips), 3)
    swapped = np.mean([
        _brute_mpjpe(fk_joints(data.layer, clips[int(other[i])].features).numpy(), c.joints.numpy())
        for i, c in enumerate(clips)
    ])
    posed_mean = fk_joints(data.layer, data.stats.mean[None]).numpy()
    mean_features = np.mean([_brute_mpjpe(posed_mean, c.joints.numpy()) for c in clips])
    for sigma in ("0.5", "1"):
        assert report["probe"][f"own@{sigma}"]["mpjpe"] < 1e-3
        assert report["probe"][f"own@{sigma}"]["flow_mse"] < 1e-9
        assert report["probe"][f"other@{sigma}"]["mpjpe"] == pytest.approx(swapped, rel=1e-4)
        assert report["probe"][f"other@{sigma}"]["flow_mse"] > 1e-3
        # hidden: the oracle answers 0 in normalized space, i.e. the mean features posed by FK, which averages the
        # clips' facings into one: a weaker guess than the mean joint positions the baseline uses
        assert report["probe"][f"hidden@{sigma}"]["mpjpe"] == pytest.approx(mean_features, rel=1e-4)
        assert report["mean_pose_mpjpe"] < mean_features
    with pytest.raises(ValueError, match=r"must lie in \(0, 1\]"):
        tool.probe(_LookupOracle(clips), data, sigmas=[0.0])

    # The CLI on a real (random) model: the table and the JSON.
    out = data_dir.parent / "probe.json"
    tool.main(["--checkpoint", str(ckpt), "--data", str(data_dir), "--out", str(out), "--max-clips", "3"])
    written = json.loads(out.read_text())
    assert set(written["probe"]) == {f"{c}@{s}" for c in ("own", "other", "hidden") for s in ("0.5", "1")}
    assert written["clips"] == 3 and "own@1" in capsys.readouterr().out
