"""Raw clips (video + SMPL .npz + caption in a JSONL manifest) -> encoded MDS shards, resumable, across ranks.

    python tools/prepare_humove.py --manifest raw/manifest.jsonl --out data/prepared --smpl-model SMPL_NEUTRAL.pkl \
        --fps 16 --frames 17 --height 32 --width 32 [--codec wan-vae --vae-path P] [--text-encoder umt5 --text-encoder-path P]
    torchrun --nproc_per_node 8 tools/prepare_humove.py ... --out s3://bucket/humove   # S3_ENDPOINT_URL for MinIO/Ceph

Rerunning the same command resumes (finished clips are skipped); rejected clips are listed with their reason in
OUT/rejected.jsonl. Full description: docs/data.md.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from echomotion.data.prepare import main  # noqa: E402

if __name__ == "__main__":
    main()
