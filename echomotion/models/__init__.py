"""The EchoMotion model: plain single-device PyTorch (parallelism is applied from `parallel/`)."""
from .echomotion import EchoMotionDiT, Prediction, Task, is_motion_parameter

__all__ = ["EchoMotionDiT", "Prediction", "Task", "is_motion_parameter"]
