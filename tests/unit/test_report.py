"""The demo report (echomotion/report.py) without training: per-task loss curves from two fake runs, sample grids from
fake samples, and the metrics table from a fake eval.json that follows evaluate.py's report contract."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from echomotion.data.synthetic import make_motion, render_clip, sample_spec
from echomotion.report import (GAP, GIF_TOP_H, HEADER_H, LABEL_W, SCALE, STRIPS, TOP_H, Truth, loss_curve_png,
                             metrics_table, sample_grid, task_losses, write_report)
from echomotion.motion import SMPLLayer, SMPLMotion
from echomotion.motion.smpl import write_synthetic_smpl_model
from echomotion.sample import Generated

P1_STEPS, P2_STEPS = 12, 15
FRAMES, ROWS, CELL = 9, 3, 32 * SCALE


def _t2m(step: int) -> float:
    return 2.0 * 0.9**step


def _p2(key: str, step: int) -> float:
    return {"loss/joint/video": 0.5, "loss/joint/motion": 0.3, "loss/m2v/video": 0.4, "loss/v2m/motion": 0.2}[key] / step


# Steps on which a task was drawn (Phase 2: sample 1 cycles joint, m2v, v2m; joint also skips step 7).
P1_PRESENT = [s for s in range(1, P1_STEPS + 1) if s not in (4, 9)]
P2_PRESENT = {
    "loss/joint/video": [s for s in range(1, P2_STEPS + 1) if s % 3 == 1 and s != 7],
    "loss/joint/motion": [s for s in range(1, P2_STEPS + 1) if s % 3 == 1 and s != 7],
    "loss/m2v/video": [s for s in range(1, P2_STEPS + 1) if s % 3 == 2],
    "loss/v2m/motion": [s for s in range(1, P2_STEPS + 1) if s % 3 == 0],
}


@pytest.fixture
def runs(tmp_path: Path) -> list[tuple[str, Path]]:
    """metrics.jsonl of both phases as train.py writes them: a task not drawn on a step is absent, or None (a NaN)."""
    p1, p2 = tmp_path / "phase1", tmp_path / "phase2"
    for d in (p1, p2):
        d.mkdir()
    lines = []
    for s in range(1, P1_STEPS + 1):
        rec = {"step": s, "loss": 1.0, "loss/motion": 1.0, "lr": 1e-3}
        if s in P1_PRESENT:
            rec["loss/t2m/motion"] = _t2m(s)
        elif s == 9:
            rec["loss/t2m/motion"] = None  # MetricsLog writes NaN as null
        lines.append(json.dumps(rec))
    (p1 / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    lines = []
    for s in range(1, P2_STEPS + 1):
        rec = {"step": s, "loss": 1.0, "loss/video": 0.5, "loss/motion": 0.5}
        rec.update({k: _p2(k, s) for k, present in P2_PRESENT.items() if s in present})
        lines.append(json.dumps(rec))
    (p2 / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return [("phase 1", p1), ("phase 2", p2)]


def test_task_losses_skip_missing_steps_and_continue_phase_2(runs):
    series, spans = task_losses(runs)
    assert spans == [("phase 1", 0, P1_STEPS), ("phase 2", P1_STEPS, P1_STEPS + P2_STEPS)]
    assert set(series) == {"loss/t2m/motion", *P2_PRESENT}  # loss, loss/video, lr: not per-task losses
    assert series["loss/t2m/motion"] == [(s, _t2m(s)) for s in P1_PRESENT]
    for key, present in P2_PRESENT.items():
        assert series[key] == [(P1_STEPS + s, _p2(key, s)) for s in present]


def test_loss_curve_plots_the_ema_of_logged_points_only(runs, tmp_path):
    """The smoothed line is a brute-force EMA over the steps that drew the task; missing steps are not zeros."""
    weight = 0.8
    fig = loss_curve_png(runs, tmp_path / "loss.png", smoothing=weight)
    ax = fig.axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    expected = {"t2m / motion": [(s, _t2m(s)) for s in P1_PRESENT]}
    expected.update({k[5:].replace("/", " / "): [(P1_STEPS + s, _p2(k, s)) for s in v] for k, v in P2_PRESENT.items()})
    for label, pts in expected.items():
        xs, ys = zip(*pts)
        smooth = [ys[0]]
        for y in ys[1:]:
            smooth.append(weight * smooth[-1] + (1 - weight) * y)
        np.testing.assert_array_equal(lines[label].get_xdata(), xs)
        np.testing.assert_allclose(lines[label].get_ydata(), smooth, rtol=1e-12)
    raw = [c.get_offsets() for c in ax.collections]
    assert sorted(len(o) for o in raw) == sorted(len(p) for p in expected.values())
    assert min(float(np.min(o[:, 1])) for o in raw) > 0  # no step plotted as a zero loss
    boundary = [ln for ln in ax.get_lines() if list(ln.get_xdata()) == [P1_STEPS, P1_STEPS]]
    assert len(boundary) == 1, "one marker at the phase boundary"
    assert ax.get_yscale() == "log" and ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
    assert sorted(t.get_text() for t in ax.get_legend().get_texts()) == sorted(expected)
    fig.canvas.draw()
    ticks = [t.get_text() for t in ax.get_yticklabels() + ax.get_yticklabels(minor=True) if t.get_text()]
    assert len(ticks) >= 2, "the log axis has labelled ticks"
    with Image.open(tmp_path / "loss.png") as img:
        assert img.size == (1100, 500)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> list[tuple[SMPLMotion, np.ndarray, str]]:
    """Three HuMoVe-mini clips (motion, rendered 32x32 video, caption), made directly: no shards, no mp4s."""
    layer = SMPLLayer(write_synthetic_smpl_model(tmp_path_factory.mktemp("smpl") / "smpl.pkl"))
    out = []
    for i, action in enumerate(["walk", "wave", "jump"]):
        spec = sample_spec(np.random.default_rng(i), action)
        motion = make_motion(layer, spec, num_frames=FRAMES)
        caption = f"a person in a {spec.shirt} shirt and {spec.trousers} trousers {action}s on a {spec.background} background"
        out.append((motion, render_clip(motion.joints, spec.shirt, spec.trousers, spec.background), caption))
    return out


def _samples(task: str, clips) -> tuple[list[Generated], list[Truth]]:
    """Fake outputs: generated videos / motions are the NEXT clip's, so generated and ground truth differ."""
    gens, truths = [], []
    for i, (motion, video, caption) in enumerate(clips):
        other_motion, other_video, _ = clips[(i + 1) % len(clips)]
        name = f"hm-{i:06d}"
        gens.append({
            "t2vm": Generated(name, caption, other_video, other_motion),
            "t2m": Generated(name, caption, None, other_motion),
            "m2v": Generated(name, caption, other_video, None, given_motion=motion),
            "v2m": Generated(name, caption, None, other_motion, given_video=video),
        }[task])
        truths.append(Truth(video, motion.joints))
    return gens, truths


def _cell(img: np.ndarray, row: int, strip: int, frame: int, strips: int) -> np.ndarray:
    y = TOP_H + row * (HEADER_H + strips * (CELL + GAP)) + HEADER_H + strip * (CELL + GAP)
    x = LABEL_W + frame * (CELL + GAP)
    return img[y : y + CELL, x : x + CELL]


def _up(frame: np.ndarray) -> np.ndarray:
    return frame.repeat(SCALE, 0).repeat(SCALE, 1)


@pytest.mark.parametrize("task", ["t2vm", "t2m", "m2v", "v2m"])
def test_sample_grid_rows_times_frames(task, clips, tmp_path):
    gens, truths = _samples(task, clips)
    png, gif = sample_grid(task, gens, truths, tmp_path / task, fps=8.0)
    k = len(STRIPS[task])
    img = np.asarray(Image.open(png).convert("RGB"))
    assert img.shape[:2] == (TOP_H + ROWS * (HEADER_H + k * (CELL + GAP)), LABEL_W + FRAMES * (CELL + GAP))
    with Image.open(gif) as anim:
        assert anim.n_frames == FRAMES
        assert anim.size == (LABEL_W + k * (CELL + GAP), GIF_TOP_H + ROWS * (CELL + GAP))
    for r in range(ROWS):
        nxt_video = clips[(r + 1) % ROWS][1]
        for t in (0, FRAMES - 1):
            if task in ("t2vm", "m2v"):  # the generated video, upscaled x4 nearest
                np.testing.assert_array_equal(_cell(img, r, 0, t, k), _up(nxt_video[t]))
            if task == "m2v":  # the held-out clip's own video, for comparison
                np.testing.assert_array_equal(_cell(img, r, 2, t, k), _up(clips[r][1][t]))
            if task == "v2m":  # the given video
                np.testing.assert_array_equal(_cell(img, r, 0, t, k), _up(clips[r][1][t]))
            skeleton = _cell(img, r, 1 if task != "t2m" else 0, t, k)
            assert (skeleton.max(-1) > 0).sum() > 100, "a skeleton is drawn on black"


def test_v2m_skeletons_share_one_camera(clips, tmp_path):
    """A generated body half the size of the ground truth must look half the size, not be fitted to fill its cell."""
    motion, video, caption = clips[0]
    small = SMPLMotion(motion.betas, motion.global_orient, motion.body_pose, motion.transl, motion.joints * 0.5)
    png, _ = sample_grid("v2m", [Generated("hm-0", caption, None, small, given_video=video)], [Truth(video, motion.joints)],
                         tmp_path, fps=8.0)
    img = np.asarray(Image.open(png).convert("RGB"))

    def height(cell: np.ndarray) -> int:
        rows = np.flatnonzero(cell.max(-1).max(-1) > 0)
        return int(rows[-1] - rows[0])

    gen, gt = _cell(img, 0, 1, 0, 3), _cell(img, 0, 2, 0, 3)
    assert height(gen) < 0.7 * height(gt)


EVAL = {
    "metrics": {"v2m_mpjpe": 50.0, "v2m_mpjpe_mean_pose": 80.0, "v2m_mpjpe_depth_unknown": 12.0, "m2v_error": 30.0,
                "m2v_error_shuffled": 20.0, "v2m_palette_acc": 0.2, "v2m_palette_acc_shuffled": 0.3,
                "chance_palette": 0.25},
    "baselines": {"v2m_mpjpe": ["v2m_mpjpe_mean_pose"], "m2v_error": ["m2v_error_shuffled"],
                  "v2m_palette_acc": ["v2m_palette_acc_shuffled", "chance_palette"]},
    "higher_is_better": {"v2m_mpjpe": False, "v2m_mpjpe_mean_pose": False, "v2m_mpjpe_depth_unknown": False,
                         "m2v_error": False, "m2v_error_shuffled": False, "v2m_palette_acc": True,
                         "v2m_palette_acc_shuffled": True, "chance_palette": True},
    "better_than_baseline": {"v2m_mpjpe": True, "m2v_error": False, "v2m_palette_acc": False},
    "units": {"v2m_mpjpe": "mm", "v2m_mpjpe_mean_pose": "mm", "v2m_mpjpe_depth_unknown": "mm", "m2v_error": "px",
              "m2v_error_shuffled": "px", "v2m_palette_acc": "fraction", "v2m_palette_acc_shuffled": "fraction",
              "chance_palette": "fraction"},
}


def _table_rows(lines: list[str]) -> list[list[str]]:
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines if ln.startswith("| ")]
    return rows[1:]  # without the header


def test_metrics_table_follows_the_contract():
    lines = metrics_table(EVAL)
    assert _table_rows(lines) == [
        ["v2m_mpjpe", "50", "v2m_mpjpe_mean_pose = 80", "lower", "yes"],
        ["m2v_error", "30", "m2v_error_shuffled = 20", "lower", "NO"],
        ["v2m_palette_acc", "0.2", "v2m_palette_acc_shuffled = 0.3; chance_palette = 0.25", "higher", "NO"],
        ["v2m_mpjpe_depth_unknown", "12", "—", "lower", "— (reference, no baseline)"],
    ]
    assert any("v2m_mpjpe_depth_unknown = 12" in ln for ln in lines)
    assert "- v2m_palette_acc, v2m_palette_acc_shuffled, chance_palette: fraction" in lines
    without = json.loads(json.dumps(EVAL))
    del without["metrics"]["v2m_mpjpe_depth_unknown"]
    assert not any("depth_unknown" in ln for ln in metrics_table(without))


def test_report_sections_and_relative_links(runs, clips, tmp_path):
    out = tmp_path
    loss_curve_png(runs, out / "loss.png")
    grids = {}
    for task in ("t2vm", "m2v"):
        gens, truths = _samples(task, clips)
        grids[task] = sample_grid(task, gens, truths, out / "samples" / task, fps=8.0)
    report = write_report(out, {"data": 1.0, "phase 1": 2.0}, EVAL, grids)
    text = report.read_text()
    heads = [ln for ln in text.splitlines() if ln.startswith("## ")]
    assert [h.split(" (")[0] for h in heads] == ["## Stage timings", "## Loss curves", "## Evaluation on held-out clips",
                                                 "## text -> video + motion", "## motion -> video"]
    links = re.findall(r"\]\(([^)]+)\)", text)
    assert {"loss.png", "samples/t2vm/grid.png", "samples/t2vm/grid.gif", "samples/m2v/grid.png",
            "samples/m2v/grid.gif"} <= set(links)
    assert all((out / link).exists() for link in links)
    assert "| m2v_error | 30 | m2v_error_shuffled = 20 | lower | NO |" in text


def test_the_demo_config_fits_the_demo_data_and_export():
    """configs/demo.yaml validates, reads what the demo writes (the PCA codec's components) and keeps the EMA copy the
    demo exports (`export_checkpoint.py --ema`); no test trains the 11-minute demo itself."""
    import inspect

    from echomotion.config import load_config
    from echomotion.data.synthetic import generate_humove_mini

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs/demo.yaml")
    channels = inspect.signature(generate_humove_mini).parameters["codec_channels"].default
    assert cfg.model.in_channels == cfg.model.out_channels == channels
    assert cfg.model.abs_pos == "sincos" and cfg.train.ema_decay > 0
