"""AMASS-style SMPL(-H) .npz clips (+ HumanML3D-style captions) -> motion-only MDS shards for Phase 1, resumable, across ranks.

    python tools/prepare_motion.py --input amass/ --texts humanml3d/texts/ --out data/motion --smpl-model SMPL_NEUTRAL.pkl
    torchrun --nproc_per_node 8 tools/prepare_motion.py ... --out s3://bucket/motion   # S3_ENDPOINT_URL for MinIO/Ceph

Rerunning the same command resumes; rejected clips are listed with their reason in OUT/rejected.jsonl. Frame rate,
the SMPL-H -> SMPL mapping and the caption format: echomotion/data/prepare_motion.py and docs/data.md.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from echomotion.data.prepare_motion import main  # noqa: E402

if __name__ == "__main__":
    main()
