"""Flow matching in Wan's convention: the noise schedule, the shift, timestep sampling and the masked loss.

Convention (Wan's code, not the paper's notation): sigma in [0, 1] with sigma = 1 pure noise and sigma = 0 clean data,
    x_sigma = (1 - sigma) * data + sigma * noise,    velocity target v = noise - data,    model timestep = 1000 * sigma.
The paper writes t = 1 - sigma and the target data - noise: the same model up to the sign of the velocity. Keeping Wan's sign
and timestep scale keeps pretrained Wan weights meaningful. An ODE step from sigma to sigma_next is
x + (sigma_next - sigma) * v.

Training sigmas are continuous: u ~ U(0, 1), then shifted (see `sample_sigmas`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

NUM_TRAIN_TIMESTEPS = 1000  # Wan's timestep scale: the model sees timestep = 1000 * sigma


def shift_sigma(sigma: Tensor | float, shift: float) -> Tensor | float:
    """Wan/SD3 timestep shift sigma' = shift * sigma / (1 + (shift - 1) * sigma): shift > 1 spends more time at high noise,
    which large video latents need (their signal survives more noise than small images do). Fixes 0 and 1."""
    if shift <= 0:
        raise ValueError(f"shift={shift} must be > 0 (1 = no shift; Wan/EchoMotion use 5-8)")
    return shift * sigma / (1 + (shift - 1) * sigma)


def to_timestep(sigma: Tensor, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> Tensor:
    """The model's timestep input (Wan scale, 0 = clean) for a noise level sigma."""
    return sigma * num_train_timesteps


def sample_sigmas(
    batch: int, shift: float, generator: Optional[torch.Generator] = None, device: torch.device | str | None = None
) -> Tensor:
    """Training noise levels [batch] (float32): u ~ U(0, 1) continuous, then shifted.

    Continuous rather than Wan's 1000 discrete train timesteps: the model's timestep embedding is a continuous sinusoid, the
    sampler queries shifted non-integer timesteps anyway, and a discrete grid would only quantize the same distribution.
    The draw happens on the generator's device (so a CPU generator reproduces on any device) and is then moved to `device`.
    """
    gen_device = generator.device if generator is not None else device
    u = torch.rand(batch, generator=generator, device=gen_device)
    return shift_sigma(u, shift).to(device if device is not None else u.device)


def sampling_sigmas(steps: int, shift: float) -> Tensor:
    """The sampler's noise levels [steps + 1] (float64): `steps` sigmas linearly from 1 down, shifted, then the final 0."""
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    return shift_sigma(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)


def per_sample(sigma: Tensor, like: Tensor) -> Tensor:
    """sigma [B] (or a scalar) shaped to broadcast over a [B, ...] tensor."""
    sigma = torch.as_tensor(sigma, device=like.device, dtype=like.dtype)
    if sigma.dim() == 0:
        return sigma
    if sigma.shape != like.shape[:1]:
        raise ValueError(f"sigma has shape {tuple(sigma.shape)}; expected [{like.shape[0]}] (one per sample) or a scalar")
    return sigma.view(-1, *([1] * (like.dim() - 1)))


def add_noise(data: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
    """x_sigma = (1 - sigma) * data + sigma * noise, sigma [B] per sample (or a scalar)."""
    s = per_sample(sigma, data)
    return (1 - s) * data + s * noise


def velocity_target(data: Tensor, noise: Tensor) -> Tensor:
    """d x_sigma / d sigma = noise - data (Wan's sign; the paper's data - noise is its negative)."""
    return noise - data


def squared_error(pred: Tensor, target: Tensor, sample_weight: Tensor, frame_mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(sum of squared errors, number of elements) over the elements that count.

    pred/target [B, ...]; `sample_weight` [B] (0 = this sample does not generate the modality: a condition or absent);
    `frame_mask` [B, F] for [B, F, ...] tensors (False = padded frame).
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    w = per_sample(sample_weight.to(pred.dtype), pred)
    if frame_mask is not None:
        if frame_mask.shape != pred.shape[:2]:
            raise ValueError(f"frame_mask has shape {tuple(frame_mask.shape)}; expected {tuple(pred.shape[:2])}")
        w = w * frame_mask.to(pred.dtype).view(*frame_mask.shape, *([1] * (pred.dim() - 2)))
    w = w.expand_as(pred)
    return ((pred - target) ** 2 * w).sum(), w.sum()


def safe_mean(total: Tensor, count: Tensor) -> Tensor:
    """total / count; with nothing to count, a 0 that is still connected to the graph, so every parameter gets a (zero)
    gradient."""
    return torch.where(count > 0, total / count.clamp_min(torch.finfo(count.dtype).tiny), total)


def flow_loss(pred: Tensor, target: Tensor, sample_weight: Tensor, frame_mask: Optional[Tensor] = None) -> Tensor:
    """Masked MSE: the mean over all counted elements of the batch (like a token-level LM loss), so padded frames and
    conditioning samples neither add error nor dilute the mean."""
    return safe_mean(*squared_error(pred, target, sample_weight, frame_mask))
