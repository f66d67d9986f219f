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
The draws (`draw_conditions`) are separate from noising (`assemble_inputs`), so validation (`eval_inputs`, `eval_errors`)
noises a given task at a given sigma with the same code, dropping nothing but V2M's text.
"""
from __future__ import annotations

import hashlib
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


def keyed_generator(key: str) -> torch.Generator:
    """A CPU generator seeded by a hash of `key`: draws that depend only on what the key names (seed, step, clip, ...),
    never on which rank or layout makes them."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


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


@dataclass
class Conditions:
    """What a training example draws besides its noise: task [B] (Task ids), sigma [B], and which conditions it drops
    (drop_text, drop_motion, drop_video [B] bool)."""

    task: Tensor
    sigma: Tensor
    drop_text: Tensor
    drop_motion: Tensor
    drop_video: Tensor


def draw_conditions(batch: int, phase: int, cfg: DiffusionConfig, generator: Optional[torch.Generator],
                    device: torch.device) -> Conditions:
    """Task (Phase 2), sigma and the condition drops of the training rule (module docstring), in the fixed draw order
    tasks, sigmas, text drop, modality drop."""
    task = _draw_tasks(batch, phase, cfg, generator, device)
    sigma = sample_sigmas(batch, cfg.shift, generator, device)
    u_text, u_cond = _uniform(batch, generator, device), _uniform(batch, generator, device)
    joint, m2v, v2m = (task == int(Task.JOINT)), (task == int(Task.M2V)), (task == int(Task.V2M))
    if phase == 1:
        drop_text = u_text < cfg.t2m_text_drop
    else:
        drop_text = (joint & (u_text < cfg.joint_text_drop)) | (m2v & (u_text < cfg.m2v_text_drop)) | v2m
    return Conditions(task, sigma, drop_text, m2v & (u_cond < cfg.m2v_motion_drop), v2m & (u_cond < cfg.v2m_video_drop))


def fixed_conditions(batch: int, task: Task, sigma: float, device: torch.device) -> Conditions:
    """Validation's conditions: one task and one noise level for the whole batch and no condition dropped, except that
    V2M always drops its text, as in training (V2M never sees text there, so text would be an input it never learned)."""
    no = torch.zeros(batch, dtype=torch.bool, device=device)
    return Conditions(
        task=torch.full((batch,), int(task), dtype=torch.long, device=device),
        sigma=torch.full((batch,), float(sigma), dtype=torch.float32, device=device),
        drop_text=torch.full((batch,), task == Task.V2M, dtype=torch.bool, device=device), drop_motion=no, drop_video=no,
    )


def _concat(parts: Sequence[ModelInputs]) -> ModelInputs:
    return ModelInputs(**{
        f.name: None if getattr(parts[0], f.name) is None else torch.cat([getattr(p, f.name) for p in parts])
        for f in fields(ModelInputs)
    })


def _real_frames(batch: TrainingBatch, with_video: bool) -> Tensor:
    """The batch's checked motion mask [B, F] (all True when None); with_video: the batch must carry video latents."""
    b, frames = batch.motion.shape[:2]
    if batch.text.shape[0] != b:
        raise ValueError(f"text has batch {batch.text.shape[0]} but motion has batch {b}")
    if with_video and batch.video is None:
        raise ValueError("phase 2 needs video latents in the batch (TrainingBatch.video); motion-only data is for phase 1")
    if with_video and batch.video.shape[0] != b:
        raise ValueError(f"video has batch {batch.video.shape[0]} but motion has batch {b}")
    real_frames = batch.motion_mask
    if real_frames is None:
        return torch.ones(b, frames, dtype=torch.bool, device=batch.motion.device)
    if real_frames.shape != (b, frames):
        raise ValueError(f"motion_mask has shape {tuple(real_frames.shape)}; expected [{b}, {frames}]")
    return real_frames.to(torch.bool)


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
        return _concat([build_inputs(_sample(batch, i), phase, cfg, null_text, g) for i, g in enumerate(gens)])
    real_frames = _real_frames(batch, with_video=phase == 2)
    conditions = draw_conditions(batch.motion.shape[0], phase, cfg, generator, batch.motion.device)
    return assemble_inputs(batch if phase == 2 else _motion_only(batch), real_frames, conditions, cfg, null_text, generator)


def eval_inputs(batch: TrainingBatch, task: Task, sigma: float, cfg: DiffusionConfig, null_text: Tensor,
                generator: Optional[torch.Generator]) -> ModelInputs:
    """The inputs of a validation example: the given task at the given noise level (`fixed_conditions`), noise from the
    generator. T2M ignores any video in the batch (Phase 1 has no video branch)."""
    real_frames = _real_frames(batch, with_video=task != Task.T2M)
    conditions = fixed_conditions(batch.motion.shape[0], task, sigma, batch.motion.device)
    return assemble_inputs(batch if task != Task.T2M else _motion_only(batch), real_frames, conditions, cfg, null_text,
                           generator)


def assemble_inputs(batch: TrainingBatch, real_frames: Tensor, c: Conditions, cfg: DiffusionConfig, null_text: Tensor,
                    generator: Optional[torch.Generator]) -> ModelInputs:
    """Noise the batch under the given conditions (video noise, then motion noise, from the generator) and return the
    model's inputs with the loss targets and weights; a batch without video is motion-only."""
    motion, video = batch.motion, batch.video
    m2v, v2m = (c.task == int(Task.M2V)), (c.task == int(Task.V2M))
    text = torch.where(c.drop_text[:, None, None], null_text_like(null_text, batch.text), batch.text)
    zero = torch.zeros_like(c.sigma)

    video_kwargs: dict[str, Any] = {}
    if video is not None:
        video_noise = _randn_like(video, generator)
        video_sigma = torch.where(v2m, zero, c.sigma)  # V2M: the video is the clean condition
        video_kwargs = dict(
            video=add_noise(video, video_noise, video_sigma),
            video_timestep=to_timestep(video_sigma, cfg.num_train_timesteps),
            video_mask=~c.drop_video,
            video_target=velocity_target(video, video_noise),
            video_weight=(~v2m).to(video.dtype),
        )
    motion_noise = _randn_like(motion, generator)
    motion_sigma = torch.where(m2v, zero, c.sigma)  # M2V: the motion is the clean condition
    return ModelInputs(
        text=text,
        task=c.task,
        motion=add_noise(motion, motion_noise, motion_sigma),
        motion_timestep=to_timestep(motion_sigma, cfg.num_train_timesteps),
        motion_mask=real_frames & ~c.drop_motion[:, None],
        motion_target=velocity_target(motion, motion_noise),
        motion_weight=(~m2v).to(motion.dtype),
        motion_loss_mask=real_frames,
        **video_kwargs,
    )


def _motion_only(batch: TrainingBatch) -> TrainingBatch:
    return TrainingBatch(text=batch.text, motion=batch.motion, motion_mask=batch.motion_mask, video=None)


def _sample(batch: TrainingBatch, i: int) -> TrainingBatch:
    one = slice(i, i + 1)
    return TrainingBatch(
        text=batch.text[one],
        motion=batch.motion[one],
        motion_mask=None if batch.motion_mask is None else batch.motion_mask[one],
        video=None if batch.video is None else batch.video[one],
    )


def _check_prediction(out: Any) -> Prediction:
    if not isinstance(out, Prediction):
        raise TypeError(f"the model returned {type(out).__name__}; a call with motion must return Prediction(video, motion)")
    return out


def modality_errors(out: Prediction, inputs: ModelInputs, samples: Optional[Tensor] = None) -> dict[str, tuple[Tensor, Tensor]]:
    """(sum of squared errors, element count) per modality the inputs carry, over the generated elements only; with
    `samples` [B] bool, over those samples only."""
    terms = {"motion": (out.motion, inputs.motion_target, inputs.motion_weight, inputs.motion_loss_mask)}
    if inputs.video is not None:
        terms["video"] = (out.video, inputs.video_target, inputs.video_weight, None)
    return {name: squared_error(pred, target, weight if samples is None else weight * samples.to(weight.dtype), mask)
            for name, (pred, target, weight, mask) in terms.items()}


def task_errors(out: Prediction, inputs: ModelInputs) -> dict[str, tuple[Tensor, Tensor]]:
    """`<task>/<modality>` -> (sum of squared errors, element count) for every task in the batch and the modalities it
    generates (e.g. `m2v/video`)."""
    errors = {}
    for task in [Task(t) for t in inputs.task.unique().tolist()]:
        per_modality = modality_errors(out, inputs, inputs.task == int(task))
        errors |= {f"{task.name.lower()}/{m}": per_modality[m] for m in GENERATES[task] if m in per_modality}
    return errors


def eval_errors(model: nn.Module, batch: TrainingBatch, cases: Sequence[tuple[Task, float, torch.Generator]],
                cfg: DiffusionConfig, null_text: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    """Validation errors of one clip (a batch of one): one forward over the clip repeated once per case (task, sigma,
    noise generator; `eval_inputs`), returning `<task>/<modality>` -> (sum of squared errors, element count) over the
    cases of that task. The cases must agree on having video (Phase 1's t2m alone, or Phase 2's tasks)."""
    inputs = _concat([eval_inputs(batch, task, sigma, cfg, null_text, gen) for task, sigma, gen in cases])
    return task_errors(_check_prediction(model(**inputs.kwargs())), inputs)


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
    out = _check_prediction(model(**inputs.kwargs()))
    errors = modality_errors(out, inputs)
    loss_weights = {"motion": cfg.motion_loss_weight, "video": cfg.video_loss_weight}
    counts = torch.stack([count for _, count in errors.values()]).detach()
    global_counts = count_over(counts) if count_over is not None else counts
    loss = sum(loss_weights[name] * safe_mean(total, n) for (name, (total, _)), n in zip(errors.items(), global_counts))

    values: dict[str, Tensor] = {}
    with torch.no_grad():
        per_task = task_errors(out, inputs)
        generated = {key.split("/")[1] for key in per_task}
        parts = [(name, err) for name, err in errors.items() if name in generated] + list(per_task.items())
        for key, (total, count) in parts:
            values[f"loss/{key}"] = safe_mean(total, count).detach()
            values[f"count/{key}"] = count.to(total.dtype)
    logs = dict(zip(values, torch.stack(list(values.values())).tolist())) if values else {}
    return loss, logs
