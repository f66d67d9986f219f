"""Per-feature mean/std of the 235-d motion features over a shard folder, the normalization training loads.

    python tools/motion_stats.py --data data/humove-mini/train [--out data/humove-mini/motion_stats.json]

--data is a folder with index.json (local, or s3://... with S3_ENDPOINT_URL). The default --out is
DATA/motion_stats.json for a local folder.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from echomotion.data.shards import compute_motion_stats, is_remote  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="shard folder holding index.json")
    p.add_argument("--out", help="where to write the stats JSON (default DATA/motion_stats.json)")
    p.add_argument("--min-std", type=float, default=1e-2, help="std floor for constant features")
    args = p.parse_args(argv)
    if args.out is None and is_remote(args.data):
        p.error("--out is required when --data is remote")
    out = Path(args.out) if args.out else Path(args.data) / "motion_stats.json"
    stats = compute_motion_stats(args.data, min_std=args.min_std)
    stats.save(out)
    print(f"motion stats over {stats.count} frames ({stats.feature_dim} features) -> {out}")
    return out


if __name__ == "__main__":
    main()
