"""Schema v2's stored motion features: equal to what the SMPL columns give, and a training batch read from v2 shards
equals the one read from v1 shards (features computed on the fly), so the precomputation changes speed only."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from echomotion.config import load_config
from echomotion.data.schema import COLUMNS, SchemaError, decode_sample, encode_sample
from echomotion.data.shards import iter_records
from echomotion.data.loader import build_dataloader
from echomotion.motion.smpl import POS_SLICE, ROT_SLICE, SHAPE_SLICE, SMPLMotion
from tests.tiny_shards import tiny_sample, write_tiny_shards


def rot6d_rodrigues(aa: np.ndarray) -> np.ndarray:
    """Axis-angle [N, 3] -> the first two columns of its rotation matrix [N, 6], by Rodrigues' formula in float64 (an
    independent path from echomotion.motion.rotations)."""
    theta = np.linalg.norm(aa, axis=-1, keepdims=True)[..., None]
    k = aa / np.maximum(np.linalg.norm(aa, axis=-1, keepdims=True), 1e-12)
    skew = np.zeros((len(aa), 3, 3))
    skew[:, 0, 1], skew[:, 0, 2], skew[:, 1, 2] = -k[:, 2], k[:, 1], -k[:, 0]
    skew -= skew.transpose(0, 2, 1)
    r = np.eye(3) + np.sin(theta) * skew + (1 - np.cos(theta)) * skew @ skew
    return np.concatenate([r[:, :, 0], r[:, :, 1]], axis=-1)


def test_stored_features_are_the_smpl_columns_features(tmp_path: Path) -> None:
    write_tiny_shards(tmp_path, 3, latent_shape=None, frames=[5, 9, 17], with_stats=False)
    for rec in iter_records(tmp_path):
        x = rec["motion_features"]
        assert rec["schema_version"] == 2 and x.dtype == np.float32 and x.shape == (len(rec["transl"]), 235)
        smpl = ("betas", "global_orient", "body_pose", "transl", "joints")
        motion = SMPLMotion(*(torch.tensor(rec[k]) for k in smpl))
        assert np.array_equal(x, motion.to_features().numpy())
        pose = np.concatenate([rec["global_orient"][:, None], rec["global_orient"][:, None], rec["body_pose"]], axis=1)
        np.testing.assert_allclose(x[:, ROT_SLICE], rot6d_rodrigues(pose.reshape(-1, 3)).reshape(len(x), -1), atol=1e-5)
        positions = np.concatenate([rec["transl"], rec["joints"].reshape(len(x), -1)], axis=1)
        np.testing.assert_array_equal(x[:, POS_SLICE], positions)
        np.testing.assert_array_equal(x[:, SHAPE_SLICE], rec["betas"])


def write_v1(src: Path, out: Path) -> None:
    """Version 1 shards: `src`'s records without the motion_features column, and its motion stats."""
    from streaming import MDSWriter

    columns = {k: v for k, v in COLUMNS.items() if k != "motion_features"}
    with MDSWriter(out=str(out), columns=columns, size_limit=1 << 16) as w:
        for rec in iter_records(src):
            w.write({**{k: rec[k] for k in columns}, "schema_version": 1})
    (out / "motion_stats.json").write_bytes((src / "motion_stats.json").read_bytes())


def test_v2_batches_equal_v1_batches(tmp_path: Path) -> None:
    write_tiny_shards(tmp_path / "v2", 6, prefix="c", frames=list(range(9, 15)), latent_shape=(4, 3, 2, 2),
                      text_tokens=5, samples_per_shard=3)
    write_v1(tmp_path / "v2", tmp_path / "v1")
    assert all(r["schema_version"] == 1 and "motion_features" not in r for r in iter_records(tmp_path / "v1"))

    def batches(path: Path, workers: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        cfg = load_config(None, [f"data.path={path}", "data.batch_size=1", f"data.num_workers={workers}",
                                 "data.shuffle=false", "data.clean_stale_shm=false"])
        return {b.clip_ids[0]: (b.motion, b.motion_mask) for b in build_dataloader(cfg, rank=0, world_size=1)[1]}

    # v2 through a worker process too, which hands batches over as named shared-memory files (share_by_filename)
    v1, v2 = batches(tmp_path / "v1", 0), batches(tmp_path / "v2", 1)
    assert sorted(v1) == sorted(v2) == [f"c{i:04d}" for i in range(6)]
    for clip, (motion, mask) in v1.items():
        assert torch.equal(motion, v2[clip][0]) and torch.equal(mask, v2[clip][1])


def test_bad_features_and_unknown_versions_are_refused() -> None:
    rec = encode_sample(tiny_sample("x", frames=4, latent_shape=None, text_tokens=2, text_dim=8, seed=0))
    assert torch.equal(decode_sample(rec).features(), torch.from_numpy(rec["motion_features"]))
    with pytest.raises(SchemaError, match=r"motion_features has shape \[3, 235\], expected \[4, 235\]"):
        decode_sample({**rec, "motion_features": rec["motion_features"][:3]})
    with pytest.raises(SchemaError, match="schema_version 3; this code reads versions 1, 2"):
        decode_sample({**rec, "schema_version": 3})
