"""Acceptance: with no motion, EchoMotionDiT.from_wan reproduces diffusers' WanTransformer3DModel (fp32).

Tiny random diffusers models (every parameter perturbed, so a swapped norm or a mis-mapped table cannot hide behind a default
init) are saved with `save_pretrained` and loaded through the public API; the same holds for the original-format file that
`save_wan` writes, and `save_wan(layout="diffusers")` gives diffusers back the exact tensors.

Two tolerances, because diffusers and Wan differ in one place: diffusers computes the timestep sinusoid in float32, Wan (and
this model) in float64. The float32 frequencies are off by ~1 ulp, i.e. by up to ~4e-5 in the sinusoid at t = 1000, and that
alone moves diffusers' output by up to ~2e-5 (relative) at large timesteps in these deliberately "hot" random models. So:
- with Wan's float64 sinusoid swapped into diffusers (nothing else changed), outputs agree to <= 1e-6 (measured: < 7e-7, fp32
  rounding of fused vs unfused elementwise ops) and gradients to <= 1e-5: the key map and the math are exact;
- against unmodified diffusers, the error is <= 1e-5 up to t = 250 and <= FP32_SINUSOID_TOLERANCE over the whole 0..1000
  range; the measured maxima are printed (`pytest -s`);
- models at diffusers' own initialization (perturbed by 0.05 instead of 0.2) stay <= 1e-5 against unmodified diffusers at
  every timestep (`test_unmodified_diffusers_within_1e5_at_every_timestep`).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import torch
from torch import nn

from diffusers import WanTransformer3DModel  # a required dev dependency: a broken install fails here, it does not skip
from diffusers.utils import is_accelerate_available

from echomotion.models import EchoMotionDiT, Prediction
from echomotion.models.wan import sinusoidal_embedding
from echomotion.models.wan_io import diffusers_to_original_key, load_wan, save_wan
from echomotion.motion.smpl import MOTION_FEATURE_DIM

EXACT_TOLERANCE = 1e-6  # vs diffusers with Wan's float64 timestep sinusoid
TOLERANCE = 1e-5  # vs unmodified diffusers, t <= 250
FP32_SINUSOID_TOLERANCE = 5e-5  # vs unmodified diffusers, any t in 0..1000 (float32 sinusoid; see the module docstring)


@dataclass(frozen=True)
class Case:
    name: str
    heads: int
    head_dim: int
    layers: int
    channels: tuple[int, int]  # in, out
    freq_dim: int
    ffn_dim: int
    latent: tuple[int, int, int]  # F, H, W (odd token grids)
    batch: int = 2


CASES = [
    Case("wan2.1-like", heads=2, head_dim=16, layers=1, channels=(16, 16), freq_dim=32, ffn_dim=48, latent=(3, 6, 10)),
    Case("freq256-hd24", heads=2, head_dim=24, layers=2, channels=(16, 16), freq_dim=256, ffn_dim=96, latent=(5, 2, 6)),
    Case("wan2.2-like-48ch", heads=2, head_dim=32, layers=3, channels=(48, 48), freq_dim=256, ffn_dim=128, latent=(3, 10, 6)),
    Case("hd20-in20-out12", heads=3, head_dim=20, layers=2, channels=(20, 12), freq_dim=64, ffn_dim=80, latent=(1, 6, 6), batch=1),
]


def diffusers_model(case: Case, seed: int) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=case.heads,
        attention_head_dim=case.head_dim,
        in_channels=case.channels[0],
        out_channels=case.channels[1],
        text_dim=32,
        freq_dim=case.freq_dim,
        ffn_dim=case.ffn_dim,
        num_layers=case.layers,
    ).eval()
    with torch.no_grad():
        for p in model.parameters():  # norms start at 1, biases and the output layer at defaults: perturb everything
            p.add_(0.2 * torch.randn_like(p))
    return model


def timesteps(case: Case, tokens: int) -> dict[str, torch.Tensor]:
    """Integer timesteps in Wan's 0..1000 range: per sample, and per token (TI2V: first latent frame clean)."""
    g = torch.Generator().manual_seed(1)
    b = case.batch
    per_sample = torch.tensor([1000, 3, 999][:b])
    ti2v = per_sample[:, None].repeat(1, tokens)
    ti2v[:, : tokens // case.latent[0]] = 0
    return {
        "per_sample": per_sample,
        "per_sample_mid": torch.randint(0, 1001, (b,), generator=g),
        "per_token_ti2v": ti2v,
        "per_token_random": torch.randint(0, 1001, (b, tokens), generator=g),
    }


def inputs(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    video = torch.randn(case.batch, case.channels[0], *case.latent, generator=g)
    text = torch.randn(case.batch, 7, 32, generator=g)
    return video, text


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module", params=CASES, ids=lambda c: c.name)
def loaded(request, tmp_path_factory):
    case: Case = request.param
    ref = diffusers_model(case, seed=CASES.index(case))
    folder = tmp_path_factory.mktemp(case.name)
    ref.save_pretrained(folder)
    ours = load_wan(folder).eval()
    return case, ref, ours, folder


class WanSinusoid(nn.Module):
    """Wan's float64 timestep sinusoid, standing in for diffusers' float32 `Timesteps` (same formula, cos first)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return sinusoidal_embedding(t, self.dim).float()


@contextmanager
def wan_sinusoid(ref: WanTransformer3DModel) -> Iterator[WanTransformer3DModel]:
    original = ref.condition_embedder.timesteps_proj
    ref.condition_embedder.timesteps_proj = WanSinusoid(ref.config.freq_dim)
    try:
        yield ref
    finally:
        ref.condition_embedder.timesteps_proj = original


def errors(case: Case, ref: WanTransformer3DModel, ours: EchoMotionDiT) -> dict[str, float]:
    """Relative output error per timestep pattern."""
    video, text = inputs(case)
    out = {}
    with torch.no_grad():
        for kind, t in timesteps(case, video[0, 0].numel() // 4).items():
            want = ref(video, t, text, return_dict=False)[0]
            got = ours(video=video, video_timestep=t, text=text)
            assert got.shape == want.shape
            out[kind] = rel_err(got, want)
    return out


def check_parity(case: Case, ref: WanTransformer3DModel, ours: EchoMotionDiT, label: str) -> None:
    with wan_sinusoid(ref):
        exact = errors(case, ref, ours)
    assert max(exact.values()) <= EXACT_TOLERANCE, f"{label} vs diffusers with Wan's sinusoid: {exact}"
    as_is = errors(case, ref, ours)
    assert max(as_is.values()) <= FP32_SINUSOID_TOLERANCE, f"{label} vs unmodified diffusers: {as_is}"
    video, text = inputs(case)
    with torch.no_grad():
        for t in (0, 1, 17, 100, 250):
            ts = torch.full((case.batch,), t)
            err = rel_err(ours(video=video, video_timestep=ts, text=text), ref(video, ts, text, return_dict=False)[0])
            assert err <= TOLERANCE, f"{label} vs unmodified diffusers at t={t}: {err:.2e}"
    print(f"\n{label}: rel. error vs diffusers+Wan sinusoid " + ", ".join(f"{k} {v:.1e}" for k, v in exact.items()))
    print(f"{label}: rel. error vs unmodified diffusers " + ", ".join(f"{k} {v:.1e}" for k, v in as_is.items()))


class Fp32WanTransformer3DModel(WanTransformer3DModel):
    """WanTransformer3DModel minus its fp32-kept module list, which only matters for half-precision loads but makes
    from_pretrained demand `accelerate` (not installed here); everything else is diffusers' own loading path."""

    _keep_in_fp32_modules = None


def diffusers_from_pretrained(folder: Path) -> WanTransformer3DModel:
    cls = WanTransformer3DModel if is_accelerate_available() else Fp32WanTransformer3DModel
    model, info = cls.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), f"diffusers reports loading problems: {info}"
    return model


def test_diffusers_checkpoint_reproduces_diffusers(loaded):
    case, ref, ours, _ = loaded
    check_parity(case, ref, ours, case.name)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_unmodified_diffusers_within_1e5_at_every_timestep(case: Case, tmp_path: Path) -> None:
    """The acceptance bound as written: against diffusers as shipped (float32 sinusoid), relative error <= 1e-5 at every
    timestep pattern of 0..1000, for random models at diffusers' own initialization with every parameter perturbed by
    N(0, 0.05^2) (so no mapping error can hide behind a default). Only the 4x hotter models above exceed it at t ~ 1000."""
    torch.manual_seed(100 + CASES.index(case))
    ref = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=case.heads, attention_head_dim=case.head_dim,
        in_channels=case.channels[0], out_channels=case.channels[1], text_dim=32, freq_dim=case.freq_dim,
        ffn_dim=case.ffn_dim, num_layers=case.layers,
    ).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref.save_pretrained(tmp_path)
    errs = errors(case, ref, load_wan(tmp_path).eval())
    print(f"\n{case.name} at diffusers' init: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    assert max(errs.values()) <= TOLERANCE, errs


def test_gradients_match_diffusers(loaded):
    """Training goes through backward too: parameter gradients agree name for name (per-token timesteps)."""
    case, ref, ours, _ = loaded
    video, text = inputs(case)
    t = timesteps(case, video[0, 0].numel() // 4)["per_token_ti2v"]
    target = torch.randn(video.shape[0], case.channels[1], *case.latent, generator=torch.Generator().manual_seed(3))
    with wan_sinusoid(ref):
        ((ref(video, t, text, return_dict=False)[0] - target) ** 2).mean().backward()
    ((ours(video=video, video_timestep=t, text=text) - target) ** 2).mean().backward()
    ours_params = dict(ours.named_parameters())
    worst = max(rel_err(ours_params[diffusers_to_original_key(n)].grad, p.grad) for n, p in ref.named_parameters())
    ref.zero_grad(set_to_none=True)
    ours.zero_grad(set_to_none=True)
    print(f"\n{case.name}: max rel. gradient error {worst:.1e}")
    assert worst <= 1e-5


def test_original_format_roundtrip(loaded, tmp_path):
    case, ref, ours, _ = loaded
    file = save_wan(ours, tmp_path / "wan.safetensors", layout="original")
    again = load_wan(file).eval()  # config (incl. head count) read back from the file's header
    video, text = inputs(case)
    t = torch.tensor([1000, 3, 999][: case.batch])
    with torch.no_grad():
        assert torch.equal(again(video=video, video_timestep=t, text=text), ours(video=video, video_timestep=t, text=text))
    check_parity(case, ref, again, f"{case.name} (original format)")


def test_diffusers_export_is_exact(loaded, tmp_path):
    case, ref, ours, _ = loaded
    folder = save_wan(ours, tmp_path / "export", layout="diffusers")
    back = diffusers_from_pretrained(folder)
    want, got = ref.state_dict(), back.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want), "exported tensors differ from the source model"
    assert back.config.num_attention_heads == case.heads and back.config.attention_head_dim == case.head_dim


def test_motion_experts_start_as_video_experts(loaded):
    case, _, ours, _ = loaded
    assert ours.dual_layers == list(range(case.layers))
    for i in ours.dual_layers:
        block = ours.blocks[i]
        for name, motion_param in block.motion.state_dict().items():
            assert torch.equal(motion_param, block.state_dict()[name]), f"blocks.{i}.motion.{name} != blocks.{i}.{name}"
    video, text = inputs(case)
    frames = 5
    out = ours(
        video=video,
        video_timestep=torch.full((case.batch,), 500),
        text=text,
        motion=torch.randn(case.batch, frames, MOTION_FEATURE_DIM),
        motion_timestep=torch.full((case.batch,), 200),
    )
    assert isinstance(out, Prediction)
    assert out.video.shape == (case.batch, case.channels[1], *case.latent)
    assert out.motion.shape == (case.batch, frames, MOTION_FEATURE_DIM)
    assert torch.isfinite(out.video).all() and torch.isfinite(out.motion).all()


def test_pipeline_folder_and_sharded_checkpoint(loaded, tmp_path):
    """A diffusers pipeline root (transformer/ subfolder) holding a sharded checkpoint loads to the same weights."""
    case, ref, ours, _ = loaded
    ref.save_pretrained(tmp_path / "pipe" / "transformer", max_shard_size="20KB")
    assert list((tmp_path / "pipe" / "transformer").glob("*.index.json"))
    again = load_wan(tmp_path / "pipe")
    want = ours.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in again.state_dict().items() if not k.startswith(("motion_", "task_hint")))
