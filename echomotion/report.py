"""The demo's report: per-task loss curves, sample grids (PNG and animated GIF) and the metrics table of eval.json,
written as report.md. Pure functions of files a run leaves behind (metrics.jsonl, eval.json) and of generated samples,
so a report can be rebuilt or tested without training.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import imageio.v3 as iio
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg through the object API: no pyplot, no global backend
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator
from matplotlib.transforms import blended_transform_factory
from PIL import Image, ImageDraw, ImageFont

from .metrics import read_metrics
from .motion.render import render_skeleton

if TYPE_CHECKING:
    from .data.schema import Sample
    from .sample import Generated, InferenceContext


# ---------------------------------------------------------------------------------------------------------------------
# Loss curves

LossSeries = dict[str, list[tuple[int, float]]]
_TASK_COLOURS = {"t2m": "#1f77b4", "joint": "#d62728", "m2v": "#2ca02c", "v2m": "#9467bd"}
_TASK_ORDER = ("t2m", "joint", "m2v", "v2m")


def _is_task_loss(key: str) -> bool:
    return key.startswith("loss/") and key.count("/") == 2


def task_losses(runs: list[tuple[str, Path]]) -> tuple[LossSeries, list[tuple[str, int, int]]]:
    """Per-task losses (`loss/<task>/<modality>`) of consecutive runs on one step axis, each run's steps continuing
    after the previous run's last step; and each run's (name, first, last) step on that axis.

    A key that is absent, None or non-finite on a step (no sample drew that task) is skipped, not read as 0: a zero
    would draw a false dive to the bottom of the plot. Non-positive values cannot sit on the log axis and are skipped.
    """
    series: LossSeries = {}
    spans: list[tuple[str, int, int]] = []
    offset = 0
    for name, run_dir in runs:
        recs = [r for r in read_metrics(run_dir) if isinstance(r.get("step"), int)]
        for r in recs:
            for key, value in r.items():
                if _is_task_loss(key) and type(value) in (int, float) and math.isfinite(value) and value > 0:
                    series.setdefault(key, []).append((offset + r["step"], float(value)))
        last = max((r["step"] for r in recs), default=0)
        spans.append((name, offset, offset + last))
        offset += last
    for pts in series.values():
        pts.sort()
    return series, spans


def ema(values: Sequence[float], weight: float) -> list[float]:
    """Exponential moving average over the logged points only, started at the first point: steps where a task was not
    drawn add nothing, so gaps neither pull the curve down nor decay it."""
    out: list[float] = []
    for v in values:
        out.append(v if not out else weight * out[-1] + (1 - weight) * v)
    return out


def _loss_order(key: str) -> tuple[int, str]:
    task = key.split("/")[1]
    return (_TASK_ORDER.index(task) if task in _TASK_ORDER else len(_TASK_ORDER), key)


def loss_curve_png(runs: list[tuple[str, Path]], path: Path, smoothing: float = 0.95) -> Figure:
    """One curve per task and modality across all runs (Phase 2 after Phase 1, a dotted line at each boundary), drawn
    with matplotlib for real log-scale ticks and a legend. Returns the figure so tests can read what was plotted."""
    series, spans = task_losses(runs)
    fig = Figure(figsize=(11, 5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, key in enumerate(sorted(series, key=_loss_order)):
        task, modality = key.split("/")[1:]
        colour = _TASK_COLOURS.get(task, f"C{4 + i % 6}")
        xs, ys = zip(*series[key])
        ax.scatter(xs, ys, s=8, color=colour, alpha=0.3, linewidths=0, label="_nolegend_")
        ax.plot(xs, ema(ys, smoothing), color=colour, linestyle="--" if modality == "motion" else "-", linewidth=1.8,
                label=f"{task} / {modality}")
    top = blended_transform_factory(ax.transData, ax.transAxes)
    for name, first, last in spans:
        if first > 0:
            ax.axvline(first, color="0.35", linestyle=":", linewidth=1.2)
        if last > first:
            ax.text((first + last) / 2, 0.98, name, transform=top, ha="center", va="top", fontsize=10, color="0.25")
    if series:
        ax.set_yscale("log")  # ticks at 1, 2, 5 x 10^k written as plain numbers: decades alone are too sparse to read
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.legend(title="task / modality", loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)
    else:
        ax.text(0.5, 0.5, "no per-task losses logged", transform=ax.transAxes, ha="center", va="center")
    ax.set_xlim(0, 1.01 * max((last for _, _, last in spans), default=1) or 1)
    ax.set_xlabel("training step (Phase 2 steps continue after Phase 1's last step)")
    ax.set_ylabel("loss (log scale)")
    ax.set_title(f"Training loss per task: lines = EMA (weight {smoothing}) over the steps that drew the task, "
                 "dots = logged values", fontsize=11)
    ax.grid(True, which="major", alpha=0.4)
    ax.grid(True, which="minor", alpha=0.15)
    fig.savefig(path)
    return fig


# ---------------------------------------------------------------------------------------------------------------------
# Sample grids

SCALE = 4  # nearest-neighbour upscale of the 32x32 frames
GAP = 2  # white pixels between cells
LABEL_W = 130  # left column: strip names (PNG) or clip id + caption (GIF)
HEADER_H = 20  # PNG: a row's "clip id: caption" line
TOP_H = 20  # PNG: frame numbers above the columns
GIF_TOP_H = 36  # GIF: the frame counter and the strip names (two lines) above the columns
STRIPS = {  # task -> the strips of one row, top to bottom in grid.png and left to right in grid.gif
    "t2vm": ("generated video", "skeleton of the generated motion"),
    "t2m": ("skeleton of the generated motion",),
    "m2v": ("generated video", "skeleton of the given motion", "ground-truth video"),
    "v2m": ("given video", "skeleton of the generated motion", "ground-truth skeleton"),
}
Strip = tuple[str, Optional[np.ndarray]]  # (name, uint8 frames [F, h, w, 3] at cell size, or None: not available)


@dataclass
class Truth:
    """A held-out clip's ground truth, which `Generated` does not carry: the decoded video latent (m2v's reference) and
    the joints (v2m's reference)."""

    video: Optional[np.ndarray] = None  # uint8 [F, H, W, 3]
    joints: Optional[Any] = None  # [F, 24, 3] tensor or array


@functools.lru_cache(maxsize=4)
def _font(size: int) -> ImageFont.FreeTypeFont:
    from matplotlib import font_manager  # its bundled DejaVu Sans: PIL's default bitmap font is too small to read

    return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)


def _resize(frames: Optional[np.ndarray], cell: tuple[int, int]) -> Optional[np.ndarray]:
    """Nearest-neighbour resize to the cell (x4 for HuMoVe-mini): pixels stay sharp, nothing is invented."""
    if frames is None:
        return None
    h, w = cell
    if frames.shape[1:3] == (h, w):
        return frames
    return np.stack([np.asarray(Image.fromarray(f).resize((w, h), Image.NEAREST)) for f in frames])


def _skeletons(joint_sets: list[Any], cell: tuple[int, int]) -> list[Optional[np.ndarray]]:
    """Skeleton frames of several motions drawn at cell size with ONE camera fitted to all of them, so a generated
    motion sits at the same scale and place as the ground truth beside it (fitted alone, a wrong size would hide)."""
    arrays = [None if j is None else np.asarray(j, np.float64) for j in joint_sets]
    present = [a for a in arrays if a is not None]
    if not present:
        return [None] * len(arrays)
    frames = render_skeleton(np.concatenate(present), *cell, background=(0, 0, 0), line_width=2, joint_radius=2)
    out: list[Optional[np.ndarray]] = []
    start = 0
    for a in arrays:
        out.append(None if a is None else frames[start : start + len(a)])
        start += 0 if a is None else len(a)
    return out


def grid_strips(task: str, g: Generated, truth: Truth, cell: tuple[int, int]) -> list[Strip]:
    """The strips of one sample's row (names in STRIPS[task]): what was generated, what it was conditioned on, and for
    m2v / v2m the held-out clip's ground truth to compare with."""
    joints = lambda m: None if m is None else m.joints  # noqa: E731
    if task == "t2vm":
        frames = [_resize(g.video, cell), *_skeletons([joints(g.motion)], cell)]
    elif task == "t2m":
        frames = _skeletons([joints(g.motion)], cell)
    elif task == "m2v":
        frames = [_resize(g.video, cell), *_skeletons([joints(g.given_motion)], cell), _resize(truth.video, cell)]
    elif task == "v2m":
        frames = [_resize(g.given_video, cell), *_skeletons([joints(g.motion), truth.joints], cell)]
    else:
        raise ValueError(f"unknown task {task!r}: choose one of {sorted(STRIPS)}")
    return list(zip(STRIPS[task], frames))


def _fit(text: str, font: ImageFont.FreeTypeFont, width: int) -> str:
    """The text, cut with an ellipsis to fit the width in pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text.rstrip() + "…"


def _wrap(text: str, font: ImageFont.FreeTypeFont, width: int, max_lines: int) -> str:
    """Word-wrap to the width in pixels; the last line that fits gets an ellipsis if text is left over."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(lines[-1] + " " + word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = _fit(lines[-1] + " …", font, width)
    return "\n".join(_fit(ln, font, width) for ln in lines)


def _paste(img: Image.Image, draw: ImageDraw.ImageDraw, frames: Optional[np.ndarray], t: int, xy: tuple[int, int],
           cell: tuple[int, int]) -> None:
    """Frame t of a strip, or a grey "n/a" cell where the strip is missing or shorter."""
    if frames is not None and t < len(frames):
        img.paste(Image.fromarray(frames[t]), xy)
    else:
        draw.rectangle([xy[0], xy[1], xy[0] + cell[1] - 1, xy[1] + cell[0] - 1], fill=(200, 200, 200))
        draw.text((xy[0] + cell[1] // 2, xy[1] + cell[0] // 2), "n/a", fill="black", anchor="mm", font=_font(12))


def _film_png(rows: list[tuple[str, list[Strip]]], cell: tuple[int, int], frames: int) -> Image.Image:
    """Filmstrip grid: per sample a "clip id: caption" line, then its strips stacked, one column per frame, so the
    video and the skeleton of the same instant sit one above the other."""
    h, w = cell
    row_h = HEADER_H + len(rows[0][1]) * (h + GAP)
    img = Image.new("RGB", (LABEL_W + frames * (w + GAP), TOP_H + len(rows) * row_h), "white")
    draw, font = ImageDraw.Draw(img), _font(12)
    for t in range(frames):
        draw.text((LABEL_W + t * (w + GAP) + w // 2, TOP_H // 2), f"frame {t}", fill="black", anchor="mm", font=font)
    for r, (label, strips) in enumerate(rows):
        y = TOP_H + r * row_h
        draw.line([(0, y), (img.width, y)], fill=(150, 150, 150))
        draw.text((4, y + HEADER_H // 2), _fit(label, _font(13), img.width - 8), fill="black", anchor="lm",
                  font=_font(13))
        for s, (name, strip) in enumerate(strips):
            ys = y + HEADER_H + s * (h + GAP)
            draw.multiline_text((4, ys + h // 2), _wrap(name, font, LABEL_W - 10, 4), fill="black", anchor="lm",
                                font=font)
            for t in range(frames):
                _paste(img, draw, strip, t, (LABEL_W + t * (w + GAP), ys), cell)
    return img


def _gif_frame(rows: list[tuple[str, list[Strip]]], cell: tuple[int, int], t: int, frames: int) -> np.ndarray:
    """One instant of the animated grid: per sample its clip id + caption, then its strips side by side at frame t."""
    h, w = cell
    names = [name for name, _ in rows[0][1]]
    img = Image.new("RGB", (LABEL_W + len(names) * (w + GAP), GIF_TOP_H + len(rows) * (h + GAP)), "white")
    draw, font = ImageDraw.Draw(img), _font(11)
    draw.text((4, GIF_TOP_H // 2), f"frame {t}/{frames - 1}", fill="black", anchor="lm", font=_font(12))
    for s, name in enumerate(names):
        draw.multiline_text((LABEL_W + s * (w + GAP) + w // 2, GIF_TOP_H // 2), _wrap(name, font, w - 4, 2),
                            fill="black", anchor="mm", align="center", font=font)
    for r, (label, strips) in enumerate(rows):
        y = GIF_TOP_H + r * (h + GAP)
        draw.multiline_text((4, y + 2), _wrap(label, font, LABEL_W - 8, max(1, h // 14)), fill="black", font=font)
        for s, (_, strip) in enumerate(strips):
            _paste(img, draw, strip, t, (LABEL_W + s * (w + GAP), y), cell)
    return np.asarray(img)


def sample_grid(task: str, gens: Sequence[Generated], truths: Optional[Sequence[Truth]], out_dir: Path, fps: float,
                scale: int = SCALE) -> tuple[Path, Path]:
    """`grid.png` (all frames, one row per sample) and `grid.gif` (the same rows animated) of one task, so a reader sees
    every held-out sample and its reference at once instead of opening one folder per sample."""
    if not gens:
        raise ValueError(f"{task}: no samples to put in a grid")
    truths = list(truths) if truths is not None else [Truth() for _ in gens]
    if len(truths) != len(gens):
        raise ValueError(f"{task}: {len(gens)} samples but {len(truths)} ground truths")
    videos = [v for g in gens for v in (g.video, g.given_video) if v is not None]
    videos += [t.video for t in truths if t.video is not None]
    cell = (videos[0].shape[1] * scale, videos[0].shape[2] * scale) if videos else (32 * scale, 32 * scale)
    rows = [(f"{g.name}: {g.caption}", grid_strips(task, g, tr, cell)) for g, tr in zip(gens, truths)]
    frames = max((len(f) for _, strips in rows for _, f in strips if f is not None), default=1)
    out_dir.mkdir(parents=True, exist_ok=True)
    png, gif = out_dir / "grid.png", out_dir / "grid.gif"
    _film_png(rows, cell, frames).save(png)
    iio.imwrite(gif, np.stack([_gif_frame(rows, cell, t, frames) for t in range(frames)]), duration=1000 / fps, loop=0)
    return png, gif


# ---------------------------------------------------------------------------------------------------------------------
# Report


def held_out_grids(ctx: InferenceContext, clips: Sequence[Sample], tasks: Sequence[str], out: Path, seed: int = 0,
                   stored_text: bool = False) -> dict[str, tuple[list[Generated], tuple[Path, Path]]]:
    """Each task sampled on the held-out clips (t2vm / t2m from their captions, m2v / v2m from the clips themselves),
    every sample named after its clip, and one grid per task, out/<task>/grid.png and grid.gif, with the clips' ground
    truth beside it (m2v's real video, v2m's real joints). `stored_text`: use the clips' stored caption embeddings
    instead of encoding the captions (no text encoder). Returns task -> (samples, (png, gif))."""
    truths = [Truth(None if c.video_latent is None else ctx.codec.decode(c.video_latent[None].float())[0], c.joints)
              for c in clips]
    result: dict[str, tuple[list[Generated], tuple[Path, Path]]] = {}
    for task in tasks:
        from_text = task in ("t2vm", "t2m")
        text = ctx.stored_text(clips) if stored_text and task != "v2m" else None
        gens = ctx.generate(task, prompts=[c.caption for c in clips] if from_text else [],
                            clips=[] if from_text else clips, seed=seed, text=text)
        for g, c in zip(gens, clips):
            g.name = c.clip_id
        result[task] = (gens, sample_grid(task, gens, truths, out / task, ctx.fps))
    return result

def metrics_table(evaluation: dict[str, Any]) -> list[str]:
    """Markdown table of eval.json: every metric with a baseline, its baselines' values, which direction is better and
    whether it beats all of them; then values that are neither (references such as v2m_mpjpe_depth_unknown)."""
    m, baselines = evaluation["metrics"], evaluation["baselines"]
    higher, better = evaluation["higher_is_better"], evaluation["better_than_baseline"]
    lines = ["| metric | value | baseline(s) | higher/lower is better | better than baseline(s) |",
             "|---|---|---|---|---|"]
    for name, bases in baselines.items():
        base = "; ".join(f"{b} = {m[b]:.4g}" for b in bases)
        lines.append(f"| {name} | {m[name]:.4g} | {base} | {'higher' if higher[name] else 'lower'} | "
                     f"{'yes' if better[name] else 'NO'} |")
    used = set(baselines) | {b for bases in baselines.values() for b in bases}
    for name in (k for k in m if k not in used):
        direction = {True: "higher", False: "lower"}.get(higher.get(name), "—")
        lines.append(f"| {name} | {m[name]:.4g} | — | {direction} | — (reference, no baseline) |")
    units: dict[str, list[str]] = {}
    for name, unit in evaluation.get("units", {}).items():
        if name in m:
            units.setdefault(unit, []).append(name)
    lines += ["", "Units:", ""] + [f"- {', '.join(names)}: {unit}" for unit, names in units.items()]
    checks = evaluation.get("checks") or {}
    errors = {k: v for k, v in checks.items() if not k.startswith("gt_")}
    ceilings = {k: v for k, v in checks.items() if k.startswith("gt_")}
    if errors:
        lines += ["", "Reference checks, the references' own error (0 when they are exact; a lossy codec such as the "
                  "PCA codec decodes the ground truth a few levels off): "
                  + ", ".join(f"{k} = {v:.3g}" for k, v in errors.items())]
    if ceilings:
        lines += ["", "Ceilings, the ground truth scored as if it were generated: "
                  + ", ".join(f"{k} = {v:.3g}" for k, v in ceilings.items())]
    if "v2m_mpjpe_depth_unknown" in m:
        lines += ["", "For scale: a reader that got every joint's image position exactly but no depth would score "
                  f"v2m_mpjpe_depth_unknown = {m['v2m_mpjpe_depth_unknown']:.4g} (the camera is orthographic)."]
    return lines


def write_report(out: Path, timings: dict[str, float], evaluation: Optional[dict[str, Any]],
                 grids: dict[str, tuple[Path, Path]], samples: Optional[dict[str, list[Path]]] = None) -> Path:
    """report.md: stage timings, the per-task loss curves (loss.png), the metrics table and one sample grid per task.
    Every link is relative to report.md, so the run folder can be moved or shared whole."""
    rel = lambda p: Path(p).resolve().relative_to(out.resolve()).as_posix()  # noqa: E731
    lines = ["# EchoMotion CPU demo", "",
             "Tiny dual-stream model trained on HuMoVe-mini: Phase 1 (motion only), then Phase 2 (joint, motion->video, "
             "video->motion), 2 processes on gloo. Everything below was produced by `python -m echomotion.demo`.", "",
             "## Stage timings", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in timings.items()]
    lines += ["", "## Loss curves", "", "![training loss per task](loss.png)"]
    if evaluation is not None:
        lines += ["", "## Evaluation on held-out clips (tools/evaluate.py)", "", *metrics_table(evaluation)]
    titles = {"t2vm": "text -> video + motion", "t2m": "text -> motion", "m2v": "motion -> video",
              "v2m": "video -> motion"}
    for task, (png, gif) in grids.items():
        lines += ["", f"## {titles.get(task, task)} ({task})", "",
                  f"Rows: held-out samples. Strips: {'; '.join(STRIPS[task])}. [Animated version]({rel(gif)}).", "",
                  f"![{task} samples]({rel(png)})"]
        if samples and samples.get(task):
            lines += ["", "Per-sample videos and motion: " + ", ".join(f"[{d.name}]({rel(d)}/)" for d in samples[task])]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
