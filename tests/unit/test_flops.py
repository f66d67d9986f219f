"""The analytic FLOPs model (MFU, the parallel planner) against PyTorch's own FLOP counter running the real model.

`torch.utils.flop_counter` counts every matmul and convolution the forward dispatches. Its table has no entry for the
CPU attention kernel, so the test adds one with PyTorch's own SDPA formula (`sdpa_flop_count`); everything else is the
counter's. Elementwise work (norms, modulation, RoPE) is in neither count.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from echomotion.config import model_preset
from echomotion.models import EchoMotionDiT
from echomotion.models.flops import forward_flops, training_flops
from echomotion.motion.smpl import MOTION_FEATURE_DIM, MOTION_TOKENS_PER_FRAME

VIDEO = (3, 8, 8)  # latent frames, height, width: 48 tokens with the tiny model's 1 x 2 x 2 patches
FRAMES, TEXT = 9, 16


def _cpu_sdpa(query: torch.Size, key: torch.Size, value: torch.Size, *args, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def counted_flops(model: EchoMotionDiT, video: bool, motion: bool) -> int:
    cfg = model.config
    kw: dict = {"text": torch.randn(1, TEXT, cfg.text_dim)}
    if video:
        kw.update(video=torch.randn(1, cfg.in_channels, *VIDEO), video_timestep=torch.tensor([500.0]))
    if motion:
        kw.update(motion=torch.randn(1, FRAMES, MOTION_FEATURE_DIM), motion_timestep=torch.tensor([300.0]))
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        model(**kw)
    assert any("scaled_dot_product" in str(op) for op in counter.get_flop_counts()["Global"]), "attention not counted"
    return counter.get_total_flops()


@pytest.mark.parametrize("dual_layers", ["all", "1"])  # every layer dual, or only the second
@pytest.mark.parametrize("video, motion", [(True, True), (True, False), (False, True)])
def test_forward_flops_match_torch_flop_counter(video: bool, motion: bool, dual_layers: str) -> None:
    cfg = model_preset("tiny", [f"model.dual_layers={dual_layers}"])
    model = EchoMotionDiT(cfg).eval()
    patch = cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2]
    video_tokens = VIDEO[0] * VIDEO[1] * VIDEO[2] // patch if video else 0
    motion_tokens = FRAMES * MOTION_TOKENS_PER_FRAME if motion else 0
    analytic = forward_flops(cfg, video_tokens, motion_tokens, TEXT)
    assert analytic == pytest.approx(counted_flops(model, video, motion), rel=0.01)
    assert training_flops(cfg, video_tokens, motion_tokens, TEXT) == 3 * analytic
