"""SMPL feature layout, forward kinematics (against a numpy brute force) and normalization stats."""

import json
import math
import pickle

import numpy as np
import pytest
import torch

from echomotion.motion import (
    JOINT_NAMES,
    MOTION_FEATURE_DIM,
    MOTION_TOKENS_PER_FRAME,
    NUM_JOINTS,
    POS_SLICE,
    ROT_SLICE,
    SHAPE_SLICE,
    SMPL_PARENTS,
    MotionStats,
    SMPLLayer,
    SMPLMotion,
    axis_angle_to_matrix,
    merge_features,
    split_features,
    write_synthetic_smpl_model,
)


@pytest.fixture(scope="module")
def smpl_pkl(tmp_path_factory):
    return write_synthetic_smpl_model(tmp_path_factory.mktemp("smpl") / "SMPL_SYNTH.pkl", seed=0)


@pytest.fixture(scope="module")
def smpl_data(smpl_pkl):
    with open(smpl_pkl, "rb") as f:
        return pickle.load(f)


def random_params(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    betas = torch.randn(n, 10, generator=g, dtype=torch.float64)
    global_orient = torch.randn(n, 3, generator=g, dtype=torch.float64)
    body_pose = torch.randn(n, 23, 3, generator=g, dtype=torch.float64) * 0.6
    transl = torch.randn(n, 3, generator=g, dtype=torch.float64)
    return betas, global_orient, body_pose, transl


def np_rodrigues(aa: np.ndarray) -> np.ndarray:
    t = np.linalg.norm(aa)
    if t < 1e-12:
        return np.eye(3)
    k = aa / t
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(t) * kx + (1 - math.cos(t)) * kx @ kx


def brute_force_joints(data: dict, betas, global_orient, body_pose, transl) -> np.ndarray:
    """SMPL joints by the textbook chain in float64, frame by frame, joint by joint."""
    v_template = data["v_template"].astype(np.float64)
    shapedirs = data["shapedirs"].astype(np.float64)
    regressor = data["J_regressor"].astype(np.float64)
    parents = [-1] + [int(p) for p in data["kintree_table"][0][1:]]
    out = np.zeros((len(betas), 24, 3))
    for f in range(len(betas)):
        rest = regressor @ (v_template + shapedirs @ betas[f])
        pose = np.concatenate([global_orient[f][None], body_pose[f]], 0)
        world = []
        for i in range(24):
            local = np.eye(4)
            local[:3, :3] = np_rodrigues(pose[i])
            local[:3, 3] = rest[i] - (rest[parents[i]] if parents[i] >= 0 else 0)
            world.append(local if parents[i] < 0 else world[parents[i]] @ local)
            out[f, i] = world[i][:3, 3] + transl[f]
    return out


def make_motion(n: int = 7, seed: int = 0) -> SMPLMotion:
    betas, go, bp, tr = random_params(n, seed)
    joints = torch.randn(n, 24, 3, generator=torch.Generator().manual_seed(seed + 100), dtype=torch.float64)
    return SMPLMotion(betas, go, bp, tr, joints, fps=16.0)


# ---- constants and layout ----------------------------------------------------------------------------------

def test_layout_constants():
    assert (POS_SLICE, ROT_SLICE, SHAPE_SLICE) == (slice(0, 75), slice(75, 225), slice(225, 235))
    assert MOTION_FEATURE_DIM == 235 and MOTION_TOKENS_PER_FRAME == 51
    assert len(SMPL_PARENTS) == len(JOINT_NAMES) == NUM_JOINTS == 24
    assert all(p < i for i, p in enumerate(SMPL_PARENTS)) and SMPL_PARENTS[0] == -1
    assert JOINT_NAMES[0] == "pelvis" and JOINT_NAMES[15] == "head" and JOINT_NAMES[23] == "right_hand"


def first_two_columns(aa: torch.Tensor) -> torch.Tensor:
    r = torch.linalg.matrix_exp(torch.stack(
        [torch.zeros_like(aa[..., 0]), -aa[..., 2], aa[..., 1],
         aa[..., 2], torch.zeros_like(aa[..., 0]), -aa[..., 0],
         -aa[..., 1], aa[..., 0], torch.zeros_like(aa[..., 0])], -1).reshape(*aa.shape[:-1], 3, 3))
    return torch.cat([r[..., :, 0], r[..., :, 1]], -1)


def test_to_features_packs_the_documented_layout():
    m = make_motion()
    x = m.to_features()
    assert x.shape == (7, 235) and x.dtype == torch.float64
    torch.testing.assert_close(x[:, 0:3], m.transl)
    torch.testing.assert_close(x[:, 3:75].reshape(7, 24, 3), m.joints)
    gamma = first_two_columns(m.global_orient)
    torch.testing.assert_close(x[:, 75:81], gamma)
    torch.testing.assert_close(x[:, 81:87], gamma)  # theta_0: the pelvis duplicates gamma
    torch.testing.assert_close(x[:, 87:225].reshape(7, 23, 6), first_two_columns(m.body_pose))
    torch.testing.assert_close(x[:, 225:235], m.betas)


def test_from_features_round_trip_and_gamma_is_canonical():
    m = make_motion()
    x = m.to_features()
    x[:, 81:87] = torch.randn(7, 6, dtype=torch.float64)  # a disagreeing theta_0 must be ignored
    back = SMPLMotion.from_features(x, fps=16.0)
    for name in ("betas", "transl", "joints"):
        torch.testing.assert_close(getattr(back, name), getattr(m, name))
    torch.testing.assert_close(axis_angle_to_matrix(back.global_orient), axis_angle_to_matrix(m.global_orient))
    torch.testing.assert_close(axis_angle_to_matrix(back.body_pose), axis_angle_to_matrix(m.body_pose))
    assert back.num_frames == 7 and back.fps == 16.0
    torch.testing.assert_close(back.to_features()[:, 75:81], x[:, 75:81])


def test_split_merge_features_with_leading_dims():
    x = torch.randn(2, 3, 235)
    pos, rot, shape = split_features(x)
    assert pos.shape == (2, 3, 25, 3) and rot.shape == (2, 3, 25, 6) and shape.shape == (2, 3, 1, 10)
    assert torch.equal(merge_features(pos, rot, shape), x)
    with pytest.raises(ValueError, match="MOTION_FEATURE_DIM=235"):
        split_features(torch.zeros(4, 234))


def test_motion_validates_shapes_and_accepts_flat_body_pose():
    m = make_motion(3)
    flat = SMPLMotion(m.betas, m.global_orient, m.body_pose.reshape(3, 69), m.transl, m.joints)
    assert flat.body_pose.shape == (3, 23, 3)
    with pytest.raises(ValueError, match=r"betas: expected \[3, 10\], got \[10\]"):
        SMPLMotion(m.betas[0], m.global_orient, m.body_pose, m.transl, m.joints)


def test_npz_round_trip(tmp_path):
    m = make_motion()
    path = tmp_path / "clip.motion"  # any name: nothing is appended
    m.to_npz(path)
    assert path.exists()
    with np.load(path) as data:
        assert sorted(data.files) == sorted(["betas", "global_orient", "body_pose", "transl", "joints", "fps"])
    back = SMPLMotion.from_npz(path)
    for name in ("betas", "global_orient", "body_pose", "transl", "joints"):
        assert torch.equal(getattr(back, name), getattr(m, name))
    assert back.fps == 16.0
    SMPLMotion(m.betas, m.global_orient, m.body_pose, m.transl, m.joints).to_npz(path)
    assert SMPLMotion.from_npz(path).fps is None


def test_npz_missing_keys_are_listed(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, betas=np.zeros((2, 10)), global_orient=np.zeros((2, 3)), body_pose=np.zeros((2, 23, 3)))
    with pytest.raises(ValueError, match=r"lacks SMPL motion keys \['transl', 'joints'\]"):
        SMPLMotion.from_npz(path)


# ---- the synthetic model and forward kinematics -------------------------------------------------------------

def test_synthetic_model_is_smpl_shaped_and_deterministic(smpl_pkl, smpl_data, tmp_path):
    d = smpl_data
    assert d["v_template"].shape == (6890, 3) and d["shapedirs"].shape == (6890, 3, 10)
    assert d["posedirs"].shape == (6890, 3, 207) and d["J_regressor"].shape == (24, 6890)
    assert d["weights"].shape == (6890, 24) and d["kintree_table"].shape == (2, 24) and d["f"].shape[1] == 3
    np.testing.assert_allclose(d["J_regressor"].sum(1), 1, atol=1e-5)
    np.testing.assert_allclose(d["weights"].sum(1), 1, atol=1e-6)
    assert d["kintree_table"][0, 0] == 4294967295 and list(d["kintree_table"][0, 1:]) == list(SMPL_PARENTS[1:])
    assert 1.6 < d["v_template"][:, 1].max() - d["v_template"][:, 1].min() < 1.9  # a person-sized height
    again = write_synthetic_smpl_model(tmp_path / "again.pkl", seed=0)
    assert again.read_bytes() == smpl_pkl.read_bytes()
    other = pickle.loads(write_synthetic_smpl_model(tmp_path / "other.pkl", seed=1).read_bytes())
    assert not np.array_equal(other["v_template"], d["v_template"])


# smplx's Rodrigues adds 1e-8 to the rotation vector before taking its norm, so even float64 agrees to ~1e-8 only.
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-7)])
def test_fk_matches_brute_force_chain(smpl_pkl, smpl_data, dtype, tol):
    betas, go, bp, tr = random_params(6, seed=1)
    layer = SMPLLayer(smpl_pkl, chunk_size=4, dtype=dtype)  # 6 frames: two chunks
    joints = layer.joints(betas, go, bp, tr)
    assert joints.shape == (6, 24, 3) and joints.dtype == dtype
    expected = brute_force_joints(smpl_data, betas.numpy(), go.numpy(), bp.numpy(), tr.numpy())
    np.testing.assert_allclose(joints.double().numpy(), expected, atol=tol, rtol=0)


def test_fk_shared_betas_and_default_transl(smpl_pkl, smpl_data):
    betas, go, bp, _ = random_params(3, seed=2)
    layer = SMPLLayer(smpl_pkl, dtype=torch.float64)
    joints = layer.joints(betas[0], go, bp.reshape(3, 69))
    expected = brute_force_joints(smpl_data, betas[[0, 0, 0]].numpy(), go.numpy(), bp.numpy(), np.zeros((3, 3)))
    np.testing.assert_allclose(joints.numpy(), expected, atol=1e-7, rtol=0)


def test_vertices_at_rest_are_the_template(smpl_pkl, smpl_data):
    layer = SMPLLayer(smpl_pkl)
    transl = torch.tensor([[0.5, -1.0, 2.0]])
    verts = layer.vertices(torch.zeros(1, 10), torch.zeros(1, 3), torch.zeros(1, 23, 3), transl)
    assert verts.shape == (1, 6890, 3)
    np.testing.assert_allclose(verts[0].numpy(), smpl_data["v_template"] + transl.numpy(), atol=1e-6)
    assert layer.faces.shape == (len(smpl_data["f"]), 3) and layer.faces.dtype == torch.int64


def test_from_params_builds_a_consistent_motion(smpl_pkl):
    betas, go, bp, tr = random_params(4, seed=3)
    layer = SMPLLayer(smpl_pkl, dtype=torch.float64)
    m = SMPLMotion.from_params(layer, betas, go, bp, tr, fps=24.0)
    torch.testing.assert_close(m.joints, layer.joints(betas, go, bp, tr))
    assert m.fps == 24.0 and m.to_features().shape == (4, 235)


def test_missing_or_wrong_model_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="motion.smpl_model_path"):
        SMPLLayer(tmp_path / "nope.pkl")
    with pytest.raises(FileNotFoundError, match="directory"):
        SMPLLayer(tmp_path)
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(pickle.dumps({"v_template": np.zeros((3, 3))}))
    with pytest.raises(ValueError, match="missing keys"):
        SMPLLayer(bad)


def test_fk_input_shape_error(smpl_pkl):
    layer = SMPLLayer(smpl_pkl)
    with pytest.raises(ValueError, match="body_pose"):
        layer.joints(torch.zeros(2, 10), torch.zeros(2, 3), torch.zeros(2, 22, 3))


# ---- normalization statistics -------------------------------------------------------------------------------

def random_chunks(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(235, generator=g, dtype=torch.float64) * 5 + 0.1
    offset = torch.randn(235, generator=g, dtype=torch.float64) * 1e3  # a large mean tests the stable merge
    chunks = [torch.randn(n, 235, generator=g, dtype=torch.float64) * scale + offset for n in (1, 17, 50, 3, 90)]
    for c in chunks:
        c[:, 225:235] = 0.25  # constant dims, like a fixed shape
    return chunks


def test_stats_match_the_concatenation():
    chunks = random_chunks()
    stats = MotionStats.compute(c.numpy() if i % 2 else c for i, c in enumerate(chunks))  # streamed, mixed types
    full = torch.cat(chunks)
    assert stats.count == 161 and stats.feature_dim == 235
    torch.testing.assert_close(stats.mean, full.mean(0), atol=1e-10, rtol=0)
    torch.testing.assert_close(stats.std[:225], full.std(0, correction=0)[:225], atol=1e-10, rtol=0)
    assert torch.equal(stats.std[225:], torch.full((10,), 1e-2, dtype=torch.float64))  # the floor


def test_normalize_denormalize():
    chunks = random_chunks(1)
    stats = MotionStats.compute(chunks, min_std=0.05)
    full = torch.cat(chunks)
    z = stats.normalize(full)
    torch.testing.assert_close(z.mean(0), torch.zeros(235, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(z[:, :225].std(0, correction=0), torch.ones(225, dtype=torch.float64))
    assert torch.equal(z[:, 225:], torch.zeros(161, 10, dtype=torch.float64))
    torch.testing.assert_close(stats.denormalize(z), full)
    assert stats.normalize(full[:4].float()).dtype == torch.float32
    with pytest.raises(ValueError, match="last dim 10"):
        stats.normalize(torch.zeros(2, 10))


def test_stats_save_load_and_mismatch(tmp_path):
    stats = MotionStats.compute(random_chunks(2))
    path = tmp_path / "stats.json"
    stats.save(path)
    meta = json.loads(path.read_text())
    assert meta["version"] == 1 and meta["feature_dim"] == 235 and meta["count"] == 161
    back = MotionStats.load(path)
    assert torch.equal(back.mean, stats.mean) and torch.equal(back.std, stats.std) and back.count == 161
    with pytest.raises(ValueError, match="feature_dim 235.*expected 100"):
        MotionStats.load(path, feature_dim=100)


def test_stats_rejects_bad_input():
    with pytest.raises(ValueError, match="no frames"):
        MotionStats.compute([])
    with pytest.raises(ValueError, match="chunk 1 contains NaN"):
        MotionStats.compute([torch.zeros(2, 235), torch.full((2, 235), float("nan"))])
    with pytest.raises(ValueError, match="chunk 1 has feature dim 5"):
        MotionStats.compute([torch.zeros(2, 235), torch.zeros(2, 5)])
