"""Generate HuMoVe-mini: procedural SMPL motions, videos rendered from them, captions, encoded into MDS shards.

    python tools/make_humove_mini.py --out data/humove-mini --clips 200 --seed 0 [--raw] [--motion-only-clips 200]

Writes DIR/train, DIR/heldout (and DIR/motion_only) shard folders, DIR/motion_stats.json, DIR/null_text.pt and
DIR/dataset.json; --raw also writes DIR/raw/manifest.jsonl with lossless mp4 + SMPL .npz per clip, the input of
tools/prepare_humove.py. See docs/data.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from echomotion.data.encoders import TEXT_ENCODERS, VIDEO_CODECS  # noqa: E402
from echomotion.data.synthetic import generate_humove_mini  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (must not already hold shards)")
    p.add_argument("--clips", type=int, required=True, help="number of video clips (train + heldout)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heldout-fraction", type=float, default=0.1)
    p.add_argument("--motion-only-clips", type=int, default=0, help="extra motion-only samples (has_video=0)")
    p.add_argument("--codec", choices=(*VIDEO_CODECS, "pca"), default="pixel",
                   help="pixel: exact, 48 channels; pca: the pixel tokens' principal components fitted on the training "
                        "clips (--codec-channels of them; what the demo uses); wan-vae: the real VAE")
    p.add_argument("--codec-channels", type=int, default=16, help="components kept by --codec pca")
    p.add_argument("--vae-path", help="local diffusers AutoencoderKLWan folder (with --codec wan-vae)")
    p.add_argument("--text-encoder", choices=TEXT_ENCODERS, default="hash")
    p.add_argument("--text-encoder-path", help="local umT5 folder (with --text-encoder umt5)")
    p.add_argument("--latent-dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    p.add_argument("--raw", action="store_true", help="also write raw clips + manifest for tools/prepare_humove.py")
    p.add_argument("--frames", type=int, default=17, help="video (and motion) frames per clip, of the form 1 + 4k")
    p.add_argument("--height", type=int, default=32, help="frame height in pixels (even)")
    p.add_argument("--width", type=int, default=32, help="frame width in pixels (even; the demo uses 16: a portrait "
                                                         "frame the person fills)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    info = generate_humove_mini(
        args.out, args.clips, args.seed, heldout_fraction=args.heldout_fraction, codec=args.codec,
        codec_channels=args.codec_channels, vae_path=args.vae_path, text_encoder=args.text_encoder,
        text_encoder_path=args.text_encoder_path, raw=args.raw, motion_only_clips=args.motion_only_clips,
        latent_dtype=args.latent_dtype, num_frames=args.frames, height=args.height, width=args.width,
        batch_size=args.batch_size, progress=not args.no_progress,
    )
    print(f"humove-mini: {json.dumps(info['counts'])} written to {args.out} in {time.perf_counter() - t0:.1f} s")
    return info


if __name__ == "__main__":
    main()
