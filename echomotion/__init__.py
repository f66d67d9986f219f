"""EchoMotion: joint human video + SMPL motion generation on Wan (training and sampling system)."""
__version__ = "0.1.0"
