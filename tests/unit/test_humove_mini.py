"""HuMoVe-mini: codecs, text encoders, determinism, captions that match the pixels, the held-out split, stats."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from echomotion.data.encoders import (
    HashTextEncoder,
    PixelCodec,
    UMT5TextEncoder,
    WanVAECodec,
    build_text_encoder,
    text_encoder_from,
    video_codec_from,
    build_video_codec,
)
from echomotion.data.shards import compute_motion_stats, iter_samples
from echomotion.data.synthetic import (
    ACTIONS,
    COLOURS,
    ClipSpec,
    generate_humove_mini,
    make_motion,
    render_clip,
    sample_spec,
)
from echomotion.motion import MotionStats, SMPLLayer, write_synthetic_smpl_model
from tests.tiny_encoders import VAE_MEAN, VAE_STD, tiny_umt5, tiny_vae

CLIPS = 16
CAPTION = re.compile(r"^a person in an? (\w+) shirt and (\w+) trousers (\w+)(?: (slowly|quickly))? on an? (\w+) background$")


def _generate(out: Path, seed: int, **kw) -> dict:
    return generate_humove_mini(out, CLIPS, seed, progress=False, **kw)


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    root = tmp_path_factory.mktemp("humove")
    _generate(root / "a", 0, motion_only_clips=4)
    _generate(root / "b", 0, motion_only_clips=4)
    _generate(root / "c", 1, motion_only_clips=4)
    return root


def _samples(d: Path, split: str) -> list:
    return list(iter_samples(d / split))


# --- codecs and text encoders -----------------------------------------------------------------------------------------


def test_pixel_codec_exact_round_trip_and_layout():
    codec = PixelCodec()
    frames = torch.randint(0, 256, (2, 17, 32, 32, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    z = codec.encode(frames.numpy())
    assert z.shape == (2, 48, 5, 16, 16) and z.dtype == torch.float32
    assert codec.latent_shape(17, 32, 32) == (48, 5, 16, 16)
    assert z.min() >= -1 and z.max() <= 1
    assert np.array_equal(codec.decode(z), frames.numpy())
    assert np.array_equal(codec.decode(z.half()), frames.numpy())  # the shards store float16
    # layout: channel (k, rgb, dy, dx) of latent frame j is video frame 4j-3+k (frame 0 repeated for j = 0)
    b, j, k, c, dy, dx, y, x = 1, 2, 3, 1, 1, 0, 5, 7
    assert z[b, k * 12 + c * 4 + dy * 2 + dx, j, y, x] == frames[b, 4 * j - 3 + k, 2 * y + dy, 2 * x + dx, c] / 127.5 - 1
    assert torch.equal(z[:, 0:12, 0], z[:, 36:48, 0])
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        codec.encode(frames[:, :16].numpy())
    with pytest.raises(ValueError, match="uint8"):
        codec.encode(frames.float())


def test_hash_text_encoder_is_stable_and_true_length():
    enc = HashTextEncoder(context=0.0)  # the encoder of datasets written before the next-word term
    a, empty = enc.encode(["Walk walk", ""])
    assert a.shape == (2, 32) and a.dtype == torch.float32 and empty.shape == (0, 32)
    # a golden value: sha256-seeded, identical in every process and on every machine (python's hash() is not)
    assert torch.allclose(a[0, :3], torch.tensor([-1.6338015, 0.0655569, -0.8354466]), atol=1e-6)
    assert torch.equal(HashTextEncoder(context=0.0).encode(["walk walk"])[0], a)
    assert not torch.equal(a[0], a[1])  # position term keeps order visible
    assert not torch.equal(HashTextEncoder(seed=1, context=0.0).encode(["walk"])[0], a[:1])


def test_hash_text_encoder_tells_which_word_a_colour_belongs_to():
    """Each token carries its next word through a fixed rotation: "red" before "shirt" and before "background" are
    different tokens (a bag of words could not say which colour is the shirt's), and the term is exactly additive."""
    plain, ctx = HashTextEncoder(context=0.0), HashTextEncoder(context=1.0)
    shirt, background = ctx.encode(["red shirt", "red background"])
    assert not torch.allclose(shirt[0], background[0])
    assert torch.equal(shirt[1], plain.encode(["red shirt"])[0][1])  # the last word has no next word
    next_shirt = ctx.encode(["shirt"])[0][0] - plain.encode(["shirt"])[0][0]  # 0 + position: the word alone
    assert torch.allclose(next_shirt, torch.zeros(32), atol=1e-6)
    rotated = torch.from_numpy(ctx._next_word_map @ ctx._word("shirt")).float()
    assert torch.allclose(shirt[0] - plain.encode(["red shirt"])[0][0], rotated, atol=1e-5)
    assert torch.allclose(rotated.norm(), torch.from_numpy(ctx._word("shirt")).float().norm(), rtol=1e-5)  # a rotation


@pytest.mark.parametrize("context", [0.0, 1.0])
def test_sampling_encodes_prompts_like_the_dataset(context):
    """A dataset's dataset.json entry rebuilds its encoder exactly (one written before the next-word term has none)."""
    enc = HashTextEncoder(context=context)
    desc = enc.describe()
    if context == 0.0:
        del desc["context"]
    again = text_encoder_from(desc)
    prompt = "a person in a red shirt and blue trousers waves on a green background"
    assert torch.equal(again.encode([prompt])[0], enc.encode([prompt])[0])


def test_wan_vae_codec_normalizes_like_wan(tmp_path):
    codec = build_video_codec("wan-vae", tiny_vae(tmp_path / "vae"))
    assert isinstance(codec, WanVAECodec)
    assert (codec.latent_channels, codec.temporal_compression, codec.spatial_compression) == (4, 4, 8)
    frames = torch.randint(0, 256, (1, 9, 16, 16, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    z = codec.encode(frames)
    assert z.shape == (1, *codec.latent_shape(9, 16, 16)) == (1, 4, 3, 2, 2)
    with torch.no_grad():
        x = frames.permute(0, 4, 1, 2, 3).float() / 127.5 - 1
        raw = codec.vae.encode(x).latent_dist.mode()
    mean, std = torch.tensor(VAE_MEAN), torch.tensor(VAE_STD)
    assert torch.allclose(z, (raw - mean.view(1, 4, 1, 1, 1)) / std.view(1, 4, 1, 1, 1), atol=1e-6)
    video = codec.decode(z)
    assert video.shape == (1, 9, 16, 16, 3) and video.dtype == np.uint8


def test_umt5_text_encoder_true_length(tmp_path):
    enc = build_text_encoder("umt5", tiny_umt5(tmp_path / "umt5"))
    assert isinstance(enc, UMT5TextEncoder) and enc.dim == 16
    short, long_ = enc.encode(["a person waves", "a person in a red shirt waves quickly on a blue background"])
    assert short.shape == (4, 16) and long_.shape == (13, 16)  # words + </s>, padding removed
    alone = enc.encode(["a person waves"])[0]
    assert torch.allclose(short, alone, atol=1e-5)  # batch padding does not leak into the real tokens


def test_umt5_from_a_diffusers_pipeline_folder_equals_one_folder(tmp_path):
    """The Wan *-Diffusers download keeps the encoder in text_encoder/ and the tokenizer in tokenizer/: pointing at the
    pipeline folder gives the same embeddings as a folder holding both."""
    import shutil

    one = tiny_umt5(tmp_path / "umt5")
    pipeline = tmp_path / "Wan-Diffusers"
    (pipeline / "text_encoder").mkdir(parents=True)
    (pipeline / "tokenizer").mkdir()
    for f in one.iterdir():
        target = "text_encoder" if f.name in ("config.json", "model.safetensors") else "tokenizer"
        shutil.copy(f, pipeline / target / f.name)
    prompt = ["a person in a red shirt waves"]
    assert torch.equal(build_text_encoder("umt5", pipeline).encode(prompt)[0], build_text_encoder("umt5", one).encode(prompt)[0])
    with pytest.raises(FileNotFoundError, match="text_encoder/ and tokenizer/"):
        build_text_encoder("umt5", tmp_path)


def test_factories_name_the_fix():
    with pytest.raises(ValueError, match="--vae-path"):
        build_video_codec("wan-vae")
    with pytest.raises(ValueError, match="choose one of"):
        build_text_encoder("clip")
    with pytest.raises(FileNotFoundError, match="config.json"):
        build_video_codec("wan-vae", "/nonexistent/vae")


# --- the generated dataset ---------------------------------------------------------------------------------------------


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_generation_is_bit_identical_for_a_seed(mini):
    a, b, c = _files(mini / "a"), _files(mini / "b"), _files(mini / "c")
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    shards = [k for k in a if k.endswith(".mds")]
    assert {k.split("/")[0] for k in shards} == {"train", "heldout", "motion_only"}
    assert all(a[k] != c[k] for k in shards)


def test_all_actions_present_and_captions_name_action_and_colours(mini):
    samples = _samples(mini / "a", "train") + _samples(mini / "a", "heldout")
    assert len(samples) == CLIPS
    assert {s.category for s in samples} == set(ACTIONS)  # 10 >= 8 classes
    codec = PixelCodec()
    for s in samples:
        m = CAPTION.match(s.caption)
        assert m, s.caption
        shirt, trousers, verb, _, background = m.groups()
        assert verb == ACTIONS[s.category] and len({shirt, trousers, background}) == 3
        frames = codec.decode(s.video_latent[None].float())[0]
        assert tuple(frames[0, 0, 0]) == COLOURS[background]  # the wall is the named colour
        for colour in (shirt, trousers):  # the clothes show up in the named colours
            dist = np.abs(frames.reshape(-1, 3).astype(int) - COLOURS[colour]).sum(1)
            assert dist.min() <= 12, (s.caption, colour)


def test_video_is_a_function_of_motion_and_caption(mini):
    """Learnability: rendering the stored joints with the caption's colours gives exactly the stored video."""
    codec = PixelCodec()
    for s in _samples(mini / "a", "heldout") + _samples(mini / "a", "train")[:4]:
        shirt, trousers, _, _, background = CAPTION.match(s.caption).groups()
        again = render_clip(s.joints, shirt, trousers, background)
        assert np.array_equal(again, codec.decode(s.video_latent[None].float())[0])
    spec = ClipSpec("wave", 1.0, 1.0, 0.3, 0.0, 1, (0.0,) * 10, "red", "blue", "green")
    layer = SMPLLayer(mini / "a" / "smpl_synthetic.pkl")
    m1, m2 = make_motion(layer, spec), make_motion(layer, spec)
    assert np.array_equal(render_clip(m1.joints, "red", "blue", "green"), render_clip(m2.joints, "red", "blue", "green"))
    assert not np.array_equal(render_clip(m1.joints, "red", "blue", "green"),
                              render_clip(m1.joints, "red", "blue", "white"))


def test_heldout_split_is_disjoint_and_deterministic(mini):
    train = {s.clip_id for s in _samples(mini / "a", "train")}
    held = {s.clip_id for s in _samples(mini / "a", "heldout")}
    assert not train & held and len(train | held) == CLIPS and len(held) == 2  # round(16 * 0.1)
    assert held == {s.clip_id for s in _samples(mini / "b", "heldout")}


def test_motion_is_smpl_consistent_and_stats_match(mini):
    d = mini / "a"
    layer = SMPLLayer(d / "smpl_synthetic.pkl")
    train = _samples(d, "train")
    for s in train[:3]:
        assert s.joints.shape == (17, 24, 3) and s.body_pose.shape == (17, 23, 3)
        fk = layer.joints(s.betas, s.global_orient, s.body_pose, s.transl)
        assert torch.allclose(fk, s.joints, atol=1e-5)
        assert s.joints[:, [7, 8, 10, 11], 1].min() > -1e-4  # feet on or above the ground
    saved = MotionStats.load(d / "motion_stats.json")
    again = compute_motion_stats(d / "train")  # what tools/motion_stats.py computes from the shards
    assert saved.count == again.count == len(train) * 17
    assert torch.allclose(saved.mean, again.mean, atol=1e-9) and torch.allclose(saved.std, again.std, atol=1e-9)


def test_motion_only_stream_and_dataset_json(mini):
    d = mini / "a"
    mo = _samples(d, "motion_only")
    assert len(mo) == 4 and all(s.video_latent is None for s in mo)
    assert all(not any(c in s.caption for c in COLOURS) and ACTIONS[s.category] in s.caption for s in mo)
    info = json.loads((d / "dataset.json").read_text())
    assert info["latent_shape"] == [48, 5, 16, 16] and info["fps"] == 16 and info["num_frames"] == 17
    assert info["counts"] == {"train": 14, "heldout": 2, "motion_only": 4}
    assert torch.load(d / "null_text.pt").shape == (0, 32)


def test_generation_with_wan_vae_and_umt5(tmp_path):
    info = generate_humove_mini(tmp_path / "out", 2, 0, heldout_fraction=0.0, codec="wan-vae",
                                vae_path=str(tiny_vae(tmp_path / "vae")), text_encoder="umt5",
                                text_encoder_path=str(tiny_umt5(tmp_path / "umt5")), progress=False)
    assert info["latent_shape"] == [4, 5, 4, 4] and info["text_dim"] == 16
    (s, _) = _samples(tmp_path / "out", "train")
    assert s.video_latent.shape == (4, 5, 4, 4) and s.text_embedding.shape[1] == 16


def test_existing_output_is_not_overwritten(mini):
    with pytest.raises(FileExistsError, match="new --out"):
        _generate(mini / "a", 0)


def test_pca_codec_keeps_the_principal_components_of_the_pixel_tokens(tmp_path):
    """Fitted on HuMoVe-mini frames, 16 of the 48 pixel-token values decode held-out clips to within a few levels,
    every channel has unit variance on the data it was fitted on, and the file round-trips through dataset.json."""
    from echomotion.data.encoders import PCACodec

    layer = SMPLLayer(write_synthetic_smpl_model(tmp_path / "smpl.pkl"))
    rng = np.random.default_rng(0)

    def frames(n: int) -> np.ndarray:
        specs = [sample_spec(rng, list(ACTIONS)[i % len(ACTIONS)]) for i in range(n)]
        return np.stack([render_clip(make_motion(layer, s, 5).joints, s.shirt, s.trousers, s.background, 32, 16)
                         for s in specs])

    fit, held = frames(40), frames(10)
    codec = PCACodec.fit(fit, 16)
    z = codec.encode(fit)
    assert z.shape == (40, 16, 2, 16, 8) == (40, *codec.latent_shape(5, 32, 16))
    torch.testing.assert_close(z.std(dim=(0, 2, 3, 4)), torch.ones(16), atol=1e-3, rtol=0)
    error = np.abs(codec.decode(codec.encode(held)).astype(int) - held.astype(int)).mean()
    assert error < 4.0  # of 255 levels; keeping 4 components is far worse
    assert np.abs(PCACodec.fit(fit, 4).decode(PCACodec.fit(fit, 4).encode(held)).astype(int) - held.astype(int)).mean() > 2 * error
    torch.testing.assert_close(codec.basis @ codec.basis.T, torch.eye(16), atol=1e-5, rtol=0)  # orthonormal components
    codec.save(tmp_path / "codec.pt")
    again = video_codec_from(codec.describe() | {"file": "codec.pt"}, tmp_path)
    assert torch.equal(again.encode(held), codec.encode(held))
    with pytest.raises(ValueError, match="1..48 components"):
        PCACodec.fit(fit, 49)
    with pytest.raises(FileNotFoundError, match="copy it with the shards"):
        video_codec_from(codec.describe(), tmp_path / "elsewhere")


def test_humove_mini_with_the_pca_codec_decodes_close_to_the_renders(tmp_path):
    """The demo's data: --codec pca writes video_codec.pt, dataset.json names it, and the held-out videos (not fitted on)
    decode to within a few levels of their exact renders."""
    from echomotion.evaluate import parse_caption_colours

    info = generate_humove_mini(tmp_path, clips=12, num_frames=5, height=32, width=16, codec="pca", progress=False)
    assert info["video_codec"]["name"] == "pca" and info["latent_shape"] == [16, 2, 16, 8]
    codec = video_codec_from(info["video_codec"], tmp_path)
    for s in iter_samples(tmp_path / "heldout"):
        video = codec.decode(s.video_latent[None].float())[0]
        truth = render_clip(s.joints, *parse_caption_colours(s.caption), 32, 16)
        assert np.abs(video.astype(int) - truth.astype(int)).mean() < 6.0
