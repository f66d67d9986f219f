"""The dual-stream model's structure and contracts (Wan parity itself is in test_wan_parity.py)."""
import re
from pathlib import Path

import pytest
import torch

from echomotion.config import ConfigError, dual_layer_indices, load_config, model_preset
from echomotion.models import EchoMotionDiT, Task, is_motion_parameter
from echomotion.models.echomotion import DualBlock, VideoBlock
from echomotion.motion.smpl import MOTION_FEATURE_DIM, MOTION_TOKENS_PER_FRAME

ROOT = Path(__file__).resolve().parents[2]


def tiny(*overrides: str) -> EchoMotionDiT:
    torch.manual_seed(0)
    return EchoMotionDiT(model_preset("tiny", list(overrides))).eval()


def inputs(b: int = 2, frames: int = 5, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        video=torch.randn(b, 16, 3, 4, 6, generator=g),
        video_timestep=torch.tensor([700.0, 30.0][:b]),
        text=torch.randn(b, 16, 32, generator=g),
        motion=torch.randn(b, frames, MOTION_FEATURE_DIM, generator=g),
        motion_timestep=torch.tensor([250.0, 999.0][:b]),
    )


def randomize_zero_inits(model: EchoMotionDiT) -> None:
    """Zero-initialized output layers hide wiring bugs (and block gradients): give them random values."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_motion_tokenizer_shapes_and_gradient_flow() -> None:
    model = tiny()
    randomize_zero_inits(model)
    model.train()
    tokens = model.motion_embed(torch.randn(3, 7, MOTION_FEATURE_DIM))
    assert tokens.shape == (3, 7 * 51, 64)
    out = model(**inputs(), task=torch.tensor([Task.JOINT, Task.M2V]))
    assert out.video.shape == (2, 16, 3, 4, 6) and out.motion.shape == (2, 5, MOTION_FEATURE_DIM)
    (out.motion.square().mean() + out.video.square().mean()).backward()
    for name, p in model.named_parameters():
        if name.startswith(("motion_embed.", "motion_head.", "task_hint.")) or ".motion." in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_video_only_call_returns_a_tensor_and_motion_is_seen_by_video() -> None:
    model = tiny()
    randomize_zero_inits(model)
    kw = inputs()
    video_only = model(video=kw["video"], video_timestep=kw["video_timestep"], text=kw["text"])
    assert isinstance(video_only, torch.Tensor) and video_only.shape == kw["video"].shape
    joint = model(**kw)
    assert (joint.video - video_only).abs().max() > 1e-4  # joint attention: video tokens attend to motion tokens


def test_dropped_motion_equals_absent_motion() -> None:
    model = tiny()
    randomize_zero_inits(model)
    kw = inputs()
    absent = model(video=kw["video"], video_timestep=kw["video_timestep"], text=kw["text"])
    hidden = model(**kw, motion_mask=torch.zeros(2, 5, dtype=torch.bool))
    torch.testing.assert_close(hidden.video, absent, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(hidden.motion).all()


def test_padded_motion_frames_do_not_change_the_valid_ones() -> None:
    model = tiny()
    randomize_zero_inits(model)
    kw = inputs(b=1, frames=4)
    short = model(**kw)
    padded_motion = torch.cat([kw["motion"], torch.randn(1, 3, MOTION_FEATURE_DIM) * 5], dim=1)
    mask = torch.tensor([[True] * 4 + [False] * 3])
    long = model(**{**kw, "motion": padded_motion}, motion_mask=mask)
    torch.testing.assert_close(long.video, short.video, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(long.motion[:, :4], short.motion, rtol=1e-5, atol=1e-6)


def test_dropped_video_keeps_everything_finite_in_video_only_layers() -> None:
    model = tiny("model.num_layers=3", "model.dual_layers=1")
    randomize_zero_inits(model)
    kw = inputs()
    out = model(**kw, video_mask=torch.tensor([False, True]))
    assert torch.isfinite(out.video).all() and torch.isfinite(out.motion).all()
    solo = model(text=kw["text"][:1], motion=kw["motion"][:1], motion_timestep=kw["motion_timestep"][:1])
    torch.testing.assert_close(out.motion[:1], solo.motion, rtol=1e-5, atol=1e-6)


def test_per_token_timesteps_equal_per_sample_when_constant() -> None:
    model = tiny()
    randomize_zero_inits(model)
    kw = inputs()
    per_sample = model(video=kw["video"], video_timestep=kw["video_timestep"], text=kw["text"])
    tokens = 3 * 2 * 3
    per_token = model(video=kw["video"], video_timestep=kw["video_timestep"][:, None].expand(2, tokens), text=kw["text"])
    torch.testing.assert_close(per_token, per_sample, rtol=0, atol=0)


def test_video_only_layers_pass_motion_unchanged() -> None:
    # Layer 1 is video-only: its weights must not touch motion, and it holds no motion expert.
    model = tiny("model.num_layers=2", "model.dual_layers=0")
    randomize_zero_inits(model)
    assert isinstance(model.blocks[0], DualBlock) and type(model.blocks[1]) is VideoBlock
    kw = inputs()
    before = model(**kw).motion
    with torch.no_grad():
        for p in model.blocks[1].parameters():
            p.add_(torch.randn_like(p))
    torch.testing.assert_close(model(**kw).motion, before, rtol=0, atol=0)


def test_fresh_task_hint_leaves_the_function_unchanged() -> None:
    model = tiny()
    randomize_zero_inits(model)
    torch.nn.init.zeros_(model.task_hint.mlp[2].weight)
    torch.nn.init.zeros_(model.task_hint.mlp[2].bias)
    kw = inputs()
    without = model(**kw)
    with_hint = model(**kw, task=torch.tensor([Task.JOINT, Task.V2M]))
    torch.testing.assert_close(with_hint.video, without.video, rtol=0, atol=0)
    with torch.no_grad():
        model.task_hint.mlp[2].weight.normal_()
    assert (model(**kw, task=torch.tensor([Task.JOINT, Task.V2M])).video - without.video).abs().max() > 1e-4


def test_copy_video_experts_to_motion() -> None:
    model = tiny()
    model.copy_video_experts_to_motion()
    for i in model.dual_layers:
        sd = model.blocks[i].state_dict()
        for k, v in sd.items():
            if k.startswith("motion."):
                torch.testing.assert_close(v, sd[k[len("motion."):]], rtol=0, atol=0)


def test_parameter_counts_match_the_paper() -> None:
    # Wan2.1-1.3B has 1,418,996,800 parameters; all 30 layers dual "double[s] the parameters" (paper A.9: nominal 1.3B ->
    # 2.6B). Wan2.2-5B with 15 dual layers: 7.5B, "+51%" (Table 8).
    def count(name: str) -> tuple[int, int]:
        with torch.device("meta"):
            m = EchoMotionDiT(model_preset(name))
        total = sum(p.numel() for p in m.parameters())
        video = sum(p.numel() for n, p in m.named_parameters() if not is_motion_parameter(n))
        return video, total

    v13, t13 = count("wan2.1-1.3b")
    assert v13 == 1_418_996_800
    assert t13 / v13 == pytest.approx(2.0, abs=0.02)
    v5, t5 = count("wan2.2-5b")
    assert v5 == pytest.approx(4_999_787_712, rel=1e-3)
    assert t5 / v5 == pytest.approx(1.51, abs=0.02) and 7.4e9 < t5 < 7.6e9


def test_state_dict_video_names_are_wans() -> None:
    model = tiny()
    names = [n for n in model.state_dict() if not is_motion_parameter(n)]
    block = sorted({re.sub(r"^blocks\.0\.", "", n) for n in names if n.startswith("blocks.0.")})
    assert block == sorted(
        [f"self_attn.{p}.{w}" for p in "qkvo" for w in ("weight", "bias")]
        + ["self_attn.norm_q.weight", "self_attn.norm_k.weight", "norm3.weight", "norm3.bias"]
        + [f"cross_attn.{p}.{w}" for p in "qkvo" for w in ("weight", "bias")]
        + ["cross_attn.norm_q.weight", "cross_attn.norm_k.weight"]
        + [f"ffn.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")]
        + ["modulation"]
    )
    top = sorted(n for n in names if not n.startswith("blocks."))
    assert top == sorted(
        ["patch_embedding.weight", "patch_embedding.bias", "head.head.weight", "head.head.bias", "head.modulation"]
        + [f"{e}.{i}.{w}" for e in ("text_embedding", "time_embedding") for i in (0, 2) for w in ("weight", "bias")]
        + ["time_projection.1.weight", "time_projection.1.bias"]
    )


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["model.dim=63"], "not divisible by model.num_heads"),
        (["model.dual_layers=0,9"], "outside 0..1"),
        (["model.dual_layers=middle"], "neither a name"),
        (["model.rope.motion_layout=diag"], "choose 'mvs' or 'collision'"),
        (["diffusion.task_probs=[0.5,0.5,0.5]"], "summing to 1"),
        (["sample.solver=rk4"], "choose 'euler' or 'heun'"),
        (["model.abs_pos=learned"], "choose 'none' (Wan) or 'sincos'"),
    ],
)
def test_invalid_configs_name_the_key(overrides: list[str], fragment: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        load_config(ROOT / "configs/model/tiny.yaml", overrides)


def test_unknown_key_is_rejected() -> None:
    with pytest.raises(ConfigError, match="num_layer"):
        load_config(None, ["model.num_layer=3"])


def test_presets() -> None:
    assert model_preset("wan2.1-1.3b").num_heads == 12
    five = model_preset("wan2.2-5b")
    assert len(dual_layer_indices(five)) == 15 and five.in_channels == 48
    with pytest.raises(ConfigError, match="unknown model preset"):
        model_preset("wan9")


def test_position_aid_is_off_for_wan_and_adds_exactly_the_sincos_embedding() -> None:
    """`model.abs_pos` is a toy-only aid: the Wan presets keep it off (Wan parity and checkpoint I/O unchanged, see
    test_wan_parity.py). On, it adds the sinusoid of each token's position to the embedded tokens and nothing else: a
    model with it equals one without it whose patch embedding / motion tokenizer output has the embedding added by hand."""
    from echomotion.models.rope import motion_positions, sincos_embedding, video_positions

    assert model_preset("wan2.1-1.3b").abs_pos == model_preset("wan2.2-5b").abs_pos == "none"
    assert model_preset("tiny").abs_pos == "none" and load_config(ROOT / "configs/tiny.yaml").model.abs_pos == "sincos"
    aided, plain, bare = tiny("model.abs_pos=sincos"), tiny(), tiny()
    randomize_zero_inits(aided)
    plain.load_state_dict(aided.state_dict())
    bare.load_state_dict(aided.state_dict())
    x = inputs()
    video_pe = sincos_embedding(video_positions(3, 2, 3), 64)  # latent [3, 4, 6], patch 1x2x2 -> grid 3 x 2 x 3
    motion_pe = sincos_embedding(motion_positions(5, MOTION_TOKENS_PER_FRAME, (0, 0), "mvs", 4.0), 64)  # (f / 4, i, i), video or not
    plain.patch_embedding.register_forward_hook(lambda m, i, out: out + video_pe.T.reshape(1, 64, 3, 2, 3))
    plain.motion_embed.register_forward_hook(lambda m, i, out: out + motion_pe)
    with torch.no_grad():
        want, got = plain(**x, task=torch.tensor([1, 1])), aided(**x, task=torch.tensor([1, 1]))
        torch.testing.assert_close(got.video, want.video)
        torch.testing.assert_close(got.motion, want.motion)
        assert not torch.allclose(got.video, bare(**x, task=torch.tensor([1, 1])).video, atol=1e-3)  # it does add


@pytest.mark.optional(reason="checks the CPU-only refusal; a CUDA machine runs the flash path instead")
def test_flash_backend_fails_clearly_without_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(RuntimeError, match="attention_backend=sdpa"):
        EchoMotionDiT(model_preset("tiny", ["model.attention_backend=flash"]))


def test_model_package_imports_no_parallel_or_gpu_code() -> None:
    pattern = re.compile(r"^\s*(from|import)\s+(parallel|launcher|deepspeed|megatron|transformer_engine)\b", re.M)
    offenders = [str(p) for p in (ROOT / "echomotion/models").rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []
