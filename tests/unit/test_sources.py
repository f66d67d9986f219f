"""The data mixture (`data.sources`): proportions over an epoch, one shape per batch, the shorthand, kind checks, config
validation, and text padded on the device as collate used to pad it.

Resume of the mixture on two ranks in fresh processes is in tests/distributed/test_sources_dist.py.
"""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from echomotion.config import ConfigError, assets_root, data_sources, load_config
from echomotion.data.batch import Collate
from echomotion.data.dataset import Item
from echomotion.data.encoders import pad_text
from echomotion.data.errors import DataError
from echomotion.data.loader import build_dataloader
from echomotion.motion.smpl import MOTION_FEATURE_DIM
from tests.tiny_shards import MIXTURE, mixture_override, mixture_source, write_mixture

FAST = ["data.num_workers=0", "data.clean_stale_shm=false", "data.batch_size=4"]


@pytest.fixture(scope="module")
def mixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mixture")
    write_mixture(root)
    return root


def read_epoch(*overrides: str) -> list:
    _, loader = build_dataloader(load_config(None, [*FAST, *overrides]), rank=0, world_size=1)
    return list(loader)


def check_one_shape_per_batch(batches: list) -> None:
    for b in batches:
        names = {mixture_source(c) for c in b.clip_ids}
        assert len(names) == 1, f"batch mixes sources {names}"
        (name,) = names
        latent = MIXTURE[name][2]
        assert (b.video is None) if latent is None else (tuple(b.video.shape[1:]) == latent)


def test_weights_set_each_source_share_of_the_epoch(mixture: Path) -> None:
    weights, epoch = {"big": 6.0, "small": 1.0, "mo": 1.0}, 128
    batches = read_epoch(mixture_override(mixture, weights), f"data.epoch_size={epoch}")
    check_one_shape_per_batch(batches)
    seen = Counter(c for b in batches for c in b.clip_ids)
    per_source = Counter(mixture_source(c) for c in seen.elements())
    assert sum(per_source.values()) == epoch
    total = sum(weights.values())
    for name, w in weights.items():
        p = w / total
        expected, sigma = epoch * p, math.sqrt(epoch * p * (1 - p))
        assert abs(per_source[name] - expected) <= 4 * sigma, (name, per_source[name], expected)
        # Sampling without replacement where weights allow: every sample floor(r) or ceil(r) times, r = share / size.
        repeats = expected / MIXTURE[name][1]
        counts = [seen[f"{name}{i:04d}"] for i in range(MIXTURE[name][1])]
        assert set(counts) <= {math.floor(repeats), math.ceil(repeats)}, (name, counts)
    # The three sources interleave over the epoch rather than running one after another.
    order = [mixture_source(b.clip_ids[0]) for b in batches]
    assert sum(a != b for a, b in zip(order, order[1:])) > 3


def test_without_weights_every_sample_is_seen_once(mixture: Path) -> None:
    batches = read_epoch(mixture_override(mixture))
    check_one_shape_per_batch(batches)
    seen = Counter(c for b in batches for c in b.clip_ids)
    assert set(seen.values()) == {1}
    assert sorted(seen) == sorted(f"{name}{i:04d}" for name, (_, num, *_) in MIXTURE.items() for i in range(num))


def test_shorthand_expands_to_the_same_mixture(mixture: Path) -> None:
    shorthand = [f"data.path={mixture / 'big'}", f"data.motion_only_path={mixture / 'mo'}", "data.proportions=[3,1]"]
    listed = (f"data.sources=[{{path: {mixture / 'big'}, kind: paired, weight: 3}}, "
              f"{{path: {mixture / 'mo'}, kind: motion_only, weight: 1}}]")
    assert data_sources(load_config(None, shorthand).data) == data_sources(load_config(None, [listed]).data)
    assert [b.clip_ids for b in read_epoch(*shorthand)] == [b.clip_ids for b in read_epoch(listed)]


def test_stats_come_from_the_first_paired_source(mixture: Path) -> None:
    mo_first = load_config(None, [f"data.sources=[{{path: {mixture / 'mo'}, kind: motion_only}}, "
                                  f"{{path: {mixture / 'small'}/}}]"])
    assert assets_root(mo_first.data) == str(mixture / "small")
    only_motion = load_config(None, [f"data.motion_only_path={mixture / 'mo'}"])
    assert assets_root(only_motion.data) == str(mixture / "mo")


def test_a_sample_of_the_other_kind_names_its_source(mixture: Path) -> None:
    with pytest.raises(DataError, match=r"data.sources\[0\] .* is a paired source, but its sample mo0\d+ is motion_only"):
        read_epoch(f"data.sources=[{{path: {mixture / 'mo'}}}]")
    with pytest.raises(DataError, match=r"data.motion_only_path .* is a motion_only source, but its sample big"):
        read_epoch(f"data.motion_only_path={mixture / 'big'}")


@pytest.mark.parametrize("overrides, message", [
    (["data.sources=[{path: /a, kind: video}]"], "data.sources[0].kind='video': choose 'paired'"),
    (["data.sources=[{path: /a, weight: -1}, {path: /b, weight: 2}]"], "data.sources[0].weight=-1.0 is negative"),
    (["data.sources=[{path: /a}]", "data.path=/b"], "data.sources is given together with data.path"),
    (["data.sources=[{path: /a}]", "data.proportions=[1,1]"], "data.sources is given together with"),
    (["data.sources=[{path: /a, weight: 1}, {path: /b}]"], "some data sources have a weight and others not"),
    (["data.sources=[{path: /a, weight: 0}, {path: /b, weight: 0}]"], "are all 0"),
    (["data.sources=[{kind: paired}]"], "data.sources[0] has no path"),
    (["data.sources=[{path: /a}, {path: /a/, kind: motion_only}]"], "a data source is listed twice"),
    (["data.path=/a", "data.proportions=[1,1]"], "set both, or drop data.proportions"),
    (["data.path=/a", "data.motion_only_path=/b", "data.proportions=[1,1,1]"], "must be two weights"),
    (["data.sources=[{path: /a, wieght: 1}]"], "wieght"),
])
def test_bad_sources_are_refused_with_the_key_to_fix(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value)


def test_text_padded_on_the_device_equals_padding_each_prompt_to_text_len() -> None:
    """Collate keeps the batch's longest prompt; pad_text then gives the model exactly the [B, text_len, D] tensor
    that padding every prompt to text_len gave (a reference built element by element here)."""
    lengths, text_len, dim = [3, 6, 1], 10, 8
    items = [Item(f"c{i}", "c", None, torch.randn(4, MOTION_FEATURE_DIM), torch.randn(n, dim).half()) for i, n in enumerate(lengths)]
    reference = torch.zeros(len(items), text_len, dim)
    for i, it in enumerate(items):
        reference[i, : len(it.text)] = it.text.float()
    batch = Collate(text_len=text_len)(items)
    assert batch.text.shape == (3, 6, dim)
    on_device = pad_text(batch.text.to("cpu", torch.float32), text_len)
    assert on_device.dtype == torch.float32 and torch.equal(on_device, reference)
    short = pad_text(Collate(text_len=4)(items).text.float(), 4)  # truncation to a shorter text_len is unchanged too
    assert torch.equal(short, reference[:, :4])
