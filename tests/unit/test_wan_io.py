"""Wan checkpoint I/O: the key maps, every accepted layout, and errors that name what is wrong."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from echomotion.config import ModelConfig
from echomotion.models import EchoMotionDiT
from echomotion.models import wan_io
from echomotion.models.wan_io import (
    WanCheckpointError,
    diffusers_to_original_key,
    load_wan,
    original_to_diffusers_key,
    save_wan,
    video_state_dict,
    wan_config,
)

TINY = ModelConfig(dim=64, ffn_dim=96, num_heads=2, num_layers=2, freq_dim=32, text_dim=32, in_channels=16, out_channels=16)


@pytest.fixture(scope="module")
def model() -> EchoMotionDiT:
    torch.manual_seed(0)
    m = EchoMotionDiT(TINY)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


@pytest.fixture(scope="module")
def original_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in video_state_dict(model).items()}


def same_video_path(a: EchoMotionDiT, b: EchoMotionDiT) -> bool:
    sa, sb = video_state_dict(a), video_state_dict(b)
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------------------------------------ key maps
def test_key_maps_are_inverse_and_cover_the_video_path(original_state):
    assert "blocks.0.motion.ffn.0.weight" not in original_state and "motion_embed.pos.0.weight" not in original_state
    for k in original_state:
        assert diffusers_to_original_key(original_to_diffusers_key(k)) == k
    assert original_to_diffusers_key("blocks.1.norm3.weight") == "blocks.1.norm2.weight"  # the norm swap
    assert original_to_diffusers_key("blocks.1.modulation") == "blocks.1.scale_shift_table"
    assert original_to_diffusers_key("head.modulation") == "scale_shift_table"
    assert original_to_diffusers_key("head.head.bias") == "proj_out.bias"
    assert original_to_diffusers_key("blocks.0.self_attn.o.weight") == "blocks.0.attn1.to_out.0.weight"
    assert original_to_diffusers_key("blocks.0.ffn.0.weight") == "blocks.0.ffn.net.0.proj.weight"
    assert original_to_diffusers_key("time_projection.1.weight") == "condition_embedder.time_proj.weight"
    for bad in ("blocks.0.norm2.weight", "head.norm.weight", "blocks.0.motion.ffn.0.weight"):
        with pytest.raises(KeyError):
            original_to_diffusers_key(bad)


def test_key_map_matches_diffusers_module_names(original_state):
    import diffusers  # a required dev dependency: fail, never skip

    ref = diffusers.WanTransformer3DModel(
        num_attention_heads=2, attention_head_dim=32, text_dim=32, freq_dim=32, ffn_dim=96, num_layers=2
    )
    assert {original_to_diffusers_key(k) for k in original_state} == set(ref.state_dict())


# ------------------------------------------------------------------------------------------------------------- layouts
def test_original_wan_directory_with_shards_and_config(model, original_state, tmp_path):
    """Wan's own layout: diffusion_pytorch_model-0000i-of-0000n.safetensors + index + config.json (WanModel)."""
    keys = sorted(original_state)
    halves = {
        "diffusion_pytorch_model-00001-of-00002.safetensors": keys[::2],
        "diffusion_pytorch_model-00002-of-00002.safetensors": keys[1::2],
    }
    for name, part in halves.items():
        save_file({k: original_state[k] for k in part}, str(tmp_path / name))
    index = {"metadata": {}, "weight_map": {k: name for name, part in halves.items() for k in part}}
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "Wan2.1_VAE.pth").write_bytes(b"not the DiT")  # Wan ships the VAE and T5 next to the DiT
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "WanModel", "num_heads": 2, "text_len": 512, "eps": 1e-6}))
    loaded = load_wan(tmp_path)
    assert same_video_path(loaded, model)
    assert loaded.config.num_heads == 2 and loaded.config.text_len == 512 and loaded.config.dual_layers == "all"


def test_pth_file_and_pth_index(model, original_state, tmp_path):
    torch.save(original_state, tmp_path / "wan.pth")
    assert same_video_path(load_wan(tmp_path / "wan.pth", TINY), model)
    keys = sorted(original_state)
    torch.save({k: original_state[k] for k in keys[:5]}, tmp_path / "a.pth")
    torch.save({k: original_state[k] for k in keys[5:]}, tmp_path / "b.pth")
    index = {"weight_map": {k: ("a.pth" if i < 5 else "b.pth") for i, k in enumerate(keys)}}
    (tmp_path / "wan.pth.index.json").write_text(json.dumps(index))
    assert same_video_path(load_wan(tmp_path / "wan.pth.index.json", TINY), model)


def test_inferred_config_and_dual_layers(model, tmp_path):
    file = save_wan(model, tmp_path / "wan.safetensors", dtype=torch.bfloat16)
    cfg = wan_config(file, dual_layers="even")
    assert (cfg.dim, cfg.ffn_dim, cfg.num_heads, cfg.num_layers, cfg.freq_dim, cfg.text_dim) == (64, 96, 2, 2, 32, 32)
    loaded = load_wan(file, cfg)
    assert loaded.dual_layers == [0]
    assert loaded.blocks[0].self_attn.q.weight.dtype == torch.float32  # bf16 on disk, fp32 master weights
    assert torch.equal(loaded.blocks[0].self_attn.q.weight, model.blocks[0].self_attn.q.weight.bfloat16().float())


def test_head_count_defaults_to_wan_head_dim_without_config(tmp_path):
    cfg = ModelConfig(dim=256, ffn_dim=64, num_heads=4, num_layers=1, freq_dim=32, text_dim=32)
    state = video_state_dict(EchoMotionDiT(cfg))
    save_file(state, str(tmp_path / "plain.safetensors"))
    assert wan_config(tmp_path / "plain.safetensors").num_heads == 2  # 256 // 128
    save_file(video_state_dict(EchoMotionDiT(TINY)), str(tmp_path / "odd.safetensors"))
    with pytest.raises(WanCheckpointError, match="num_heads"):
        wan_config(tmp_path / "odd.safetensors")  # dim 64: no 128-wide heads, no config -> ask


# -------------------------------------------------------------------------------------------------------------- errors
def test_missing_unexpected_and_mismatched_keys_are_named(original_state, tmp_path):
    state = dict(original_state)
    del state["blocks.1.cross_attn.norm_k.weight"]
    state["blocks.0.extra.weight"] = torch.zeros(3)
    state["blocks.0.ffn.0.weight"] = torch.zeros(97, 64)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(WanCheckpointError) as e:
        load_wan(tmp_path / "bad.safetensors", TINY)
    msg = str(e.value)
    assert "missing keys" in msg and "blocks.1.cross_attn.norm_k.weight" in msg
    assert "unexpected keys" in msg and "blocks.0.extra.weight" in msg
    assert "blocks.0.ffn.0.weight: checkpoint [97, 64] vs model [96, 64]" in msg


def test_config_that_does_not_fit_names_key_and_shapes(model, tmp_path):
    file = save_wan(model, tmp_path / "wan.safetensors")
    wrong = ModelConfig(**{**TINY.__dict__, "text_dim": 48})
    with pytest.raises(WanCheckpointError, match=r"text_embedding\.0\.weight: checkpoint \[64, 32\] vs model \[64, 48\]"):
        load_wan(file, wrong)
    with pytest.raises(WanCheckpointError, match="declares 2 attention heads but model.num_heads=4"):
        load_wan(file, ModelConfig(**{**TINY.__dict__, "num_heads": 4}))


def test_diffusers_unknown_keys_show_both_names(model, tmp_path):
    folder = save_wan(model, tmp_path / "d", layout="diffusers")
    state = load_file(folder / wan_io.WEIGHTS_NAME)
    state["blocks.0.attn1.to_qkv.weight"] = torch.zeros(3)
    save_file(state, str(folder / wan_io.WEIGHTS_NAME))
    with pytest.raises(WanCheckpointError, match=r"blocks\.0\.attn1\.to_qkv\.weight"):
        load_wan(folder)


@pytest.mark.parametrize("image_key", ["blocks.0.cross_attn.k_img.weight", "img_emb.proj.0.weight"])
def test_image_to_video_checkpoint_is_refused_by_name(original_state, tmp_path, image_key):
    save_file({**original_state, image_key: torch.zeros(4)}, str(tmp_path / "i2v.safetensors"))
    with pytest.raises(WanCheckpointError, match=rf"not supported.*{image_key.replace('.', chr(92) + '.')}"):
        load_wan(tmp_path / "i2v.safetensors", TINY)


def test_unrecognized_inputs(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_wan(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WanCheckpointError, match="no Wan weights"):
        load_wan(tmp_path / "empty")
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLWan"}))
    with pytest.raises(WanCheckpointError, match="AutoencoderKLWan, not a Wan transformer"):
        load_wan(tmp_path / "vae")


# -------------------------------------------------------------------------------------------------------------- saving
def test_interrupted_save_leaves_the_old_file(model, tmp_path, monkeypatch):
    file = save_wan(model, tmp_path / "wan.safetensors")
    before = file.read_bytes()

    def broken(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(wan_io, "save_file", broken)
    with pytest.raises(KeyboardInterrupt):
        save_wan(model, file)
    assert file.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["wan.safetensors"]  # no temporary left behind


def test_save_rejects_wrong_targets(model, tmp_path):
    with pytest.raises(ValueError, match=r"\.safetensors"):
        save_wan(model, tmp_path / "wan.pt")
    with pytest.raises(ValueError, match="directory"):
        save_wan(model, tmp_path / "wan.safetensors", layout="diffusers")
    with pytest.raises(ValueError, match="layout"):
        save_wan(model, tmp_path / "x", layout="megatron")
