"""Flow matching (Wan convention), the training tasks with condition dropping, and guided sampling (paper Eq. 4-6)."""
from .flow import (
    NUM_TRAIN_TIMESTEPS,
    add_noise,
    flow_loss,
    sample_sigmas,
    sampling_sigmas,
    shift_sigma,
    to_timestep,
    velocity_target,
)
from .sampler import Request, guided_velocity, integrate, sample
from .tasks import ModelInputs, TrainingBatch, build_inputs, null_text_like, training_loss

__all__ = [
    "NUM_TRAIN_TIMESTEPS",
    "ModelInputs",
    "Request",
    "TrainingBatch",
    "add_noise",
    "build_inputs",
    "flow_loss",
    "guided_velocity",
    "integrate",
    "null_text_like",
    "sample",
    "sample_sigmas",
    "sampling_sigmas",
    "shift_sigma",
    "to_timestep",
    "training_loss",
    "velocity_target",
]
