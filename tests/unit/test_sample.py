"""The sampling CLI's InferenceContext on a tiny HuMoVe-mini: clip lengths are checked against dataset.json."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from echomotion.config import load_config
from echomotion.data.synthetic import generate_humove_mini
from echomotion.export import save_exported
from echomotion.models import EchoMotionDiT
from echomotion.sample import InferenceContext

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def context(tmp_path_factory) -> InferenceContext:
    root = tmp_path_factory.mktemp("sample")
    data = root / "humove-mini"
    generate_humove_mini(data, clips=4, num_frames=9, heldout_fraction=0.5, progress=False)
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["model.num_layers=1", "model.dim=32", "model.ffn_dim=64"])
    torch.manual_seed(0)
    return InferenceContext(save_exported(EchoMotionDiT(cfg.model), cfg, root / "model.safetensors"), data)


@pytest.mark.parametrize("task", ["m2v", "v2m"])
def test_clips_must_have_the_datasets_frame_count(context, task, monkeypatch):
    """m2v's motion and v2m's video come from the clip, the other modality's length from dataset.json: a 9-frame clip
    against a dataset.json of 17 frames (5 latents) used to sample silently with the motion off the video in time."""
    clips = context.clips("heldout")[:1]
    assert clips[0].num_frames == 9 and context.info["num_frames"] == 9
    (out,) = context.generate(task, clips=clips, overrides=dict(steps=1))
    assert (out.video if task == "m2v" else out.motion) is not None

    latent = list(context.info["latent_shape"])
    monkeypatch.setitem(context.info, "num_frames", 17)
    monkeypatch.setitem(context.info, "latent_shape", [latent[0], 5, *latent[2:]])
    with pytest.raises(ValueError, match=rf"{task}: clips \{{'{clips[0].clip_id}': 9\}} .* num_frames=17 of .*dataset.json"):
        context.generate(task, clips=clips, overrides=dict(steps=1))
