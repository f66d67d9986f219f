"""Motion-only data: AMASS-style SMPL(-H) .npz files (+ optional HumanML3D-style captions) -> motion-only MDS shards.

Phase 1 trains text-to-motion on motion without video. This writes the same records as the synthetic motion-only stream
(`has_video = 0`, an empty latent, SMPL parameters and FK joints per frame), so `data.motion_only_path` (or `data.path`
for a motion-only Phase 1 run) reads it like any other stream.

- Frame rate: every clip is resampled to `--fps`, the model's motion rate, which is the video frame rate of the paired
  data (prepare_humove.py --fps, 16 by default), by nearest source timestamp (`prepare.nearest_frames`), so one motion
  frame means the same time span in both phases. Clips keep their full length; training crops or pads them to
  `data.motion_frames`.
- SMPL-H -> SMPL: SMPL-H's pose [156] is root (3) + 21 body joints (63) + 2 x 15 finger joints (90); SMPL's [72] is root
  + 23 body joints, the first 21 the same joints as SMPL-H's, then SMPL's left/right hand (joints 22, 23). The finger
  rotations are dropped and SMPL's two hand joints set to zero rotation: SMPL moves each hand as one rigid block, and
  copying one finger's curl onto the whole hand would bend it by an angle that means something else (HumanML3D keeps
  only the 22 body joints for the same reason). The first 10 of SMPL-H's 16 shape coefficients are kept.
- Captions: `--texts DIR` holds `<clip path>.txt` next to the layout of `--input` (the .npz path with .txt), one caption a
  line, `caption#tokens#start#end` (HumanML3D); start/end in seconds cut that caption's segment, 0.0#0.0 (or end <= start)
  the whole clip. Every caption is one sample, `<clip id>#<line>`. Without --texts each clip is one uncaptioned sample.
- HumanML3D as distributed: `--humanml3d DIR` reads its `index.csv` (source_path, start_frame, end_frame, new_name) and
  `texts/<id>.txt`. Its frames are AMASS frames taken every int(rate / 20)-th (20 fps nominal), after dropping the head of
  five sub-datasets (`HUMANML3D_HEAD_TRIM`), so a segment [start_frame, end_frame) and a caption's #start#end (seconds at
  20 fps into the segment) map back to AMASS source frames exactly. Sample ids are `<clip id>#<HumanML3D id>.<line>`,
  so HumanML3D's split files select them. HumanAct12 rows (not AMASS) and mirrored `M` ids are not used.
- Lengths: training cuts every clip to one window of `data.motion_frames` (a random one per epoch for longer clips,
  padding for shorter ones), so batches are uniform without length buckets; the only waste is the padding of clips
  shorter than the window. dataset.json's `lengths` gives, for each window in `--report-frames`, the padded share of
  the training frames and the share of the clips' frames left outside the window in an epoch, to choose the window by.
- Resumable and multi-rank like prepare_humove.py (its progress files, settings pinning, index merge and rejection
  report are reused): a unit of work is one .npz file. Rejected files and segments land in rejected.jsonl with a kind
  (unknown_format, unreadable, bad_values, too_short, missing_text) and a reason.
"""
from __future__ import annotations

import argparse
import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from tqdm import tqdm

from echomotion.data.encoders import TEXT_ENCODERS, build_text_encoder
from echomotion.data.prepare import (
    ClipRejected,
    Moments,
    Output,
    barrier,
    file_sha1,
    first_line,
    join_ranks,
    merge_parts,
    nearest_frames,
    open_part_writer,
    rejection,
    resume,
    write_dataset_info,
)
from echomotion.data.schema import SCHEMA_VERSION, Sample, encode_sample
from echomotion.motion import NUM_BETAS, NUM_BODY_JOINTS, SMPLLayer, SMPLMotion

SMPLH_POSE_DIM, SMPL_POSE_DIM = 156, 72
SHARED_BODY = 21  # body joints 1..21 are the same joints in SMPL-H and SMPL
SOURCE = "amass"
REPORT_FRAMES = (32, 64, 96, 128, 160)  # 2-10 s at 16 fps: HumanML3D's clip lengths
HUMANML3D_FPS = 20
# Seconds HumanML3D's pose processing drops from the start of every clip of these AMASS sub-datasets before its index's
# start_frame/end_frame count (its raw_pose_processing step).
HUMANML3D_HEAD_TRIM = {"Eyes_Japan_Dataset": 3.0, "MPI_HDM05": 3.0, "TotalCapture": 1.0, "MPI_Limits": 1.0,
                       "Transitions_mocap": 0.5}


@dataclass(frozen=True)
class Caption:
    text: str
    start: float  # seconds; start = end = 0: the whole clip
    end: float


@dataclass(frozen=True)
class HumanML3DSegment:
    """One row of HumanML3D's index.csv with its captions (times in seconds at 20 fps from the segment start)."""

    key: str  # HumanML3D id, e.g. 000123
    start: int  # HumanML3D frames after the head trim; end is exclusive
    end: int
    captions: tuple[Caption, ...]


def read_humanml3d(folder: Path) -> dict[str, list[HumanML3DSegment]]:
    """index.csv + texts/ -> the segments of each AMASS clip id (`./pose_data/KIT/3/x_poses.npy` -> `KIT/3/x_poses`)."""
    out: dict[str, list[HumanML3DSegment]] = {}
    with open(folder / "index.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if "humanact12" in row["source_path"]:
                continue
            clip = row["source_path"].split("pose_data/", 1)[-1].removesuffix(".npy")
            key = Path(row["new_name"]).stem
            text = folder / "texts" / f"{key}.txt"
            captions = tuple(read_captions(text)) if text.is_file() else ()
            out.setdefault(clip, []).append(HumanML3DSegment(key, int(row["start_frame"]), int(row["end_frame"]), captions))
    return out


def humanml3d_captions(clip: str, segments: list[HumanML3DSegment], src_fps: float) -> list[tuple[str, Caption]]:
    """Each caption of the clip's HumanML3D segments as (id suffix, Caption in seconds of the AMASS clip): HumanML3D frame
    k is AMASS frame (trim + k) * int(rate / 20). A span of one frame ends half a source frame after it starts (end = start
    would mean the whole clip), so it comes out as one frame, too short."""
    stride = max(int(src_fps / HUMANML3D_FPS), 1)
    trim = next((int(sec * HUMANML3D_FPS) for name, sec in HUMANML3D_HEAD_TRIM.items() if name in clip), 0)

    def seconds(k: int) -> float:
        return (trim + k) * stride / src_fps

    out = []
    for seg in segments:
        for i, cap in enumerate(seg.captions):
            first, stop = seg.start, seg.end
            if cap.end > cap.start:
                first, stop = seg.start + int(cap.start * HUMANML3D_FPS), min(seg.start + int(cap.end * HUMANML3D_FPS), seg.end)
            last = max(stop - 1, first)
            end = seconds(last) if last > first else seconds(first) + 0.5 / src_fps
            out.append((f"{seg.key}.{i}", Caption(cap.text, seconds(first), end)))
    return out


def read_amass(path: Path) -> tuple[dict[str, np.ndarray], float]:
    """An AMASS .npz -> SMPL parameters per frame (betas [T,10], global_orient [T,3], body_pose [T,23,3], transl [T,3])
    and its frame rate, or ClipRejected."""
    try:
        with np.load(path, allow_pickle=False) as d:
            if "poses" not in d.files or "trans" not in d.files or "betas" not in d.files:
                raise ClipRejected("unknown_format", f"{path.name} has keys {sorted(d.files)}; an AMASS clip has poses, "
                                                     "trans, betas and mocap_framerate (shape-only files are skipped)")
            rate_key = next((k for k in ("mocap_framerate", "mocap_frame_rate") if k in d.files), None)
            if rate_key is None:
                raise ClipRejected("unknown_format", f"{path.name} has no mocap_framerate")
            poses, trans, betas = (np.asarray(d[k], np.float32) for k in ("poses", "trans", "betas"))
            fps = float(d[rate_key])
    except ClipRejected:
        raise
    except Exception as e:
        raise ClipRejected("unreadable", f"cannot read {path.name}: {type(e).__name__}: {first_line(e)}") from e
    if poses.ndim != 2 or poses.shape[1] not in (SMPLH_POSE_DIM, SMPL_POSE_DIM) or trans.shape != (len(poses), 3) \
            or betas.shape[-1] < NUM_BETAS:
        raise ClipRejected("unknown_format", f"{path.name}: poses {list(poses.shape)}, trans {list(trans.shape)}, betas "
                                             f"{list(betas.shape)}; want poses [T,{SMPLH_POSE_DIM}] (SMPL-H) or "
                                             f"[T,{SMPL_POSE_DIM}] (SMPL), trans [T,3], betas [>={NUM_BETAS}]")
    if not (np.isfinite(poses).all() and np.isfinite(trans).all() and np.isfinite(betas).all()):
        raise ClipRejected("bad_values", f"{path.name} contains NaN or inf")
    if not fps > 0:
        raise ClipRejected("bad_values", f"{path.name} has mocap_framerate {fps}; it must be positive")
    return to_smpl(poses, trans, betas), fps


def to_smpl(poses: np.ndarray, trans: np.ndarray, betas: np.ndarray) -> dict[str, np.ndarray]:
    """SMPL-H [T,156] or SMPL [T,72] poses -> SMPL parameters; SMPL-H fingers dropped, SMPL's hand joints zero (module
    docstring says why)."""
    t = len(poses)
    body = np.zeros((t, NUM_BODY_JOINTS, 3), np.float32)
    if poses.shape[1] == SMPL_POSE_DIM:
        body[:] = poses[:, 3:].reshape(t, NUM_BODY_JOINTS, 3)
    else:
        body[:, :SHARED_BODY] = poses[:, 3 : 3 + 3 * SHARED_BODY].reshape(t, SHARED_BODY, 3)
    shape = np.broadcast_to(betas.reshape(-1)[:NUM_BETAS], (t, NUM_BETAS)).copy()
    return {"betas": shape, "global_orient": poses[:, :3].copy(), "body_pose": body, "transl": trans.copy()}


def read_captions(path: Path) -> list[Caption]:
    """HumanML3D lines `caption#tokens#start#end`; missing or unparsable times (some files have nan) mean the whole
    clip."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        fields = line.strip().split("#")
        if fields[0].strip():
            out.append(Caption(fields[0].strip(), _seconds(fields, 2), _seconds(fields, 3)))
    return out


def _seconds(fields: list[str], i: int) -> float:
    try:
        x = float(fields[i])
    except (IndexError, ValueError):
        return 0.0
    return x if np.isfinite(x) else 0.0


def segment(params: dict[str, np.ndarray], src_fps: float, fps: float, cap: Optional[Caption]
            ) -> dict[str, np.ndarray]:
    """The caption's time span of a clip (all of it for no caption or end <= start), resampled to `fps`."""
    n = len(params["transl"])
    first, last = 0, n - 1
    if cap is not None and cap.end > cap.start:
        first, last = min(round(cap.start * src_fps), n - 1), min(round(cap.end * src_fps), n - 1)
    frames = int(np.floor((last - first) / src_fps * fps + 1e-6)) + 1
    idx = first + nearest_frames(frames, fps, src_fps, last - first + 1)
    return {k: v[idx] for k, v in params.items()}


def _parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="prepare_motion.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="folder of AMASS-style .npz clips (searched recursively)")
    p.add_argument("--out", required=True, help="output folder, or s3://bucket/prefix (endpoint from S3_ENDPOINT_URL)")
    p.add_argument("--smpl-model", required=True, help="SMPL .pkl for forward kinematics (motion.smpl_model_path)")
    p.add_argument("--texts", help="HumanML3D-style captions: <clip path>.txt per clip, laid out like --input")
    p.add_argument("--humanml3d", help="HumanML3D's folder (index.csv, texts/): its segments and captions of --input")
    p.add_argument("--fps", type=float, default=16.0, help="the model's motion rate: the paired data's video fps")
    p.add_argument("--min-frames", type=int, default=16, help="shorter clips or segments (after resampling) are rejected")
    p.add_argument("--source", default=SOURCE, help="the samples' `source` column")
    p.add_argument("--report-frames", type=int, nargs="+", default=list(REPORT_FRAMES),
                   help="data.motion_frames windows whose padding and cropping dataset.json reports")
    p.add_argument("--local-dir", help="staging folder for an s3:// --out (default: under the system temp folder)")
    p.add_argument("--keep-local", action="store_true", help="keep local copies of shards uploaded to s3://")
    p.add_argument("--text-encoder", choices=TEXT_ENCODERS, default="hash")
    p.add_argument("--text-encoder-path", help="local umT5 folder (with --text-encoder umt5)")
    p.add_argument("--batch-size", type=int, default=32, help="captions encoded together")
    p.add_argument("--chunk-size", type=int, default=256, help="clips per resumable part (one MDS part folder)")
    p.add_argument("--device", default="cpu", help="device for the text encoder")
    p.add_argument("--retry-rejected", action="store_true", help="try clips rejected by an earlier run again")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--stop-after-clips", type=int, default=0,
                   help="testing aid: stop as if interrupted once this many clips were written in this run")
    args = p.parse_args(argv)
    if not Path(args.input).is_dir():
        p.error(f"--input {args.input} is not a folder; pass the folder that holds the AMASS .npz files")
    if args.texts and not Path(args.texts).is_dir():
        p.error(f"--texts {args.texts} is not a folder; pass HumanML3D's texts/ folder, or leave --texts out")
    if args.texts and args.humanml3d:
        p.error("--texts and --humanml3d both give captions: pass one")
    if args.humanml3d and not (Path(args.humanml3d) / "index.csv").is_file():
        p.error(f"--humanml3d {args.humanml3d} has no index.csv; pass the HumanML3D folder that holds index.csv and texts/")
    if min(args.batch_size, args.chunk_size, args.min_frames, *args.report_frames) < 1 or not args.fps > 0:
        p.error("--batch-size, --chunk-size, --min-frames, --report-frames and --fps must be positive")
    return args


def _settings(args: argparse.Namespace, tenc) -> dict[str, Any]:
    """What every sample of one output folder shares (a restart with other settings is refused)."""
    return {"kind": "motion_only", "schema_version": SCHEMA_VERSION, "fps": args.fps, "min_frames": args.min_frames,
            "captions": "humanml3d" if args.humanml3d else bool(args.texts), "text_encoder": tenc.describe(), "smpl_model_sha1": file_sha1(args.smpl_model)}


def clip_ids(input_dir: Path) -> list[str]:
    """Every .npz under the folder, as its relative path without the suffix (the clip id), sorted."""
    return sorted(p.relative_to(input_dir).with_suffix("").as_posix() for p in input_dir.rglob("*.npz"))


def load_unit(clip: str, args: argparse.Namespace) -> tuple[list[tuple[str, str, dict]], list[dict[str, Any]]]:
    """One .npz -> its samples (id, caption, SMPL parameters at --fps) and its rejected caption segments; ClipRejected
    if the whole clip is unusable."""
    params, src_fps = read_amass(Path(args.input) / f"{clip}.npz")
    frames = len(segment(params, src_fps, args.fps, None)["transl"])
    if frames < args.min_frames:
        raise ClipRejected("too_short", f"{frames} frames at {args.fps:g} fps, fewer than --min-frames {args.min_frames}")
    captions = _captions(clip, args, src_fps)
    samples, rejected = [], []
    for key, cap in captions:
        seg = segment(params, src_fps, args.fps, cap)
        frames = len(seg["transl"])
        if frames < args.min_frames:  # only a caption's span can be shorter than the whole clip
            rejected.append(rejection(f"{clip}#{key}", "too_short", f"{frames} frames at {args.fps:g} fps, fewer than "
                                      f"--min-frames {args.min_frames} (segment {cap.start:g}-{cap.end:g} s)"))
            continue
        samples.append((clip if cap is None else f"{clip}#{key}", "" if cap is None else cap.text, seg))
    return samples, rejected


def _captions(clip: str, args: argparse.Namespace, src_fps: float) -> list[tuple[str, Optional[Caption]]]:
    """(id suffix, caption) per sample of the clip: one uncaptioned sample without --texts / --humanml3d."""
    if args.humanml3d:
        found, where = humanml3d_captions(clip, args.humanml3d_segments.get(clip, []), src_fps), "HumanML3D's index.csv"
    elif args.texts:
        text = Path(args.texts) / f"{clip}.txt"
        found, where = [(str(k), c) for k, c in enumerate(read_captions(text) if text.is_file() else [])], str(text)
    else:
        return [("", None)]
    if not found:
        raise ClipRejected("missing_text", f"no captions for {clip} in {where}; add them or run without captions")
    return found  # type: ignore[return-value]


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Run one rank (RANK / WORLD_SIZE from torchrun); returns this rank's counts."""
    args = _parse_args(argv)
    args.humanml3d_segments = read_humanml3d(Path(args.humanml3d)) if args.humanml3d else {}
    rank, world = join_ranks()
    output = Output(args.out, args.local_dir)
    clips = clip_ids(Path(args.input))
    tenc = build_text_encoder(args.text_encoder, args.text_encoder_path, args.device)
    layer = SMPLLayer(args.smpl_model)
    progress, done = resume(output, rank, world, _settings(args, tenc), args.retry_rejected)
    mine = clips[rank::world]
    pending = [c for c in mine if c not in done]
    counts = {"rank": rank, "assigned": len(mine), "skipped_done": len(mine) - len(pending), "written": 0, "rejected": 0}
    bar = tqdm(total=len(pending), desc=f"prepare_motion rank {rank}", unit="clip", disable=args.no_progress)
    for start in range(0, len(pending), args.chunk_size):
        record = _write_part(pending[start : start + args.chunk_size], progress.next_part(), output, tenc, layer, args,
                             counts, bar)
        progress.commit(record)
        counts["rejected"] += len(record["rejected"])
    bar.close()
    barrier(world)
    if rank == 0:
        counts["summary"] = _finalize(args, output, clips, tenc)
    barrier(world)
    if world > 1:
        torch.distributed.destroy_process_group()
    return counts


def _write_part(chunk: list[str], part: str, output: Output, tenc, layer: SMPLLayer, args: argparse.Namespace,
                counts: dict[str, int], bar: tqdm) -> dict[str, Any]:
    """Write one chunk of clips as the MDS part `part`; returns its progress record (written only once the writer has
    closed its shards, so a crash leaves the chunk unrecorded and a rerun redoes it)."""
    samples, finished, rejected = [], [], []
    for clip in chunk:
        try:
            got, seg_rejects = load_unit(clip, args)
            samples += got
            rejected += seg_rejects
            finished.append(clip)
        except ClipRejected as r:
            rejected.append(rejection(clip, r.kind, str(r), file=f"{clip}.npz"))
        bar.update(1)
        if args.stop_after_clips and counts["written"] + len(finished) >= args.stop_after_clips:
            raise SystemExit(f"prepare_motion[rank {counts['rank']}]: stopped after {args.stop_after_clips} clips "
                             "(--stop-after-clips); rerun to resume")
    moments, frames = Moments(), []
    writer = open_part_writer(output, part, args.keep_local) if samples else None
    for b in range(0, len(samples), args.batch_size):
        batch = samples[b : b + args.batch_size]
        for (sample_id, caption, seg), text in zip(batch, _encode(tenc, [c for _, c, _ in batch])):
            sample = _sample(sample_id, caption, _with_joints(layer, seg), text, args)
            writer.write(encode_sample(sample))  # type: ignore[union-attr]
            moments.add(sample.features())  # computed once by encode_sample, stored in the record
            frames.append(len(seg["transl"]))
    if writer is not None:
        writer.finish()
    counts["written"] += len(finished)
    return {"part": part if writer is not None else None, "clips": finished, "rejected": rejected,
            "moments": moments.to_json(), "frames": frames}


def _encode(tenc, captions: list[str]) -> list[torch.Tensor]:
    """Text embeddings; an empty caption (a clip without --texts) gets one zero row, since MDS cannot store an empty
    array and Wan pads text with unmasked zeros, so the row reads like the padding of an empty prompt."""
    return [t if len(t) else torch.zeros(1, tenc.dim, dtype=t.dtype) for t in tenc.encode(captions)]


def _with_joints(layer: SMPLLayer, seg: dict[str, np.ndarray]) -> SMPLMotion:
    """SMPL parameters + their FK joints (computed once here, so training never runs the body model)."""
    p = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in seg.items()}
    joints = layer.joints(p["betas"], p["global_orient"], p["body_pose"], p["transl"])
    return SMPLMotion(p["betas"], p["global_orient"], p["body_pose"], p["transl"], joints)


def _sample(sample_id: str, caption: str, m: SMPLMotion, text: torch.Tensor, args: argparse.Namespace) -> Sample:
    category = sample_id.split("/", 1)[0] if "/" in sample_id else ""  # AMASS: the sub-dataset (CMU, KIT, ...)
    return Sample(clip_id=sample_id, source=args.source, category=category, caption=caption, fps=args.fps,
                  num_frames=m.transl.shape[0], height=0, width=0, video_latent=None, text_embedding=text,
                  betas=m.betas, global_orient=m.global_orient, body_pose=m.body_pose, transl=m.transl, joints=m.joints)


def _finalize(args: argparse.Namespace, output: Output, clips: list[str], tenc) -> dict[str, Any]:
    """Rank 0, after every rank has finished: merged index, rejections, motion stats, null text, dataset.json."""
    merged = merge_parts(args.out, output, set(clips), [])
    by_file, _ = output.read_progress()
    frames = [n for recs in by_file.values() for r in recs for n in r.get("frames", [])]
    torch.save(tenc.encode([""])[0], output.local / "null_text.pt")
    counts = {**merged.counts(), "samples": len(frames), "frames_total": sum(frames),
              "frames_min": min(frames, default=0), "frames_max": max(frames, default=0)}
    lengths = {str(w): window_waste(frames, w) for w in args.report_frames} if frames else {}
    for w, waste in lengths.items():
        print(f"prepare_motion: data.motion_frames={w}: {waste['pad_fraction']:.1%} of training frames are padding, "
              f"{waste['crop_fraction']:.1%} of the clips' frames lie outside the window in an epoch", flush=True)
    info = {"name": Path(args.input).name, **_settings(args, tenc), "text_dim": tenc.dim,
            "smpl_model": str(Path(args.smpl_model).resolve()), "input": str(Path(args.input).resolve()),
            "texts": str(Path(args.texts).resolve()) if args.texts else None, "counts": counts, "lengths": lengths,
            "motion_stats": "motion_stats.json" if merged.moments.n else None, "null_text": "null_text.pt",
            "parts": merged.parts}
    write_dataset_info(output, info, merged, "prepare_motion", args.out)
    return counts


def window_waste(frames: list[int], window: int) -> dict[str, float]:
    """What training at data.motion_frames=`window` wastes on clips of these lengths: the padded share of the frames
    it trains on (clips shorter than the window are padded) and the share of the clips' frames an epoch does not see
    (longer clips are cut to one window per epoch)."""
    n = np.asarray(frames, dtype=np.int64)
    return {"pad_fraction": float(np.maximum(window - n, 0).sum() / (window * len(n))),
            "crop_fraction": float(np.maximum(n - window, 0).sum() / n.sum())}
