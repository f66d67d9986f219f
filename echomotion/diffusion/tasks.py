"""Training tasks (paper Sec. 3.2, Fig. 3): per-sample task choice, condition dropping, noising, and the loss.

Phase 1 (motion-only pretraining): every sample is T2M: motion noised, no video at all (the video branch is deactivated; any
video in the batch is ignored), text dropped with `t2m_text_drop`.
Phase 2 (multi-task): each sample draws JOINT / M2V / V2M with `DiffusionConfig.task_probs`:
- JOINT: video and motion noised with the same sigma; text dropped with `joint_text_drop`.
- M2V: motion clean (timestep 0), video noised; text dropped with `m2v_text_drop`, motion with `m2v_motion_drop`
  (independent draws).
- V2M: video clean (timestep 0), motion noised; text always dropped; video dropped with `v2m_video_drop`.
A dropped text is the caller's null (empty-prompt) embedding. A dropped modality keeps its tokens but hides them as keys
(`video_mask[b] = False`, `motion_mask[b, :] = False`), which the model treats like omitting them. Only generated
modalities carry loss; a clean condition is the data itself and its output is discarded.

All randomness comes from the given torch.Generator, drawn in a fixed order, so a seed reproduces a batch's draws exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from ..config import DiffusionConfig
from ..models.echomotion import Prediction, Task
from .flow import add_noise, safe_mean, sample_sigmas, squared_error, to_timestep, velocity_target

PHASE2_TASKS = (Task.JOINT, Task.M2V, Task.V2M)  # order of DiffusionConfig.task_probs
GENERATES = {Task.T2M: ("motion",), Task.JOINT: ("video", "motion"), Task.M2V: ("video",), Task.V2M: ("motion",)}


@dataclass
class TrainingBatch:
    """Clean data for one step: text embeddings [B, L, D], normalized motion [B, F, 235], motion_mask [B, F] (True = real
    frame; None = all real) and video latents [B, C, F, H, W] (None in motion-only Phase 1 data)."""

    text: Tensor
    motion: Tensor
    motion_mask: Optional[Tensor] = None
    video: Optional[Tensor] = None


@dataclass
class ModelInputs:
    """The drawn training example: `kwargs()` is the model call; the rest is what the loss needs.

    `video_weight` / `motion_weight` [B] are 1 where the sample generates that modality and 0 where it is a condition (or
    absent); `motion_loss_mask` [B, F] marks the real (unpadded) motion frames.
    """

    text: Tensor
    task: Tensor
    motion: Tensor
    motion_timestep: Tensor
    motion_mask: Tensor
    motion_target: Tensor
    motion_weight: Tensor
    motion_loss_mask: Tensor
    video: Optional[Tensor] = None
    video_timestep: Optional[Tensor] = None
    video_mask: Optional[Tensor] = None
    video_target: Optional[Tensor] = None
    video_weight: Optional[Tensor] = None

    def kwargs(self) -> dict[str, Any]:
        return dict(
            video=self.video,
            video_timestep=self.video_timestep,
            video_mask=self.video_mask,
            motion=self.motion,
            motion_timestep=self.motion_timestep,
            motion_mask=self.motion_mask,
            text=self.text,
            task=self.task,
        )


def _uniform(n: int, generator: Optional[torch.Generator], device: torch.device) -> Tensor:
    """U(0, 1) draws made on the generator's device (a CPU generator reproduces on any device), moved to `device`."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(n, generator=generator, device=gen_device).to(device)


def _randn_like(x: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    gen_device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=gen_device, dtype=x.dtype).to(x.device)


def null_text_like(null_text: Tensor, text: Tensor) -> Tensor:
    """The null (empty-prompt) embedding, given as [L, D], [1, L, D] or [B, L, D], expanded to the text's [B, L, D]."""
    null = null_text.to(device=text.device, dtype=text.dtype)
    if null.dim() == 2:
        null = null[None]
    if null.dim() != 3 or null.shape[1:] != text.shape[1:] or null.shape[0] not in (1, text.shape[0]):
        raise ValueError(
            f"null_text has shape {tuple(null_text.shape)} but the text is {tuple(text.shape)}: encode the empty prompt "
            "and pad it to the same text length and width as the batch's text"
        )
    return null.expand_as(text)


def _draw_tasks(
    batch: int, phase: int, cfg: DiffusionConfig, generator: Optional[torch.Generator], device: torch.device
) -> Tensor:
    if phase == 1:
        return torch.full((batch,), int(Task.T2M), dtype=torch.long, device=device)
    if phase != 2:
        raise ValueError(f"phase={phase}: choose 1 (motion-only pretraining) or 2 (multi-task training)")
    probs = torch.tensor(list(cfg.task_probs), dtype=torch.float64)
    gen_device = generator.device if generator is not None else device
    pick = torch.multinomial(probs.to(gen_device), batch, replacement=True, generator=generator)
    return torch.tensor([int(t) for t in PHASE2_TASKS], dtype=torch.long, device=gen_device)[pick].to(device)


Generators = Optional[torch.Generator | Sequence[torch.Generator]]


def build_inputs(
    batch: TrainingBatch,
    phase: int,
    cfg: DiffusionConfig,
    null_text: Tensor,
    generator: Generators = None,
) -> ModelInputs:
    """Draw task, drops, sigma and noise per sample, and return the model's inputs with the loss targets and weights.

    Draw order (fixed, for reproducibility): tasks (Phase 2), sigmas, text drop, modality drop, video noise, motion noise.
    With one generator per sample, each sample's draws depend only on its own generator, so a sample drawn on any rank
    of any parallel layout gets the same task, noise and drops (the trainer seeds them by global sample index).
    """
    if generator is not None and not isinstance(generator, torch.Generator):
        gens = list(generator)
        if len(gens) != batch.motion.shape[0]:
            raise ValueError(f"{len(gens)} generators for a batch of {batch.motion.shape[0]}: give one per sample")
        parts = [build_inputs(_sample(batch, i), phase, cfg, null_text, g) for i, g in enumerate(gens)]
        return ModelInputs(**{
            f.name: None if getattr(parts[0], f.name) is None else torch.cat([getattr(p, f.name) for p in parts])
            for f in fields(ModelInputs)
        })
    motion = batch.motion
    b, frames = motion.shape[:2]
    device = motion.device
    if batch.text.shape[0] != b:
        raise ValueError(f"text has batch {batch.text.shape[0]} but motion has batch {b}")
    real_frames = batch.motion_mask
    if real_frames is None:
        real_frames = torch.ones(b, frames, dtype=torch.bool, device=device)
    elif real_frames.shape != (b, frames):
        raise ValueError(f"motion_mask has shape {tuple(real_frames.shape)}; expected [{b}, {frames}]")
    real_frames = real_frames.to(torch.bool)
    video = batch.video if phase == 2 else None
    if phase == 2 and video is None:
        raise ValueError("phase 2 needs video latents in the batch (TrainingBatch.video); motion-only data is for phase 1")
    if video is not None and video.shape[0] != b:
        raise ValueError(f"video has batch {video.shape[0]} but motion has batch {b}")

    task = _draw_tasks(b, phase, cfg, generator, device)
    sigma = sample_sigmas(b, cfg.shift, generator, device)
    u_text, u_cond = _uniform(b, generator, device), _uniform(b, generator, device)
    joint, m2v, v2m = (task == int(Task.JOINT)), (task == int(Task.M2V)), (task == int(Task.V2M))
    if phase == 1:
        drop_text = u_text < cfg.t2m_text_drop
    else:
        drop_text = (joint & (u_text < cfg.joint_text_drop)) | (m2v & (u_text < cfg.m2v_text_drop)) | v2m
    drop_motion = m2v & (u_cond < cfg.m2v_motion_drop)
    drop_video = v2m & (u_cond < cfg.v2m_video_drop)

    text = torch.where(drop_text[:, None, None], null_text_like(null_text, batch.text), batch.text)
    zero = torch.zeros_like(sigma)

    video_kwargs: dict[str, Any] = {}
    if video is not None:
        video_noise = _randn_like(video, generator)
        video_sigma = torch.where(v2m, zero, sigma)  # V2M: the video is the clean condition
        video_kwargs = dict(
            video=add_noise(video, video_noise, video_sigma),
            video_timestep=to_timestep(video_sigma, cfg.num_train_timesteps),
            video_mask=~drop_video,
            video_target=velocity_target(video, video_noise),
            video_weight=(~v2m).to(video.dtype),
        )
    motion_noise = _randn_like(motion, generator)
    motion_sigma = torch.where(m2v, zero, sigma)  # M2V: the motion is the clean condition
    return ModelInputs(
        text=text,
        task=task,
        motion=add_noise(motion, motion_noise, motion_sigma),
        motion_timestep=to_timestep(motion_sigma, cfg.num_train_timesteps),
        motion_mask=real_frames & ~drop_motion[:, None],
        motion_target=velocity_target(motion, motion_noise),
        motion_weight=(~m2v).to(motion.dtype),
        motion_loss_mask=real_frames,
        **video_kwargs,
    )


def _sample(batch: TrainingBatch, i: int) -> TrainingBatch:
    one = slice(i, i + 1)
    return TrainingBatch(
        text=batch.text[one],
        motion=batch.motion[one],
        motion_mask=None if batch.motion_mask is None else batch.motion_mask[one],
        video=None if batch.video is None else batch.video[one],
    )


def training_loss(
    model: nn.Module,
    batch: TrainingBatch,
    phase: int,
    cfg: DiffusionConfig,
    null_text: Tensor,
    generator: Generators = None,
    count_over: Optional[Callable[[Tensor], Tensor]] = None,
) -> tuple[Tensor, dict[str, float]]:
    """One model call on a freshly drawn training example.

    Returns the total loss (video_loss_weight * video MSE + motion_loss_weight * motion MSE, each a mean over the generated
    elements only) and detached float logs of this batch: `loss/video`, `loss/motion`, and `loss/<task>/<modality>` for
    every task present in the batch (e.g. `loss/m2v/video`), each with `count/...`, the number of elements its mean is
    over, so that means over micro-batches and ranks can be weighted.

    `count_over` sums element counts over the data-parallel ranks. With it, each mean divides by the global count, so the
    returned loss is this rank's share of the global batch's loss: the shares sum to exactly what one process computes on
    the whole batch, whatever the samples' tasks and lengths on each rank.
    """
    inputs = build_inputs(batch, phase, cfg, null_text, generator)
    out = model(**inputs.kwargs())
    if not isinstance(out, Prediction):
        raise TypeError(f"the model returned {type(out).__name__}; a call with motion must return Prediction(video, motion)")

    def motion_term(weight: Tensor) -> tuple[Tensor, Tensor]:
        return squared_error(out.motion, inputs.motion_target, weight, inputs.motion_loss_mask)

    def video_term(weight: Tensor) -> tuple[Tensor, Tensor]:
        return squared_error(out.video, inputs.video_target, weight)

    terms = {"motion": (motion_term, inputs.motion_weight, cfg.motion_loss_weight)}
    if inputs.video is not None:
        terms["video"] = (video_term, inputs.video_weight, cfg.video_loss_weight)
    errors = {name: term(weight) for name, (term, weight, _) in terms.items()}
    counts = torch.stack([count for _, count in errors.values()]).detach()
    global_counts = count_over(counts) if count_over is not None else counts
    loss = sum(terms[name][2] * safe_mean(total, n) for (name, (total, _)), n in zip(errors.items(), global_counts))

    present = [Task(t) for t in inputs.task.unique().tolist()]
    values: dict[str, Tensor] = {}
    with torch.no_grad():
        for name, (term, weight, _) in terms.items():
            generated_by = [t for t in present if name in GENERATES[t]]
            parts = [(name, errors[name])] if generated_by else []
            parts += [(f"{t.name.lower()}/{name}", term(weight * (inputs.task == int(t)).to(weight.dtype))) for t in generated_by]
            for key, (total, count) in parts:
                values[f"loss/{key}"] = safe_mean(total, count).detach()
                values[f"count/{key}"] = count.to(total.dtype)
    logs = dict(zip(values, torch.stack(list(values.values())).tolist())) if values else {}
    return loss, logs
