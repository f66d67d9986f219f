"""Check checkpoint folders against the sizes and CRC-32s their meta.json recorded when they were written.

    python tools/verify_checkpoint.py runs/p2/checkpoints/step-00001000 [more folders...]
    python tools/verify_checkpoint.py runs/p2                            # every complete checkpoint of a run

Exit 0 when every folder verifies, 1 when any does not (each problem printed), 2 for a path that is not a checkpoint.
A training run does the same for the checkpoint it resumes from (train.resume), in parallel over its ranks.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from echomotion.checkpoint import CheckpointManager, read_meta, verify  # noqa: E402


def folders(path: Path) -> list[Path]:
    """A checkpoint folder as given, or every complete checkpoint of a run directory."""
    if (path / "meta.json").is_file():
        return [path]
    found = CheckpointManager(path, 0, 0).complete()
    if not found:
        raise FileNotFoundError(f"{path} is neither a complete checkpoint (no meta.json) nor a run directory holding any")
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", type=Path, help="checkpoint folders or run directories")
    args = p.parse_args(argv)
    try:
        todo = [f for path in args.paths for f in folders(path)]
    except FileNotFoundError as e:
        print(f"verify_checkpoint: error: {e}", file=sys.stderr)
        return 2
    bad = 0
    for folder in todo:
        problems = verify(folder)
        recorded = "files" in read_meta(folder)
        status = "OK" if not problems and recorded else ("UNVERIFIED (written before checksums)" if not problems else "FAILED")
        print(f"{status}  {folder}")
        for problem in problems:
            print(f"    {problem}")
        bad += bool(problems)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
