"""Per-frame SMPL motion, the model's 235-D motion feature layout, SMPL forward kinematics and
feature normalization statistics.

Feature layout per frame (a contract with the model's motion tokenizer; EchoMotion's 51 tokens):

    [  0: 75]  25 position tokens x 3: token 0 = root translation `transl`, tokens 1..24 = joints
    [ 75:225]  25 rotation tokens x 6 (6D): token 0 = global orientation gamma,
               tokens 1..24 = theta, SMPL's full 24-joint pose, whose joint 0 (pelvis) is gamma again
    [225:235]  betas (10), the single shape token

theta keeps the pelvis so that it is the paper's 24 x 6 (gamma is duplicated, "pelvis duplication").
"""

from __future__ import annotations

import json
import math
import pickle
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import smplx
import torch
from smplx.utils import Struct

from .rotations import axis_angle_to_rot6d, rot6d_to_axis_angle

__all__ = [
    "NUM_JOINTS",
    "NUM_BODY_JOINTS",
    "NUM_BETAS",
    "NUM_VERTICES",
    "SMPL_PARENTS",
    "JOINT_NAMES",
    "POS_DIM",
    "ROT_DIM",
    "SHAPE_DIM",
    "NUM_POS_TOKENS",
    "NUM_ROT_TOKENS",
    "NUM_SHAPE_TOKENS",
    "MOTION_TOKENS_PER_FRAME",
    "MOTION_FEATURE_DIM",
    "POS_SLICE",
    "ROT_SLICE",
    "SHAPE_SLICE",
    "split_features",
    "merge_features",
    "SMPLMotion",
    "SMPLLayer",
    "write_synthetic_smpl_model",
    "MotionStats",
]

NUM_JOINTS = 24
NUM_BODY_JOINTS = NUM_JOINTS - 1  # SMPL's body_pose excludes the pelvis (global_orient)
NUM_BETAS = 10
NUM_VERTICES = 6890
SMPL_PARENTS: tuple[int, ...] = (
    -1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19, 20, 21,
)
JOINT_NAMES: tuple[str, ...] = (
    "pelvis", "left_hip", "right_hip", "spine1", "left_knee", "right_knee", "spine2",
    "left_ankle", "right_ankle", "spine3", "left_foot", "right_foot", "neck", "left_collar",
    "right_collar", "head", "left_shoulder", "right_shoulder", "left_elbow", "right_elbow",
    "left_wrist", "right_wrist", "left_hand", "right_hand",
)

POS_DIM, ROT_DIM, SHAPE_DIM = 3, 6, NUM_BETAS
NUM_POS_TOKENS = 1 + NUM_JOINTS  # transl + joints
NUM_ROT_TOKENS = 1 + NUM_JOINTS  # gamma + theta (theta_0 duplicates gamma)
NUM_SHAPE_TOKENS = 1
MOTION_TOKENS_PER_FRAME = NUM_POS_TOKENS + NUM_ROT_TOKENS + NUM_SHAPE_TOKENS  # 51
POS_SLICE = slice(0, NUM_POS_TOKENS * POS_DIM)  # 0:75
ROT_SLICE = slice(POS_SLICE.stop, POS_SLICE.stop + NUM_ROT_TOKENS * ROT_DIM)  # 75:225
SHAPE_SLICE = slice(ROT_SLICE.stop, ROT_SLICE.stop + NUM_SHAPE_TOKENS * SHAPE_DIM)  # 225:235
MOTION_FEATURE_DIM = SHAPE_SLICE.stop  # 235

ArrayLike = torch.Tensor | np.ndarray

_NPZ_KEYS = ("betas", "global_orient", "body_pose", "transl", "joints")
SMPL_PKL_KEYS = ("v_template", "shapedirs", "posedirs", "J_regressor", "weights", "kintree_table", "f")


def _check_feature_dim(x: torch.Tensor, what: str) -> None:
    if x.shape[-1] != MOTION_FEATURE_DIM:
        raise ValueError(
            f"{what} must have last dim MOTION_FEATURE_DIM={MOTION_FEATURE_DIM}, got shape {tuple(x.shape)}"
        )


def split_features(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[..., 235] -> position [..., 25, 3], rotation [..., 25, 6], shape [..., 1, 10] token groups."""
    _check_feature_dim(x, "motion features")
    lead = x.shape[:-1]
    return (
        x[..., POS_SLICE].reshape(*lead, NUM_POS_TOKENS, POS_DIM),
        x[..., ROT_SLICE].reshape(*lead, NUM_ROT_TOKENS, ROT_DIM),
        x[..., SHAPE_SLICE].reshape(*lead, NUM_SHAPE_TOKENS, SHAPE_DIM),
    )


def merge_features(pos: torch.Tensor, rot: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """Inverse of split_features: the three token groups -> [..., 235]."""
    lead = pos.shape[:-2]
    return torch.cat([pos.reshape(*lead, -1), rot.reshape(*lead, -1), shape.reshape(*lead, -1)], dim=-1)


def _as_tensor(x: ArrayLike) -> torch.Tensor:
    return x if torch.is_tensor(x) else torch.from_numpy(np.asarray(x))


@dataclass
class SMPLMotion:
    """One clip of per-frame SMPL parameters plus the joint positions (eta) the model also predicts.

    betas [F,10], global_orient [F,3] and body_pose [F,23,3] (axis-angle; [F,69] is accepted),
    transl [F,3], joints [F,24,3] (posed joints including transl, e.g. from SMPLLayer.joints).
    """

    betas: torch.Tensor
    global_orient: torch.Tensor
    body_pose: torch.Tensor
    transl: torch.Tensor
    joints: torch.Tensor
    fps: float | None = None

    def __post_init__(self) -> None:
        for name in _NPZ_KEYS:
            setattr(self, name, _as_tensor(getattr(self, name)))
        if self.body_pose.dim() == 2 and self.body_pose.shape[-1] == NUM_BODY_JOINTS * 3:
            self.body_pose = self.body_pose.reshape(-1, NUM_BODY_JOINTS, 3)
        n = self.global_orient.shape[0] if self.global_orient.dim() > 0 else -1
        expected = {
            "betas": (n, NUM_BETAS),
            "global_orient": (n, 3),
            "body_pose": (n, NUM_BODY_JOINTS, 3),
            "transl": (n, 3),
            "joints": (n, NUM_JOINTS, 3),
        }
        bad = [
            f"{k}: expected {list(v)}, got {list(getattr(self, k).shape)}"
            for k, v in expected.items()
            if tuple(getattr(self, k).shape) != v
        ]
        if bad:
            raise ValueError(
                "SMPLMotion fields must all have the same frame count F (from global_orient); "
                + "; ".join(bad)
                + ". Expand a per-clip betas [10] to [F,10] before building the motion."
            )

    @property
    def num_frames(self) -> int:
        return self.global_orient.shape[0]

    def to_features(self) -> torch.Tensor:
        """Pack into the [F,235] feature layout (see module docstring)."""
        pos = torch.cat([self.transl[:, None], self.joints], dim=1)
        full_pose = torch.cat([self.global_orient[:, None], self.body_pose], dim=1)  # theta, [F,24,3]
        rot = axis_angle_to_rot6d(torch.cat([self.global_orient[:, None], full_pose], dim=1))
        dtype = torch.promote_types(pos.dtype, rot.dtype)
        return merge_features(pos.to(dtype), rot.to(dtype), self.betas[:, None].to(dtype))

    @classmethod
    def from_features(cls, x: torch.Tensor, fps: float | None = None) -> "SMPLMotion":
        """Unpack [F,235]; any 6D vector decodes to a valid rotation.

        The global orientation is read from the gamma token only: the decoder predicts both gamma and
        theta_0, which may disagree slightly, and gamma is the canonical one. theta_0 is ignored.
        """
        if x.dim() != 2:
            raise ValueError(f"from_features expects [F,{MOTION_FEATURE_DIM}] for one clip, got {tuple(x.shape)}")
        pos, rot, shape = split_features(x)
        aa = rot6d_to_axis_angle(rot)
        return cls(
            betas=shape[:, 0],
            global_orient=aa[:, 0],
            body_pose=aa[:, 2:],
            transl=pos[:, 0],
            joints=pos[:, 1:],
            fps=fps,
        )

    @classmethod
    def from_params(
        cls,
        layer: "SMPLLayer",
        betas: ArrayLike,
        global_orient: ArrayLike,
        body_pose: ArrayLike,
        transl: ArrayLike,
        fps: float | None = None,
    ) -> "SMPLMotion":
        """Build a motion from SMPL parameters, computing the joints by forward kinematics."""
        joints = layer.joints(betas, global_orient, body_pose, transl)
        betas = _as_tensor(betas)
        if betas.dim() == 1:
            betas = betas.expand(joints.shape[0], -1)
        return cls(betas, global_orient, body_pose, transl, joints.to(_as_tensor(transl).dtype), fps)

    def to_npz(self, path: str | Path) -> None:
        """Write the keys betas, global_orient, body_pose, transl, joints (and fps if set)."""
        arrays = {k: getattr(self, k).detach().cpu().numpy() for k in _NPZ_KEYS}
        if self.fps is not None:
            arrays["fps"] = np.asarray(self.fps, dtype=np.float64)
        with open(path, "wb") as f:  # a file handle stops numpy from appending ".npz" to the name
            np.savez(f, **arrays)

    @classmethod
    def from_npz(cls, path: str | Path) -> "SMPLMotion":
        with np.load(path) as data:
            missing = [k for k in _NPZ_KEYS if k not in data.files]
            if missing:
                raise ValueError(
                    f"{path} lacks SMPL motion keys {missing} (has {sorted(data.files)}); an SMPL motion "
                    f".npz needs {list(_NPZ_KEYS)} and optionally fps. Joints can be computed with "
                    "SMPLMotion.from_params(SMPLLayer(path_to_smpl_pkl), ...)."
                )
            fps = float(data["fps"]) if "fps" in data.files else None
            return cls(*(torch.from_numpy(data[k]) for k in _NPZ_KEYS), fps=fps)


class SMPLLayer:
    """SMPL forward kinematics (joints, vertices) through smplx, evaluated in frame chunks.

    Deliberately not an nn.Module: attached to a model, smplx's buffers would copy the licensed SMPL
    arrays into every checkpoint. Move it with .to(device).
    """

    def __init__(self, model_path: str | Path, *, chunk_size: int = 256, dtype: torch.dtype = torch.float32):
        path = Path(model_path).expanduser()
        if not path.is_file():
            what = "is a directory, not the .pkl file" if path.is_dir() else "does not exist"
            raise FileNotFoundError(
                f"SMPL model file {str(path)!r} {what}. Set the config key `motion.smpl_model_path` to an "
                "SMPL .pkl (e.g. SMPL_NEUTRAL.pkl from https://smpl.is.tue.mpg.de); for tests and demos, "
                "echomotion.motion.write_synthetic_smpl_model(path) writes a stand-in."
            )
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        try:
            with open(path, "rb") as f:
                data = pickle.load(f, encoding="latin1")
        except ModuleNotFoundError as e:
            if e.name != "chumpy":
                raise
            raise RuntimeError(
                f"{path} stores chumpy arrays (the original SMPL release does). Re-save it with plain "
                "numpy arrays: load it once where chumpy is installed, apply np.asarray to every value "
                "(scipy sparse J_regressor: .toarray()), and pickle the dict again."
            ) from e
        missing = [k for k in SMPL_PKL_KEYS if k not in data]
        if missing:
            raise ValueError(
                f"{path} is not an SMPL model pickle: missing keys {missing} (needs {list(SMPL_PKL_KEYS)})"
            )
        self.model_path = path
        self.chunk_size = chunk_size
        self.dtype = dtype
        self._smpl = smplx.SMPL(
            model_path=str(path),
            data_struct=Struct(**data),
            num_betas=NUM_BETAS,
            create_betas=False,
            create_global_orient=False,
            create_body_pose=False,
            create_transl=False,
            dtype=dtype,
        ).eval()

    @property
    def device(self) -> torch.device:
        return self._smpl.v_template.device

    @property
    def faces(self) -> torch.Tensor:
        """Triangle indices [num_faces, 3] (int64)."""
        return self._smpl.faces_tensor

    def to(self, device: torch.device | str) -> "SMPLLayer":
        self._smpl.to(device)
        return self

    def joints(
        self, betas: ArrayLike, global_orient: ArrayLike, body_pose: ArrayLike, transl: ArrayLike | None = None
    ) -> torch.Tensor:
        """The 24 posed SMPL joints [F,24,3], transl included (smplx's extra vertex joints dropped)."""
        return self._run(betas, global_orient, body_pose, transl, vertices=False)

    def vertices(
        self, betas: ArrayLike, global_orient: ArrayLike, body_pose: ArrayLike, transl: ArrayLike | None = None
    ) -> torch.Tensor:
        """Posed mesh vertices [F,6890,3], transl included."""
        return self._run(betas, global_orient, body_pose, transl, vertices=True)

    def _run(
        self, betas: ArrayLike, global_orient: ArrayLike, body_pose: ArrayLike, transl: ArrayLike | None, *,
        vertices: bool,
    ) -> torch.Tensor:
        kw = {"device": self.device, "dtype": self.dtype}
        global_orient = _as_tensor(global_orient).to(**kw)
        if global_orient.dim() != 2 or global_orient.shape[-1] != 3:
            raise ValueError(f"global_orient must be [F,3] axis-angle, got {tuple(global_orient.shape)}")
        n = global_orient.shape[0]
        body_pose = _as_tensor(body_pose).to(**kw)
        body_pose = body_pose.flatten(1) if body_pose.dim() >= 2 else body_pose
        betas = _as_tensor(betas).to(**kw)
        betas = betas.expand(n, -1) if betas.dim() == 1 else betas
        transl = torch.zeros(n, 3, **kw) if transl is None else _as_tensor(transl).to(**kw)
        if body_pose.shape != (n, NUM_BODY_JOINTS * 3) or betas.shape != (n, NUM_BETAS) or transl.shape != (n, 3):
            raise ValueError(
                f"expected betas [F,{NUM_BETAS}] or [{NUM_BETAS}], body_pose [F,{NUM_BODY_JOINTS},3], transl [F,3] "
                f"with F={n}; got betas {tuple(betas.shape)}, body_pose {tuple(body_pose.shape)}, "
                f"transl {tuple(transl.shape)}"
            )
        out = []
        for s in range(0, n, self.chunk_size):
            e = s + self.chunk_size
            res = self._smpl(
                betas=betas[s:e], global_orient=global_orient[s:e], body_pose=body_pose[s:e],
                transl=transl[s:e], return_verts=vertices,
            )
            out.append(res.vertices if vertices else res.joints[:, :NUM_JOINTS])
        if not out:
            return torch.zeros(0, NUM_VERTICES if vertices else NUM_JOINTS, 3, **kw)
        return torch.cat(out)


# A rough T-pose of the 24 SMPL joints (metres, y up, body facing +z, left = +x), with the radius of
# the vertex blob around each joint; the head blob reaches ~1.7 m.
_TPOSE = np.array([
    [0.00, 0.93, 0.00], [0.09, 0.84, 0.00], [-0.09, 0.84, 0.00], [0.00, 1.03, -0.01],
    [0.10, 0.48, 0.01], [-0.10, 0.48, 0.01], [0.00, 1.16, 0.00], [0.10, 0.08, -0.02],
    [-0.10, 0.08, -0.02], [0.00, 1.22, 0.01], [0.11, 0.02, 0.10], [-0.11, 0.02, 0.10],
    [0.00, 1.44, -0.01], [0.08, 1.36, -0.01], [-0.08, 1.36, -0.01], [0.00, 1.58, 0.02],
    [0.18, 1.40, -0.02], [-0.18, 1.40, -0.02], [0.44, 1.40, -0.03], [-0.44, 1.40, -0.03],
    [0.70, 1.40, -0.03], [-0.70, 1.40, -0.03], [0.79, 1.40, -0.03], [-0.79, 1.40, -0.03],
], dtype=np.float64)
_BLOB_RADIUS = np.array([
    0.10, 0.07, 0.07, 0.10, 0.05, 0.05, 0.10, 0.04, 0.04, 0.10, 0.04, 0.04,
    0.05, 0.05, 0.05, 0.09, 0.05, 0.05, 0.04, 0.04, 0.03, 0.03, 0.03, 0.03,
])


def write_synthetic_smpl_model(path: str | Path, seed: int = 0) -> Path:
    """Write a deterministic, SMPL-format stand-in pickle that smplx loads like the real model.

    The real SMPL file is licensed and cannot ship with the project; tests and demos use this one.
    It has SMPL's 6890 vertices (smplx selects extra joints by vertex id), the real kinematic tree,
    one vertex blob per joint whose mean is that joint's T-pose position (J_regressor averages the
    blob), skinning mostly to the own joint, and small shape/pose blend shapes.
    """
    rng = np.random.default_rng(seed)
    clusters = np.array_split(np.arange(NUM_VERTICES), NUM_JOINTS)
    owner = np.empty(NUM_VERTICES, dtype=np.int64)
    v_template = np.empty((NUM_VERTICES, 3))
    j_regressor = np.zeros((NUM_JOINTS, NUM_VERTICES))
    faces = []
    for j, ids in enumerate(clusters):
        owner[ids] = j
        blob = rng.normal(size=(len(ids), 3)) * _BLOB_RADIUS[j] / 2
        v_template[ids] = _TPOSE[j] + blob - blob.mean(0)
        j_regressor[j, ids] = 1.0 / len(ids)
        faces.append(np.stack([ids[:-2], ids[1:-1], ids[2:]], axis=1))

    weights = np.zeros((NUM_VERTICES, NUM_JOINTS))
    weights[np.arange(NUM_VERTICES), owner] = 0.8
    parent_of_owner = np.array(SMPL_PARENTS)[owner]
    has_parent = parent_of_owner >= 0
    weights[np.flatnonzero(has_parent), parent_of_owner[has_parent]] += 0.2
    weights[~has_parent, 0] = 1.0

    # Shape space: beta_0 stretches the body vertically (~3 % per unit); the rest move whole blobs.
    shapedirs = np.empty((NUM_VERTICES, 3, NUM_BETAS))
    shapedirs[:, :, 0] = v_template * np.array([0.0, 0.03, 0.0])
    blob_shift = rng.normal(scale=0.01, size=(NUM_JOINTS, 3, NUM_BETAS - 1))
    shapedirs[:, :, 1:] = blob_shift[owner] + rng.normal(scale=0.002, size=(NUM_VERTICES, 3, NUM_BETAS - 1))
    posedirs = rng.normal(scale=1e-3, size=(NUM_VERTICES, 3, NUM_BODY_JOINTS * 9))

    kintree = np.stack([np.array(SMPL_PARENTS, dtype=np.int64), np.arange(NUM_JOINTS)])
    kintree[0, 0] = 4294967295  # SMPL's "no parent" (uint32 -1)
    model = {
        "v_template": v_template.astype(np.float32),
        "shapedirs": shapedirs.astype(np.float32),
        "posedirs": posedirs.astype(np.float32),
        "J_regressor": j_regressor.astype(np.float32),
        "weights": weights.astype(np.float32),
        "kintree_table": kintree,
        "f": np.concatenate(faces).astype(np.uint32),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(model, f, protocol=pickle.HIGHEST_PROTOCOL)
    return path


@dataclass
class MotionStats:
    """Per-dimension mean/std of motion features, for normalizing the diffusion target.

    std is the population std floored at min_std: constant dims (e.g. fixed betas) would otherwise
    divide by ~0 and blow up the normalized features.
    """

    mean: torch.Tensor
    std: torch.Tensor
    count: int
    min_std: float = 1e-2

    VERSION = 1

    @property
    def feature_dim(self) -> int:
        return self.mean.shape[0]

    @classmethod
    def compute(cls, chunks: Iterable[ArrayLike], min_std: float = 1e-2) -> "MotionStats":
        """Stream over [..., D] chunks (e.g. one clip each) with Chan et al.'s parallel merge in float64."""
        if not min_std > 0:
            raise ValueError(f"min_std must be > 0, got {min_std}")
        n, mean, m2 = 0, None, None
        for i, chunk in enumerate(chunks):
            x = _as_tensor(chunk).detach().to("cpu", torch.float64)
            x = x.reshape(-1, x.shape[-1])
            if mean is not None and x.shape[1] != mean.shape[0]:
                raise ValueError(f"chunk {i} has feature dim {x.shape[1]}, earlier chunks had {mean.shape[0]}")
            if not torch.isfinite(x).all():
                raise ValueError(f"chunk {i} contains NaN or inf; clean the data before computing stats")
            nb = x.shape[0]
            if nb == 0:
                continue
            mean_b = x.mean(0)
            m2_b = ((x - mean_b) ** 2).sum(0)
            if mean is None:
                n, mean, m2 = nb, mean_b, m2_b
                continue
            total = n + nb
            delta = mean_b - mean
            mean = mean + delta * (nb / total)
            m2 = m2 + m2_b + delta**2 * (n * nb / total)
            n = total
        if mean is None:
            raise ValueError("MotionStats.compute got no frames; pass a non-empty iterable of [F, D] features")
        std = torch.sqrt(m2 / n).clamp_min(min_std)
        return cls(mean=mean, std=std, count=n, min_std=min_std)

    def _check(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.feature_dim:
            raise ValueError(f"features have last dim {x.shape[-1]}, these stats are for {self.feature_dim}")

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return (x - self.mean.to(x)) / self.std.to(x)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return x * self.std.to(x) + self.mean.to(x)

    def save(self, path: str | Path) -> None:
        payload = {
            "version": self.VERSION,
            "feature_dim": self.feature_dim,
            "count": self.count,
            "min_std": self.min_std,
            "mean": self.mean.double().tolist(),
            "std": self.std.double().tolist(),
        }
        Path(path).write_text(json.dumps(payload))

    @classmethod
    def load(cls, path: str | Path, feature_dim: int = MOTION_FEATURE_DIM) -> "MotionStats":
        """Load stats saved by save(); feature_dim is what the caller's model expects."""
        return cls.from_json(Path(path).read_text(), str(path), feature_dim)

    @classmethod
    def from_json(cls, text: str, source: str, feature_dim: int = MOTION_FEATURE_DIM) -> "MotionStats":
        """What save() wrote, from wherever it is kept (a file, an export); `source` names it in errors."""
        d = json.loads(text)
        if d.get("version") != cls.VERSION:
            raise ValueError(f"{source}: motion stats version {d.get('version')}, this code reads {cls.VERSION}")
        if d["feature_dim"] != feature_dim or len(d["mean"]) != feature_dim or len(d["std"]) != feature_dim:
            raise ValueError(
                f"{source}: motion stats have feature_dim {d['feature_dim']} ({len(d['mean'])} means), expected "
                f"{feature_dim}; recompute them with MotionStats.compute for the current feature layout"
            )
        std = torch.tensor(d["std"], dtype=torch.float64)
        if not bool((std > 0).all()) or not all(map(math.isfinite, d["mean"])):
            raise ValueError(f"{source}: motion stats contain non-positive std or non-finite mean; recompute them")
        return cls(torch.tensor(d["mean"], dtype=torch.float64), std, int(d["count"]), float(d["min_std"]))
