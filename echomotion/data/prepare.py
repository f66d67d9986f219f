"""Preprocessing: raw clips (video + SMPL .npz + caption, listed in a JSONL manifest) -> encoded MDS shards.

Each clip is decoded, resampled to the target fps by nearest frame timestamp, cut to the first `frames` frames, center
cropped to the target aspect and resized; its SMPL parameters are resampled to the same timestamps and the joints
recomputed by forward kinematics; video and caption are encoded in batches. Nothing is dropped silently: every clip
that cannot be used lands in rejected.jsonl with its reason.

Work is split into chunks; each chunk is written as its own MDS part folder (`part-r<rank>-<seq>/`) and recorded in the
rank's progress file only after the part's writer has finished, so an interrupted run redoes at most the chunk it was
in, and never records a clip that is not in a closed shard. Under torchrun, rank r takes the manifest's clips
i = r (mod world size); rank 0 then merges the parts' indexes into one index.json, so one StreamingDataset reads the
whole folder. See docs/data.md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from echomotion.data.encoders import TEXT_ENCODERS, VIDEO_CODECS, build_text_encoder, build_video_codec
from echomotion.data.schema import COLUMNS, SCHEMA_VERSION, Sample, encode_sample
from echomotion.data.shards import SHARD_BYTES, SHARD_HASHES, is_remote
from echomotion.motion import MOTION_FEATURE_DIM, NUM_BETAS, NUM_BODY_JOINTS, MotionStats, SMPLLayer

__all__ = ["ClipRejected", "ManifestEntry", "read_manifest", "read_video", "read_smpl", "load_clip", "main",
           # shared with prepare_motion.py: output, progress, resume, part writers, merge and report
           "Output", "Progress", "Moments", "rejection", "first_line", "file_sha1", "barrier", "resume",
           "open_part_writer", "merge_parts", "Merged", "nearest_frames"]

SMPL_KEYS = ("betas", "global_orient", "body_pose", "transl")
PROGRESS_DIR = "_progress"


class ClipRejected(Exception):
    """A clip that cannot be used; `kind` groups the report, the message says what is wrong."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class ManifestEntry:
    line: int
    clip_id: str
    video: Path
    smpl: Path
    caption: str
    category: str
    source: str


def read_manifest(path: str | Path) -> tuple[list[ManifestEntry], list[dict[str, Any]]]:
    """Parse the manifest; paths are relative to its folder. Returns the usable entries and line-level rejections."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {str(path)!r} not found; pass a JSONL file with one clip per line")
    base = path.resolve().parent
    entries, rejected, seen_on = [], [], {}
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            missing = [k for k in ("clip_id", "video", "smpl", "caption") if k not in d]
        except json.JSONDecodeError as e:
            d, missing = {}, [f"(invalid JSON: {e.msg})"]
        clip_id = str(d.get("clip_id", f"line-{n}"))
        if missing:
            rejected.append(rejection(clip_id, "bad_manifest_line", f"manifest line {n} lacks {missing}", line=n))
        elif clip_id in seen_on:
            rejected.append(rejection(clip_id, "duplicate_clip_id",
                                       f"clip_id already used on manifest line {seen_on[clip_id]}", line=n))
        else:
            seen_on[clip_id] = n
            entries.append(ManifestEntry(n, clip_id, base / d["video"], base / d["smpl"], str(d["caption"]),
                                         str(d.get("category", "")), str(d.get("source", ""))))
    return entries, rejected


def rejection(clip_id: str, kind: str, reason: str, **extra: Any) -> dict[str, Any]:
    return {"clip_id": clip_id, "kind": kind, "reason": reason, **extra}


def _crop_resize(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """Center crop to the target aspect ratio, then resize (PIL bicubic, which antialiases when shrinking)."""
    h, w = frame.shape[:2]
    if w * height > h * width:  # too wide
        cw, ch = max(1, round(h * width / height)), h
    else:
        cw, ch = w, max(1, round(w * height / width))
    x0, y0 = (w - cw) // 2, (h - ch) // 2
    img = Image.fromarray(np.ascontiguousarray(frame[y0 : y0 + ch, x0 : x0 + cw, :3]))
    if img.size != (width, height):
        img = img.resize((width, height), Image.BICUBIC)
    return np.asarray(img)


def read_video(path: Path, fps: float, frames: int, height: int, width: int) -> tuple[np.ndarray, int, float]:
    """Decode `path`; return the resampled frames [frames, H, W, 3], the source frame count and the source fps.

    Target frame k (time k / fps) takes the source frame nearest in time. The whole stream is decoded so the frame
    count used for the SMPL check is exact, but only the frames needed are kept.
    """
    import imageio.v2 as iio

    try:
        reader = iio.get_reader(str(path), format="ffmpeg")
    except Exception as e:
        raise ClipRejected("unreadable_video", f"cannot open {path.name}: {type(e).__name__}: {first_line(e)}") from e
    try:
        src_fps = float(reader.get_meta_data().get("fps") or 0.0)
        if not src_fps > 0:
            raise ClipRejected("unreadable_video", f"{path.name} has no frame rate in its metadata")
        wanted = np.round(np.arange(frames) / fps * src_fps).astype(np.int64)
        needed, kept = set(wanted.tolist()), {}
        count = 0
        for i, frame in enumerate(reader):
            if i in needed:
                kept[i] = _crop_resize(frame, height, width)
            count = i + 1
    except ClipRejected:
        raise
    except Exception as e:
        raise ClipRejected("unreadable_video", f"cannot decode {path.name}: {type(e).__name__}: {first_line(e)}") from e
    finally:
        reader.close()
    if count == 0:
        raise ClipRejected("unreadable_video", f"{path.name} decodes to no frames")
    if wanted[-1] >= count:
        raise ClipRejected("too_short", f"needs {frames} frames at {fps:g} fps ({(frames - 1) / fps:.2f} s), video has "
                                        f"{count} frames at {src_fps:g} fps ({(count - 1) / src_fps:.2f} s)")
    return np.stack([kept[i] for i in wanted.tolist()]), count, src_fps


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


def read_smpl(path: Path) -> tuple[dict[str, np.ndarray], Optional[float]]:
    """Load SMPL parameters: betas [10] or [N,>=10] (first 10 kept), global_orient [N,3], body_pose [N,69] or
    [N,23,3], transl [N,3], optional fps. Returns per-frame float32 arrays and the fps (None if absent)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in SMPL_KEYS if k not in data.files]
            if missing:
                raise ClipRejected("missing_smpl_keys", f"{path.name} lacks SMPL keys {missing} (has {sorted(data.files)})")
            arrays = {k: np.asarray(data[k], dtype=np.float32) for k in SMPL_KEYS}
            smpl_fps = float(data["fps"]) if "fps" in data.files else None
    except ClipRejected:
        raise
    except Exception as e:
        raise ClipRejected("unreadable_smpl", f"cannot read {path.name}: {type(e).__name__}: {first_line(e)}") from e
    n = arrays["global_orient"].shape[0] if arrays["global_orient"].ndim == 2 else -1
    betas = arrays["betas"]
    betas = np.broadcast_to(betas, (n, betas.shape[-1])) if betas.ndim == 1 and n >= 0 else betas
    body_pose = arrays["body_pose"]
    body_pose = body_pose.reshape(n, -1) if body_pose.ndim == 3 and body_pose.shape[0] == n else body_pose
    problems = []
    if n < 1 or arrays["global_orient"].shape != (n, 3):
        problems.append(f"global_orient {list(arrays['global_orient'].shape)} (want [N,3], N >= 1)")
    if betas.ndim != 2 or betas.shape[0] != n or betas.shape[1] < NUM_BETAS:
        problems.append(f"betas {list(arrays['betas'].shape)} (want [{NUM_BETAS}] or [N,>={NUM_BETAS}])")
    if body_pose.shape != (n, NUM_BODY_JOINTS * 3):
        problems.append(f"body_pose {list(arrays['body_pose'].shape)} (want [N,{NUM_BODY_JOINTS * 3}] or "
                        f"[N,{NUM_BODY_JOINTS},3])")
    if arrays["transl"].shape != (n, 3):
        problems.append(f"transl {list(arrays['transl'].shape)} (want [N,3])")
    if problems:
        raise ClipRejected("bad_smpl", f"{path.name}: inconsistent shapes: " + "; ".join(problems))
    out = {"betas": np.ascontiguousarray(betas[:, :NUM_BETAS]), "global_orient": arrays["global_orient"],
           "body_pose": body_pose.reshape(n, NUM_BODY_JOINTS, 3), "transl": arrays["transl"]}
    if not all(np.isfinite(v).all() for v in out.values()):
        raise ClipRejected("bad_smpl", f"{path.name} contains NaN or inf")
    return out, smpl_fps


def load_clip(entry: ManifestEntry, fps: float, frames: int, height: int, width: int
              ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One manifest entry -> (uint8 frames [frames,H,W,3], SMPL parameters at the same timestamps), or ClipRejected."""
    for what, p in (("video", entry.video), ("SMPL", entry.smpl)):
        if not p.is_file():
            raise ClipRejected("missing_file", f"{what} file {str(p)!r} does not exist")
    if not entry.caption.strip():
        raise ClipRejected("empty_caption", "the caption is empty")
    params, smpl_fps = read_smpl(entry.smpl)
    video, n_video, video_fps = read_video(entry.video, fps, frames, height, width)
    smpl_fps = smpl_fps or video_fps
    n_smpl = params["global_orient"].shape[0]
    expected = n_video * smpl_fps / video_fps
    if abs(n_smpl - expected) > 1.0:
        raise ClipRejected("frame_count_mismatch",
                           f"video has {n_video} frames at {video_fps:g} fps ({n_video / video_fps:.2f} s) but SMPL has "
                           f"{n_smpl} frames at {smpl_fps:g} fps ({n_smpl / smpl_fps:.2f} s)")
    return video, {k: v[nearest_frames(frames, fps, smpl_fps, n_smpl)] for k, v in params.items()}


def nearest_frames(frames: int, fps: float, src_fps: float, n_src: int) -> np.ndarray:
    """Source frame indices for `frames` frames at `fps`: the nearest source timestamp (no blending, so rotations stay
    valid rotations and joints stay the FK of the kept poses), clamped to the last source frame."""
    return np.minimum(np.round(np.arange(frames) / fps * src_fps).astype(np.int64), n_src - 1)


class Output:
    """The output folder: local, or a local staging folder mirrored to a remote prefix (s3://...).

    Progress files are the record of what is finished. For a remote output the remote copies are the truth: every
    rank reads them at start (a restart may be on another machine, or on several), and each rank uploads its own
    file after every commit.
    """

    def __init__(self, out: str, local_dir: Optional[str]):
        from streaming.base.storage.upload import CloudUploader

        if is_remote(out):
            self.remote: Optional[str] = out.rstrip("/")
            # staged in a folder named after the remote, so a restart on the same machine needs no extra flag
            self.local = Path(local_dir or os.path.join(tempfile.gettempdir(), "echomotion-prepare",
                                                        hashlib.sha1(self.remote.encode()).hexdigest()[:12]))
            self.uploader = CloudUploader.get((str(self.local), self.remote), keep_local=True, exist_ok=True)
        else:
            self.remote, self.local, self.uploader = None, Path(out), None
        (self.local / PROGRESS_DIR).mkdir(parents=True, exist_ok=True)

    def upload(self, name: str) -> None:
        if self.uploader is not None:
            self.uploader.upload_file(name)

    def read_progress(self) -> tuple[dict[str, list[dict[str, Any]]], Optional[dict[str, Any]]]:
        """({progress file name: committed records}, recorded settings or None)."""
        if self.remote is None:
            files = {p.name: p.read_text() for p in (self.local / PROGRESS_DIR).iterdir()
                     if p.name == "settings.json" or (p.name.startswith("rank-") and p.suffix == ".jsonl")}
        else:
            files = self._download_progress()
        settings = json.loads(files.pop("settings.json")) if "settings.json" in files else None
        return {n: [json.loads(x) for x in t.splitlines() if x.strip()] for n, t in sorted(files.items())}, settings

    def _download_progress(self) -> dict[str, str]:
        from urllib.parse import urlparse

        from streaming.base.storage.download import CloudDownloader

        url, files = urlparse(self.remote), {}
        with tempfile.TemporaryDirectory() as tmp:
            for key in self.uploader.list_objects(PROGRESS_DIR + "/") or []:
                name = key.rsplit("/", 1)[-1]
                if name == "settings.json" or (name.startswith("rank-") and name.endswith(".jsonl")):
                    CloudDownloader.direct_download(f"{url.scheme}://{url.netloc}/{key}", os.path.join(tmp, name))
                    files[name] = Path(tmp, name).read_text()
        return files


class Progress:
    """One rank's committed parts, rewritten atomically (and uploaded) after every chunk."""

    def __init__(self, output: Output, rank: int, records: list[dict[str, Any]]):
        self.output, self.rank, self.records = output, rank, list(records)
        self.name = f"rank-{rank:05d}.jsonl"

    def next_part(self) -> str:
        return f"part-r{self.rank:05d}-{len(self.records):05d}"

    def commit(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        path = self.output.local / PROGRESS_DIR / self.name
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.records)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self.output.upload(f"{PROGRESS_DIR}/{self.name}")


class Moments:
    """Count, sum and sum of squares of motion features (float64): mergeable across parts and ranks without
    re-reading the shards."""

    def __init__(self, n: int = 0, s: Optional[list[float]] = None, q: Optional[list[float]] = None):
        self.n = n
        self.s = np.zeros(MOTION_FEATURE_DIM) if s is None else np.asarray(s, np.float64)
        self.q = np.zeros(MOTION_FEATURE_DIM) if q is None else np.asarray(q, np.float64)

    def add(self, x: torch.Tensor) -> None:
        x = x.double().numpy()
        self.n, self.s, self.q = self.n + x.shape[0], self.s + x.sum(0), self.q + (x * x).sum(0)

    def merge(self, other: "Moments") -> None:
        self.n, self.s, self.q = self.n + other.n, self.s + other.s, self.q + other.q

    def to_json(self) -> dict[str, Any]:
        return {"n": self.n, "s": self.s.tolist(), "q": self.q.tolist()}

    def stats(self, min_std: float = 1e-2) -> MotionStats:
        mean = self.s / self.n
        std = np.sqrt(np.maximum(self.q / self.n - mean * mean, 0.0))
        return MotionStats(torch.from_numpy(mean), torch.from_numpy(std).clamp_min(min_std), self.n, min_std)


def _parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="prepare_humove.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", required=True, help="JSONL: {clip_id, video, smpl, caption[, category, source]}")
    p.add_argument("--out", required=True, help="output folder, or s3://bucket/prefix (endpoint from S3_ENDPOINT_URL)")
    p.add_argument("--local-dir", help="staging folder for an s3:// --out (default: under the system temp folder)")
    p.add_argument("--keep-local", action="store_true", help="keep local copies of shards uploaded to s3://")
    p.add_argument("--fps", type=float, default=16.0)
    p.add_argument("--frames", type=int, default=17, help="frames per clip, 1 + 4k for Wan's VAE")
    p.add_argument("--height", type=int, default=32)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--codec", choices=VIDEO_CODECS, default="pixel")
    p.add_argument("--vae-path", help="local diffusers AutoencoderKLWan folder (with --codec wan-vae)")
    p.add_argument("--text-encoder", choices=TEXT_ENCODERS, default="hash")
    p.add_argument("--text-encoder-path", help="local umT5 folder (with --text-encoder umt5)")
    p.add_argument("--smpl-model", required=True, help="SMPL .pkl for forward kinematics (motion.smpl_model_path)")
    p.add_argument("--latent-dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    p.add_argument("--batch-size", type=int, default=8, help="clips encoded together")
    p.add_argument("--chunk-size", type=int, default=64, help="clips per resumable part (one MDS part folder)")
    p.add_argument("--device", default="cpu", help="device for the VAE and text encoder")
    p.add_argument("--retry-rejected", action="store_true",
                   help="try clips rejected by an earlier run again (e.g. after fixing their files)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--stop-after-clips", type=int, default=0,
                   help="testing aid: stop as if interrupted once this many clips were encoded in this run")
    args = p.parse_args(argv)
    if (args.frames - 1) % 4:
        p.error(f"--frames {args.frames} is not 1 + 4k (Wan's causal VAE frame count): use e.g. 17, 49 or 81")
    if min(args.batch_size, args.chunk_size, args.frames, args.height, args.width) < 1 or not args.fps > 0:
        p.error("--batch-size, --chunk-size, --frames, --height, --width and --fps must be positive")
    return args


def _settings(args: argparse.Namespace, codec, tenc) -> dict[str, Any]:
    """What every sample of one output folder must share. The SMPL model is pinned by content, not path: joints of two
    body models must not mix, and a copy of the same file elsewhere is still the same model."""
    return {"schema_version": SCHEMA_VERSION, "fps": args.fps, "num_frames": args.frames, "height": args.height,
            "width": args.width, "video_codec": codec.describe(), "text_encoder": tenc.describe(),
            "latent_dtype": args.latent_dtype, "smpl_model_sha1": file_sha1(args.smpl_model)}


def file_sha1(path: str | Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_settings(output: Output, old: Optional[dict[str, Any]], settings: dict[str, Any]) -> None:
    """A folder holds one encoding: a restart with other settings would mix latents of different kinds. The first
    run records its settings; every later run must match them."""
    if old is None:
        (output.local / PROGRESS_DIR / "settings.json").write_text(json.dumps(settings, indent=2))
        output.upload(f"{PROGRESS_DIR}/settings.json")
    elif old != settings:
        diff = {k: (old.get(k), settings.get(k)) for k in set(old) | set(settings) if old.get(k) != settings.get(k)}
        raise SystemExit(f"{output.remote or output.local} was started with other settings {diff} (before, now); "
                         "rerun with the same arguments to resume, or write to a new --out")


def _encode_batch(batch, loaded, codec, tenc, layer: SMPLLayer, args) -> list[tuple[ManifestEntry, Sample]]:
    videos = np.stack([v for v, _ in loaded])
    latents = codec.encode(videos)
    texts = tenc.encode([e.caption for e in batch])
    params = {k: torch.from_numpy(np.concatenate([p[k] for _, p in loaded])) for k in SMPL_KEYS}
    joints = layer.joints(params["betas"], params["global_orient"], params["body_pose"], params["transl"])
    out = []
    for i, (e, lat, txt) in enumerate(zip(batch, latents, texts)):
        sl = slice(i * args.frames, (i + 1) * args.frames)
        out.append((e, Sample(clip_id=e.clip_id, source=e.source, category=e.category, caption=e.caption,
                              fps=args.fps, num_frames=args.frames, height=args.height, width=args.width,
                              video_latent=lat, text_embedding=txt, betas=params["betas"][sl],
                              global_orient=params["global_orient"][sl], body_pose=params["body_pose"][sl],
                              transl=params["transl"][sl], joints=joints[sl])))
    return out


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Run one rank of the preprocessing (RANK / WORLD_SIZE from torchrun); returns this rank's counts."""
    args = _parse_args(argv)
    rank, world = join_ranks()
    output = Output(args.out, args.local_dir)
    entries, manifest_rejects = read_manifest(args.manifest)
    codec = build_video_codec(args.codec, args.vae_path, args.device)
    tenc = build_text_encoder(args.text_encoder, args.text_encoder_path, args.device)
    layer = SMPLLayer(args.smpl_model)
    progress, done = resume(output, rank, world, _settings(args, codec, tenc), args.retry_rejected)
    mine = [e for k, e in enumerate(entries) if k % world == rank]
    pending = [e for e in mine if e.clip_id not in done]
    counts = {"rank": rank, "assigned": len(mine), "skipped_done": len(mine) - len(pending), "encoded": 0, "rejected": 0}
    bar = tqdm(total=len(pending), desc=f"prepare rank {rank}", unit="clip", disable=args.no_progress)
    for start in range(0, len(pending), args.chunk_size):
        record = _write_part(pending[start : start + args.chunk_size], progress.next_part(), output, codec, tenc, layer,
                             args, counts, bar)
        progress.commit(record)
        counts["rejected"] += len(record["rejected"])
    bar.close()
    print(f"prepare_humove[rank {rank}]: encoded {counts['encoded']}, skipped {counts['skipped_done']} already "
          f"done, rejected {counts['rejected']}", flush=True)
    barrier(world)
    if rank == 0:
        counts["summary"] = _finalize(args, output, entries, manifest_rejects, codec, tenc)
    barrier(world)
    if world > 1:
        torch.distributed.destroy_process_group()
    return counts


def resume(output: Output, rank: int, world: int, settings: dict[str, Any], retry_rejected: bool
           ) -> tuple[Progress, set[str]]:
    """This rank's progress file and the ids every rank has finished (written, or rejected unless `retry_rejected`).
    Rank 0 records the settings on a first run and refuses other settings on a restart."""
    by_file, old_settings = output.read_progress()
    if rank == 0:  # torchrun gives every rank the same arguments; if rank 0 stops here, torchrun stops the rest
        _check_settings(output, old_settings, settings)
    progress = Progress(output, rank, by_file.get(f"rank-{rank:05d}.jsonl", []))
    records = [r for recs in by_file.values() for r in recs]
    done = {c for r in records for c in r["clips"]}
    if not retry_rejected:
        done |= {x["clip_id"] for r in records for x in r["rejected"]}
    barrier(world)  # every rank has read the progress files before any rank rewrites its own
    return progress, done


def open_part_writer(output: Output, part: str, keep_local: bool):
    """The MDS writer of one part folder (exist_ok: clears a crashed run's leftovers of the same part)."""
    from streaming import MDSWriter

    out = (str(output.local / part), f"{output.remote}/{part}") if output.remote else str(output.local / part)
    return MDSWriter(out=out, columns=COLUMNS, keep_local=keep_local or output.remote is None, size_limit=SHARD_BYTES,
                     hashes=SHARD_HASHES, exist_ok=True)


def _write_part(chunk: list[ManifestEntry], part: str, output: Output, codec, tenc, layer: SMPLLayer,
                args: argparse.Namespace, counts: dict[str, int], bar: tqdm) -> dict[str, Any]:
    """Encode one chunk into the MDS part folder `part` and return its progress record. The writer is finished (its
    shards closed and uploaded) before the caller records the chunk as done."""
    writer, clips, rejected, moments = None, [], [], Moments()
    for b in range(0, len(chunk), args.batch_size):
        batch, loaded = [], []
        for e in chunk[b : b + args.batch_size]:
            try:
                loaded.append(load_clip(e, args.fps, args.frames, args.height, args.width))
                batch.append(e)
            except ClipRejected as r:
                rejected.append(rejection(e.clip_id, r.kind, str(r), line=e.line, video=str(e.video), smpl=str(e.smpl)))
        if batch:
            if writer is None:  # a part folder only for chunks with at least one good clip
                writer = open_part_writer(output, part, args.keep_local)
            for e, sample in _encode_batch(batch, loaded, codec, tenc, layer, args):
                writer.write(encode_sample(sample, args.latent_dtype))
                moments.add(sample.features())  # computed once by encode_sample, stored in the record
                clips.append(e.clip_id)
            counts["encoded"] += len(batch)
        bar.update(len(chunk[b : b + args.batch_size]))
        if args.stop_after_clips and counts["encoded"] >= args.stop_after_clips:
            bar.close()  # an interruption: this part is neither finished nor recorded
            raise SystemExit(f"prepare_humove[rank {counts['rank']}]: stopped after {counts['encoded']} clips "
                             "(--stop-after-clips); rerun to resume")
    if writer is not None:
        writer.finish()
    return {"part": part if writer is not None else None, "clips": clips, "rejected": rejected,
            "moments": moments.to_json()}


def join_ranks() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment, joining a gloo group when there are several: the ranks only
    meet at barriers between long encoding runs, hence the day-long timeout."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        torch.distributed.init_process_group("gloo", timeout=timedelta(hours=24))
    return rank, world


def barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def _finalize(args: argparse.Namespace, output: Output, entries: list[ManifestEntry],
              manifest_rejects: list[dict[str, Any]], codec, tenc) -> dict[str, Any]:
    """Rank 0, after every rank has finished: merged index, rejection report, motion stats, dataset.json."""
    merged = merge_parts(args.out, output, {e.clip_id for e in entries}, manifest_rejects)
    torch.save(tenc.encode([""])[0], output.local / "null_text.pt")
    info = {"name": Path(args.manifest).stem, **_settings(args, codec, tenc),
            "latent_shape": list(codec.latent_shape(args.frames, args.height, args.width)), "text_dim": tenc.dim,
            "smpl_model": str(Path(args.smpl_model).resolve()), "counts": merged.counts(),
            "manifest": str(Path(args.manifest).resolve()),
            "motion_stats": "motion_stats.json" if merged.moments.n else None, "null_text": "null_text.pt",
            "parts": merged.parts}
    write_dataset_info(output, info, merged, "prepare_humove", args.out)
    return info["counts"]


def write_dataset_info(output: Output, info: dict[str, Any], merged: "Merged", tool: str, out: str) -> None:
    """Rank 0's last step of a preparation tool: dataset.json (and the null text already saved) uploaded, the summary and
    the first rejections printed."""
    (output.local / "dataset.json").write_text(json.dumps(info, indent=2) + "\n")
    for name in ("dataset.json", "null_text.pt"):
        output.upload(name)
    merged.report(tool, out, "clips")


@dataclass
class Merged:
    """What the ranks wrote, merged: part folders, written ids, rejections (latest per id) and feature moments."""

    parts: list[str]
    written: list[str]
    rejected: list[dict[str, Any]]
    moments: Moments

    def counts(self) -> dict[str, Any]:
        kinds = Counter(x["kind"] for x in self.rejected)
        return {"clips": len(self.written), "rejected": len(self.rejected), "rejected_by_kind": dict(sorted(kinds.items()))}

    def report(self, tool: str, out: str, what: str) -> None:
        """One summary line on stdout; the first rejections with their reasons on stderr."""
        kinds = self.counts()["rejected_by_kind"]
        print(f"{tool}: {len(self.written)} {what} in {out} ({len(self.parts)} parts), {len(self.rejected)} rejected"
              + (f" -> {out.rstrip('/')}/rejected.jsonl: " + ", ".join(f"{k} {v}" for k, v in kinds.items())
                 if self.rejected else ""), flush=True)
        for x in self.rejected[:20]:
            print(f"  rejected {x['clip_id']}: [{x['kind']}] {x['reason']}", file=sys.stderr)
        if len(self.rejected) > 20:
            print(f"  ... {len(self.rejected) - 20} more in rejected.jsonl", file=sys.stderr)


def merge_parts(out: str, output: Output, expected: set[str], early_rejects: list[dict[str, Any]]) -> Merged:
    """Rank 0, after every rank has finished: checks that every expected id was written or rejected, merges the parts'
    indexes into one index.json, and writes (and uploads) rejected.jsonl and motion_stats.json."""
    from streaming.base.util import merge_index

    by_file, _ = output.read_progress()
    records = [r for recs in by_file.values() for r in recs]
    parts = sorted(r["part"] for r in records if r["part"])
    clips = [c for r in records for c in r["clips"]]
    written = set(clips)
    latest = {x["clip_id"]: x for r in records for x in r["rejected"] if x["clip_id"] not in written}  # retries
    rejected = early_rejects + sorted(latest.values(), key=lambda x: x.get("line", 0))
    if len(written) != len(clips):
        raise RuntimeError(f"{out}: a clip was recorded in two parts; the progress files are inconsistent")
    unaccounted = expected - written - set(latest)
    if unaccounted:
        raise RuntimeError(f"{len(unaccounted)} clips were neither written nor rejected, e.g. "
                           f"{sorted(unaccounted)[:5]}; rerun the same command to finish them")
    local = output.local
    (local / "index.json").unlink(missing_ok=True)
    if parts:
        urls = [(str(local / p / "index.json"), f"{output.remote}/{p}/index.json") if output.remote
                else str(local / p / "index.json") for p in parts]
        logging.disable(logging.WARNING)  # merge_index logs its temp folder and the existing output folder
        try:
            merge_index(urls, (str(local), output.remote) if output.remote else str(local), keep_local=True)
        finally:
            logging.disable(logging.NOTSET)
    with open(local / "rejected.jsonl", "w") as f:
        f.writelines(json.dumps(x) + "\n" for x in rejected)
    moments = Moments()
    for r in records:
        moments.merge(Moments(**r["moments"]))
    if moments.n:
        moments.stats().save(local / "motion_stats.json")
    for name in ("rejected.jsonl",) + (("motion_stats.json",) if moments.n else ()):
        output.upload(name)
    return Merged(parts, clips, rejected, moments)
