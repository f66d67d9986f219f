"""The sampling CLI on a tiny HuMoVe-mini: clip lengths are checked against dataset.json, every sample gets its own
folder, user errors are one line."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from echomotion.config import load_config
from echomotion.data.synthetic import generate_humove_mini
from echomotion.export import DataAssets, load_exported, read_data_assets, save_exported
from echomotion.models import EchoMotionDiT
import echomotion.sample
from echomotion.sample import InferenceContext, main as sample_main, write_outputs

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


def test_sample_folders_never_collide(context, tmp_path):
    """Folders are named after the prompt's slug (its first 60 characters) or the clip id: two long prompts that differ
    only at the end, a repeated prompt and a repeated clip used to share a folder, each sample overwriting the last."""
    stem = "a person in a red shirt and blue trousers waves on a green background, "
    prompts = [stem + "slowly", stem + "quickly", stem + "slowly"]
    gens = context.generate("t2m", prompts=prompts, overrides=dict(steps=1))
    slug = stem.replace(",", "").replace(" ", "-")[:60]
    assert [g.name for g in gens] == [slug, f"{slug}-2", f"{slug}-3"]
    dirs = {write_outputs(g, tmp_path / "t2m", context.fps) for g in gens}
    assert [(d / "caption.txt").read_text() for d in sorted(dirs)] == [p + "\n" for p in prompts]

    clip = context.clips("heldout")[0]
    gens = context.generate("v2m", clips=[clip, clip], overrides=dict(steps=1))
    assert [g.name for g in gens] == [clip.clip_id, f"{clip.clip_id}-2"]


def test_cli_user_errors_are_one_line_and_exit_2(context, capsys):
    """`sample: <message>` and exit 2, not a traceback; the KeyError of an unknown clip used to print in quotes."""
    base = ["--checkpoint", str(context.data.parent / "model.safetensors"), "--data", str(context.data)]
    known = context.clips("heldout")[0].clip_id
    for args, message in (
        (["--task", "m2v", "--clip", "nope"], f"sample: clip ids ['nope'] not in {context.data / 'heldout'}; available e.g. ['{known}'"),
        (["--task", "v2m"], "sample: task v2m needs input clips (--clip ID)"),
        (["--task", "t2m"], "sample: task t2m needs --prompt or --prompts"),
        (["--task", "t2m", "--prompt", "x", "--checkpoint", str(context.data / "dataset.json")], "is not a safetensors file"),
    ):
        with pytest.raises(SystemExit) as exited:
            sample_main([*base, *args])
        err = capsys.readouterr().err
        assert exited.value.code == 2 and message in err and err.startswith("sample: ") and err.count("\n") == 1, err


def test_an_old_export_needs_data_and_says_so(context, tmp_path, capsys):
    """An export without its dataset's files (written before exports carried them) still loads and samples with --data;
    without --data the one-line error names it."""
    old = context.data.parent / "model.safetensors"
    assert read_data_assets(old) is None
    model, _ = load_exported(old)
    assert sample_main(["--checkpoint", str(old), "--data", str(context.data), "--task", "t2m", "--prompt", "x",
                        "--steps", "1", "--out", str(tmp_path)]) == 0
    with pytest.raises(SystemExit) as exited:
        sample_main(["--checkpoint", str(old), "--task", "t2m", "--prompt", "x"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "exported without its dataset's files" in err and "pass --data" in err, err


def test_an_export_carries_its_datasets_files(context, tmp_path):
    """save_exported(data=...) puts the files inside the one .safetensors, byte for byte; the weights load unchanged."""
    out = save_exported(context.model, context.cfg, tmp_path / "m.safetensors", data=DataAssets.from_folder(context.data))
    assets = read_data_assets(out)
    assert assets is not None and set(assets.files) == {"dataset.json", "motion_stats.json", "null_text.pt"}
    assert all(assets.files[n] == (context.data / n).read_bytes() for n in assets.files)
    model, _ = load_exported(out)
    assert all(torch.equal(v, context.model.state_dict()[k]) for k, v in model.state_dict().items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "m.yaml"]


def test_docstring_example_uses_a_real_clip_id(context):
    """HuMoVe clip ids are hm-NNNNNN; the module's example used to pass `--clip heldout-00003`."""
    (example,) = re.findall(r"--task \w+ --clip (\S+)", echomotion.sample.__doc__)
    assert re.fullmatch(r"hm-\d{6}", example) and all(re.fullmatch(r"hm-\d{6}", c.clip_id) for c in context.clips("heldout"))
