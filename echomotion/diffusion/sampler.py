"""Sampling: ODE solvers (Euler, Heun) over Wan's flow and the paper's classifier-free guidance, Eq. 4-6.

Tasks and their guided velocities (u = the model, y = text, the null set = a dropped condition, omega1 = `text_guidance`,
omega2 = `condition_guidance`, both fields of `SampleConfig`):
- "t2vm" (Eq. 4): o^v, o^m = u(x_t, m_t, null) + omega1 * (u(x_t, m_t, y) - u(x_t, m_t, null)); task hint JOINT.
- "t2m" (Eq. 4 without video, Phase 1's mode): o^m = u(m_t, null) + omega1 * (u(m_t, y) - u(m_t, null)); task hint T2M.
- "m2v" (Eq. 5): o^v = u(x_t, null, null) + omega1 * (u(x_t, m, y) - u(x_t, m, null))
                       + omega2 * (u(x_t, m, null) - u(x_t, null, null)); task hint M2V.
- "v2m" (Eq. 6): o^m = u(null, m_t, null) + omega2 * (u(x, m_t, null) - u(null, m_t, null)); task hint V2M. Text is never
  used (it is always dropped in V2M training).
A dropped text is the null (empty-prompt) embedding; a dropped modality keeps its tokens but hides them as keys (its mask
False), exactly as in training. The conditioning modality enters clean (timestep 0) at every step and its output is
discarded. All guidance passes of a step run as one batched model call, [cond; uncond; ...] along the batch.

Noise levels follow `flow.sampling_sigmas`; an ODE step from sigma to sigma_next is x + (sigma_next - sigma) * v.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Callable, ContextManager, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

from ..config import SampleConfig
from ..models.echomotion import Prediction, Task
from ..motion.smpl import MOTION_FEATURE_DIM
from .flow import sampling_sigmas, to_timestep
from .tasks import null_text_like

TASKS = {"t2vm": Task.JOINT, "t2m": Task.T2M, "m2v": Task.M2V, "v2m": Task.V2M}
GENERATED = {"t2vm": ("video", "motion"), "t2m": ("motion",), "m2v": ("video",), "v2m": ("motion",)}
SOLVERS = ("euler", "heun")

VelocityFn = Callable[[list[Tensor], float], list[Tensor]]


def _check_task(task: str) -> Task:
    if task not in TASKS:
        raise ValueError(f"unknown sampling task {task!r}: choose one of {sorted(TASKS)}")
    return TASKS[task]


def _null_batch(null_text: Tensor, batch: int, device: torch.device) -> Tensor:
    """The null text ([L, D], [1, L, D] or [B, L, D]) as [batch, L, D] on `device` (V2M has no text to shape it after)."""
    null = null_text[None] if null_text.dim() == 2 else null_text
    if null.dim() != 3 or null.shape[0] not in (1, batch):
        raise ValueError(f"null_text has shape {tuple(null_text.shape)}; expected [L, D], [1, L, D] or [{batch}, L, D]")
    return null.to(device).expand(batch, -1, -1)


def _repeat(x: Optional[Tensor], n: int) -> Optional[Tensor]:
    return None if x is None else torch.cat([x] * n)


def _weights_autocast(weight: Tensor) -> ContextManager:
    """Autocast at the weights' dtype when it is not fp32: Wan's modulation returns fp32 activations on purpose, which a
    bf16/fp16 Linear cannot take. fp32 weights get no context (an enabled=False autocast would switch off a caller's)."""
    if weight.dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=weight.device.type, dtype=weight.dtype)


def _motion_timing(model: nn.Module) -> Optional[tuple[int, float]]:
    """(model.patch_size[0], model.rope.temporal_ratio) of an EchoMotionDiT (or a wrapper's `.module`); None for a
    stand-in model without them, whose positions the sampler cannot know."""
    inner = getattr(model, "module", model)
    patch, config = getattr(inner, "patch_size", None), getattr(inner, "config", None)
    rope = getattr(config, "rope", None)
    if patch is None or rope is None:
        return None
    return int(patch[0]), float(rope.temporal_ratio)


def check_motion_length(model: nn.Module, latent_frames: int, motion_frames: int) -> None:
    """Motion and video must span the same time: MVS-RoPE puts motion frame f at time f / ratio and video token frame k
    (latent frames / patch_size[0] of them) at time k, so M motion frames fit T token frames only if
    M = ratio * (T - 1) + 1. The model itself cannot check this (training pads motion and masks it), so the sampler does.
    """
    timing = _motion_timing(model)
    if timing is None:
        return
    pt, ratio = timing
    if latent_frames % pt:
        raise ValueError(f"video latent frames {latent_frames} must be divisible by model.patch_size[0]={pt}")
    tokens = latent_frames // pt
    want = ratio * (tokens - 1) + 1
    if abs(want - motion_frames) < 1e-9:
        return
    fits = f"{round(want)} motion frames" if abs(want - round(want)) < 1e-9 else "no whole number of motion frames"
    back = (motion_frames - 1) / ratio + 1  # token frames that `motion_frames` would span
    other = (f"a video of {round(back) * pt} latent frames" if abs(back - round(back)) < 1e-9 and back >= 1
             else f"no video length (it needs {ratio:g} * k + 1 motion frames)")
    raise ValueError(
        f"motion has {motion_frames} frames but the video latent has {latent_frames}: MVS-RoPE puts motion frame f at "
        f"time f / {ratio:g} (model.rope.temporal_ratio) and the {tokens} video token frames (model.patch_size[0]={pt}) "
        f"at times 0..{tokens - 1}, so this video needs {fits} ({ratio:g} * ({tokens} - 1) + 1); {motion_frames} motion "
        f"frames would fit {other}. Make motion_frames / motion_cond and video_shape / video_cond agree"
    )


@dataclass
class Request:
    """What one sampling run is given: the task, its conditions and the shapes to generate (`checked` validates them).

    Per task: "t2vm" needs text, video_shape [B, C, F, H, W] and motion_frames; "t2m" text and motion_frames; "m2v" text,
    motion_cond [B, F, 235] and video_shape; "v2m" video_cond [B, C, F, H, W] and motion_frames (text is ignored: V2M is
    never text-conditioned). `motion_mask` [B, F] marks real motion frames (of the condition, or of the generated motion;
    frames outside it are hidden and come back as unconstrained values to trim). With both modalities (t2vm, m2v, v2m)
    the motion must span the video: ratio * (latent frames / patch_size[0] - 1) + 1 frames (9 for 3 latent frames with
    Wan's 4x VAE; see `check_motion_length`).
    """

    task: str
    text: Optional[Tensor] = None  # [B, L, D] embeddings; not used by "v2m"
    video_shape: Optional[Sequence[int]] = None  # latent shape [B, C, F, H, W] to generate (t2vm, m2v)
    motion_frames: Optional[int] = None  # motion frames to generate (t2vm, t2m, v2m); m2v's come from motion_cond
    video_cond: Optional[Tensor] = None  # clean video latents [B, C, F, H, W] (v2m)
    motion_cond: Optional[Tensor] = None  # clean normalized motion [B, F, 235] (m2v)
    motion_mask: Optional[Tensor] = None  # [B, F] real motion frames; None = all real

    @property
    def _reference(self) -> Tensor:
        """The input that fixes batch size and device: v2m's video condition, every other task's text."""
        return self.video_cond if self.task == "v2m" else self.text

    @property
    def batch_size(self) -> int:
        return self._reference.shape[0]

    @property
    def device(self) -> torch.device:
        return self._reference.device

    def checked(self, model: nn.Module) -> "Request":
        """This request with m2v's motion_frames taken from motion_cond; a ValueError names what is missing or
        inconsistent, and `check_motion_length` checks the motion spans the video for `model`."""
        task = self.task
        _check_task(task)
        if task == "v2m" and self.video_cond is None:
            raise ValueError("task 'v2m' needs video_cond, the clean video latents [B, C, F, H, W]")
        if task != "v2m" and self.text is None:
            raise ValueError(f"task {task!r} needs text embeddings [B, L, D] (and null_text for guidance)")
        b, frames = self.batch_size, self.motion_frames
        if task == "m2v":
            if self.motion_cond is None:
                raise ValueError("task 'm2v' needs motion_cond, the clean normalized motion [B, F, 235]")
            cond_frames = self.motion_cond.shape[1]
            if frames is not None and frames != cond_frames:
                raise ValueError(f"motion_frames={frames} but motion_cond has {cond_frames} frames; drop one")
            frames = cond_frames
        if "motion" in GENERATED[task] and frames is None:
            raise ValueError(f"task {task!r} generates motion: pass motion_frames (one motion frame per video frame)")
        shape = self.video_shape
        if "video" in GENERATED[task] and (shape is None or len(shape) != 5 or shape[0] != b):
            raise ValueError(f"task {task!r} generates video: pass video_shape as [B={b}, C, F, H, W] (latent shape)")
        for name, given, owner in (("video_cond", self.video_cond, "v2m"), ("motion_cond", self.motion_cond, "m2v")):
            if given is not None and task != owner:
                raise ValueError(f"{name} is only used by task {owner}, not {task!r}")
        if self.motion_mask is not None and self.motion_mask.shape != (b, frames):
            raise ValueError(f"motion_mask has shape {tuple(self.motion_mask.shape)}; expected [{b}, {frames}]")
        if task == "v2m" and self.video_cond.dim() != 5:
            raise ValueError(f"video_cond has shape {tuple(self.video_cond.shape)}; expected latents [B, C, F, H, W]")
        if task != "t2m":
            check_motion_length(model, self.video_cond.shape[2] if task == "v2m" else shape[2], frames)
        return replace(self, motion_frames=frames)


class _Passes(NamedTuple):
    """The guidance passes of one step, stacked along the batch in one model call: per pass its text and motion mask,
    and for v2m the video mask (its unconditional pass hides the video)."""

    texts: list[Tensor]
    motion_masks: list[Tensor]
    video_masks: Optional[list[Tensor]]


def _guidance_passes(request: Request, null_text: Tensor, motion: Tensor) -> _Passes:
    """Eq. 4-6's passes (condition, text): t2vm / t2m [y; null], m2v [(m, y); (m, null); (null, null)], v2m
    [(x, null); (null, null)]."""
    task, text = request.task, request.text
    b, device = motion.shape[0], motion.device
    null = _null_batch(null_text, b, device) if task == "v2m" else null_text_like(null_text, text)
    mask = request.motion_mask
    real = torch.ones(motion.shape[:2], dtype=torch.bool, device=device) if mask is None else mask.bool()
    if task in ("t2vm", "t2m"):
        return _Passes([text, null], [real, real], None)
    if task == "m2v":
        return _Passes([text, null, null], [real, real, torch.zeros_like(real)], None)
    seen = torch.ones(b, dtype=torch.bool, device=device)
    return _Passes([null, null], [real, real], [seen, torch.zeros_like(seen)])


def _combine(task: str, out: Prediction, b: int, cfg: SampleConfig) -> Prediction:
    """The guided velocity from the passes' outputs (each [n * b, ...], passes in `_guidance_passes` order)."""
    w1, w2 = cfg.text_guidance, cfg.condition_guidance

    def text_cfg(u: tuple[Tensor, ...]) -> Tensor:  # Eq. 4: passes [(.., y); (.., null)]
        return u[1] + w1 * (u[0] - u[1])

    if task in ("t2vm", "t2m"):
        return Prediction(text_cfg(out.video.split(b)) if task == "t2vm" else None, text_cfg(out.motion.split(b)))
    if task == "m2v":
        u = out.video.split(b)
        return Prediction(u[2] + w1 * (u[0] - u[1]) + w2 * (u[1] - u[2]), None)  # Eq. 5
    u = out.motion.split(b)
    return Prediction(None, u[1] + w2 * (u[0] - u[1]))  # Eq. 6


def guided_velocity(
    model: nn.Module,
    request: Request,
    video: Optional[Tensor],
    motion: Optional[Tensor],
    sigma: float,
    null_text: Tensor,
    cfg: Optional[SampleConfig] = None,
) -> Prediction:
    """The guided velocity of one step (Eq. 4-6), from one batched model call over the guidance passes.

    `video` / `motion` are what the model sees: the noisy state at `sigma` for generated modalities, the clean data for
    the condition (video None for "t2m"). From `request` it reads the task, text and motion_mask; from `cfg` (default
    SampleConfig()) the guidance weights. Inputs are cast to the weights' dtype, and non-fp32 weights run under autocast
    at that dtype. Returns Prediction with the velocity of each generated modality and None for the others.
    """
    task = request.task
    hint = _check_task(task)
    if motion is None:
        raise ValueError(f"task {task!r} needs motion: the noisy motion state, or the clean motion condition for 'm2v'")
    if task != "t2m" and video is None:
        raise ValueError(f"task {task!r} needs video: the noisy video state, or the clean video condition for 'v2m'")
    if task != "v2m" and request.text is None:
        raise ValueError(f"task {task!r} needs text embeddings [B, L, D]; only 'v2m' runs without text")
    passes = _guidance_passes(request, null_text, motion)
    b, device, n = motion.shape[0], motion.device, len(passes.texts)
    weight = next(model.parameters())
    dtype = weight.dtype
    noisy = to_timestep(torch.full((n * b,), float(sigma), device=device))
    clean = torch.zeros_like(noisy)
    with _weights_autocast(weight):
        out = model(
            video=_repeat(video, n).to(dtype) if video is not None else None,
            video_timestep=(clean if task == "v2m" else noisy) if video is not None else None,
            video_mask=torch.cat(passes.video_masks) if passes.video_masks is not None else None,
            motion=_repeat(motion, n).to(dtype),
            motion_timestep=clean if task == "m2v" else noisy,
            motion_mask=None if request.motion_mask is None and task != "m2v" else torch.cat(passes.motion_masks),
            text=torch.cat(passes.texts).to(dtype),
            task=torch.full((n * b,), int(hint), dtype=torch.long, device=device),
        )
    return _combine(task, out, b, cfg if cfg is not None else SampleConfig())


def integrate(
    velocity: VelocityFn, x: Sequence[Tensor], sigmas: Tensor, solver: str = "euler", progress: bool = False
) -> list[Tensor]:
    """Solve dx/dsigma = velocity(x, sigma) along `sigmas` (decreasing, ending at 0) for a list of tensors.

    "euler": x + (s' - s) * v(x, s), one velocity call per step. "heun": Euler predictor, then the trapezoid corrector
    with v at the predicted point; as in EDM's sampler the corrector is skipped on the final step to sigma = 0, so the
    model is never queried at sigma = 0 (2 * steps - 1 calls). With a large shift that last step is long (0.14 of the
    range at 50 steps, shift 8) and its first-order error dominates Heun's.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}: choose one of {SOLVERS}")
    x = list(x)
    pairs = list(zip(sigmas[:-1].tolist(), sigmas[1:].tolist()))
    if progress:
        from tqdm.auto import tqdm

        pairs = tqdm(pairs, desc=f"sampling ({solver})")
    for s, s_next in pairs:
        dt = s_next - s
        v = velocity(x, s)
        predicted = [xi + dt * vi for xi, vi in zip(x, v)]
        if solver == "euler" or s_next == 0:
            x = predicted
        else:
            v_next = velocity(predicted, s_next)
            x = [xi + dt * 0.5 * (vi + vn) for xi, vi, vn in zip(x, v, v_next)]
    return x


def _randn(shape: Sequence[int], generator: Optional[torch.Generator], device: torch.device) -> Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=torch.float32).to(device)


def _initial_noise(request: Request, generator: Optional[torch.Generator]) -> list[Tensor]:
    """Noise for the generated modalities, drawn in float32 from `generator`: video before motion."""
    generated, b, device = GENERATED[request.task], request.batch_size, request.device
    state: list[Tensor] = []
    if "video" in generated:
        state.append(_randn(request.video_shape, generator, device))
    if "motion" in generated:
        state.append(_randn((b, request.motion_frames, MOTION_FEATURE_DIM), generator, device))
    return state


@torch.no_grad()
def sample(
    model: nn.Module,
    request: Request,
    null_text: Tensor,
    cfg: Optional[SampleConfig] = None,
    *,
    generator: Optional[torch.Generator] = None,
    progress: bool = False,
) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """Generate with guidance; returns (video latents or None, motion features or None): only generated modalities.

    `request` holds the task and its inputs (see `Request`, whose `checked` says what each task needs); `cfg` (default
    SampleConfig(); its seed is not used, pass `generator`) the solver, steps, shift and guidance weights. The state is
    integrated in float32; model inputs are cast to the model's parameter dtype, and bf16/fp16 weights run under
    torch.autocast at that dtype on the weights' device type (Wan's modulation stays fp32). Noise is drawn from
    `generator`, video before motion. The model is used as given (put it in eval mode first).
    """
    cfg = cfg if cfg is not None else SampleConfig()
    request = request.checked(model)
    generated = GENERATED[request.task]
    conditions = {name: c.float() for name, c in (("video", request.video_cond), ("motion", request.motion_cond))
                  if c is not None}

    def velocity(x: list[Tensor], sigma: float) -> list[Tensor]:
        current = {**conditions, **dict(zip(generated, x))}
        out = guided_velocity(model, request, current.get("video"), current.get("motion"), sigma, null_text, cfg)
        return [out.video if name == "video" else out.motion for name in generated]

    state = _initial_noise(request, generator)
    final = dict(zip(generated, integrate(velocity, state, sampling_sigmas(cfg.steps, cfg.shift), cfg.solver, progress)))
    return final.get("video"), final.get("motion")
