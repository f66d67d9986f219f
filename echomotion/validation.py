"""In-loop validation (`train.eval_every`) and samples (`train.sample_every`) on held-out clips (docs/operations.md,
"Validation and samples during training").

Validation loss: the flow loss of each task of the phase (Phase 1: t2m; Phase 2: joint, m2v, v2m) on the first
`train.eval_clips` clips of `train.eval_data`, at the fixed noise levels `train.eval_sigmas`, with noise seeded by
(train.seed, clip id, task, sigma index) and no condition dropped (V2M's text aside, `tasks.fixed_conditions`). Nothing in
it depends on the rank or the layout, so the numbers compare across steps, runs and parallel layouts. Clips are spread
over the data-parallel ranks (the TP x SP ranks of a group take the same clip); every rank runs the same number of
forwards, as FSDP's and ZeRO-3's parameter gathers need, padding with repeats that count nothing.

Samples: rank 0 samples the phase's tasks on the first `train.sample_clips` clips from a plain copy of the model (the EMA
weights when train.ema_decay > 0), writes run_dir/samples/step-N/<task>/grid.png and, on HuMoVe-mini, scores them with
echomotion/evaluate.py's metrics.
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from parallel import ParallelContext

from .config import Config
from .data.encoders import pad_text
from .data.schema import Sample
from .data.shards import iter_samples, motion_features
from .diffusion.tasks import GENERATES, TrainingBatch, eval_errors, keyed_generator
from .models import EchoMotionDiT, Task
from .motion import MotionStats

EVAL_TASKS: dict[int, tuple[Task, ...]] = {1: (Task.T2M,), 2: (Task.JOINT, Task.M2V, Task.V2M)}
SAMPLE_TASKS: dict[int, tuple[str, ...]] = {1: ("t2m",), 2: ("t2vm", "t2m", "m2v", "v2m")}


def eval_generator(seed: int, clip_id: str, task: Task, sigma_index: int) -> torch.Generator:
    """The noise of one validation example: a function of (seed, clip, task, sigma index) only, like the trainer's
    `sample_generator`, so every rank and layout draws the same."""
    return keyed_generator(f"eval:{seed}:{clip_id}:{task.name}:{sigma_index}")


def eval_batch(s: Sample, stats: MotionStats, text_len: int, device: torch.device) -> TrainingBatch:
    """One held-out clip as a training batch of one: text padded like the loader's, motion normalized with the training
    data's statistics, the video latent in float32 (None for a motion-only clip)."""
    return TrainingBatch(
        text=pad_text(s.text_embedding, text_len).float()[None].to(device),
        motion=stats.normalize(motion_features(s)).float()[None].to(device),
        video=None if s.video_latent is None else s.video_latent.float()[None].to(device),
    )


class Validation:
    """The held-out clips (loaded once) and what each eval / sample step computes from them."""

    def __init__(self, cfg: Config, par: ParallelContext, stats: MotionStats, null_text: torch.Tensor,
                 device: torch.device):
        t = cfg.train
        self.cfg, self.par, self.null_text, self.device = cfg, par, null_text, device
        self.samples = list(itertools.islice(iter_samples(t.eval_data), max(t.eval_clips, t.sample_clips)))
        if not self.samples:
            raise ValueError(f"train.eval_data={t.eval_data} holds no clips: point it at a split with held-out samples")
        missing = [s.clip_id for s in self.samples if s.video_latent is None]
        if t.phase == 2 and missing:
            raise ValueError(f"train.eval_data={t.eval_data} has motion-only clips {missing[:4]}: Phase 2 validates "
                             "joint / m2v / v2m, which need video; point it at a paired split (HuMoVe-mini: heldout)")
        self.clips = [(s.clip_id, eval_batch(s, stats, cfg.text_len, device)) for s in self.samples[:t.eval_clips]]
        self.keys = [f"{task.name.lower()}/{m}" for task in EVAL_TASKS[t.phase] for m in GENERATES[task]]
        self._sampler: Optional[Any] = None  # rank 0's InferenceContext around a plain model, built at the first samples
        self._eval_data: Optional[Any] = None  # rank 0's evaluate.EvalData of the sampled clips (HuMoVe-mini)

    def losses(self, model: nn.Module) -> dict[str, float]:
        """`eval/loss/<task>/<modality>`: the mean squared error over every generated element of every clip and noise
        level. Collective: every rank calls it with the model the training forward runs through."""
        n, dp = len(self.clips), self.par.layout.dp
        totals = torch.zeros(len(self.keys), 2, dtype=torch.float64, device=self.device)
        with torch.no_grad():
            for k in range(math.ceil(n / dp)):
                i = self.par.dp_rank + k * dp
                errors = self._clip_errors(model, i % n)
                if i < n:  # a padding forward (i >= n) keeps the ranks' collectives matched and counts nothing
                    totals += torch.tensor([[float(s), float(c)] for s, c in (errors[key] for key in self.keys)],
                                           dtype=torch.float64, device=self.device)
        totals = self.par.sum_over_dp(totals)
        return {f"eval/loss/{key}": total / count for key, (total, count) in zip(self.keys, totals.tolist())}

    def _clip_errors(self, model: nn.Module, i: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        t = self.cfg.train
        clip_id, batch = self.clips[i]
        cases = [(task, sigma, eval_generator(t.seed, clip_id, task, j))
                 for task in EVAL_TASKS[t.phase] for j, sigma in enumerate(t.eval_sigmas)]
        return eval_errors(model, batch, cases, self.cfg.diffusion, self.null_text)

    def write_samples(self, weights: dict[str, torch.Tensor], out: Path) -> tuple[dict[str, Path], dict[str, float]]:
        """Rank 0: sample the phase's tasks from these weights into out/<task>/grid.png. Returns the image tags
        (`samples/<task>` -> PNG) and, on HuMoVe-mini, the evaluation metrics of samples of those clips
        (`eval/<metric>`)."""
        from .report import held_out_grids

        ctx = self._context()
        ctx.model.load_state_dict(weights)
        clips = self.samples[: self.cfg.train.sample_clips]
        grids = held_out_grids(ctx, clips, SAMPLE_TASKS[self.cfg.train.phase], out, seed=self.cfg.sample.seed,
                               stored_text=True)
        images = {f"samples/{task}": png for task, (_, (png, _)) in grids.items()}
        return images, self._metrics(ctx) if ctx.info.get("name") == "humove-mini" else {}

    def _context(self) -> Any:
        """The plain model and the dataset's codec and statistics, built once (the model's init draws from the global
        RNG, which the trainer restores after sampling)."""
        if self._sampler is None:
            from .sample import InferenceContext

            model = EchoMotionDiT(self.cfg.model).to(self.device).eval()
            self._sampler = InferenceContext.for_model(model, self.cfg, Path(self.cfg.train.eval_data).parent,
                                                       str(self.device))
        return self._sampler

    def _metrics(self, ctx: Any) -> dict[str, float]:
        """echomotion/evaluate.py's metrics (its own sampling of the four tasks) on the sampled clips; chance levels,
        which are constants, left out."""
        from .evaluate import CHANCE, EvalData, EvalSettings, generate, score

        t = self.cfg.train
        if self._eval_data is None:
            self._eval_data = EvalData.load(ctx.data, Path(t.eval_data).name, self.cfg.text_len, t.sample_clips)
        settings = EvalSettings.from_config(self.cfg.sample, max_clips=t.sample_clips)
        metrics, _, _ = score(self._eval_data, generate(ctx.model, self._eval_data, settings, self.device), settings.seed)
        return {f"eval/{k}": v for k, v in metrics.items() if k not in CHANCE}

