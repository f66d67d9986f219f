"""Count the exit codes of N short two-rank trainings (torchrun, gloo on CPU): a scheduler restarts a job whose exit code
is non-zero, so a run that trained correctly must exit 0 every time.

    python tools/exit_codes.py --runs 50 [--nproc 2] [--work /tmp/exit-codes] [key=value ...]

Each run trains `train.steps=2` of the tiny config on a generated HuMoVe-mini in a fresh run folder. Prints one line per
run and a summary (exit code -> count); a non-zero run's output is kept in <work>/run-<i>.log. Exits 1 unless all runs
exited 0.
"""
from __future__ import annotations

import argparse
import collections
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_run(i: int, work: Path, data: Path, nproc: int, extra: list[str]) -> int:
    """One training under torchrun; returns its exit code (the log is kept when it is not 0)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "echomotion.train",
           "--config", str(ROOT / "configs/tiny.yaml"), f"data.path={data / 'train'}",
           f"data.stats_path={data / 'motion_stats.json'}", f"data.null_text_path={data / 'null_text.pt'}",
           "data.batch_size=2", "data.num_workers=0", "model.num_layers=1", "train.progress=false", "train.steps=2",
           f"train.run_dir={work / f'run-{i}'}", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        (work / f"run-{i}.log").write_text(proc.stdout + proc.stderr)
    return proc.returncode


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--work", default="/tmp/echomotion-exit-codes", help="run folders, the dataset and failed runs' logs")
    p.add_argument("overrides", nargs="*", help="extra trainer overrides")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from echomotion.data.synthetic import generate_humove_mini

    work = Path(args.work)
    data = work / "humove"
    if not (data / "null_text.pt").exists():
        generate_humove_mini(data, clips=16, num_frames=9, progress=False)
    codes: collections.Counter[int] = collections.Counter()
    start = time.time()
    for i in range(args.runs):
        code = one_run(i, work, data, args.nproc, args.overrides)
        codes[code] += 1
        print(f"run {i + 1}/{args.runs}: exit {code}", flush=True)
    summary = ", ".join(f"exit {c}: {n}" for c, n in sorted(codes.items()))
    print(f"{args.runs} runs of {args.nproc} ranks in {time.time() - start:.0f} s: {summary}")
    return 0 if set(codes) == {0} else 1


if __name__ == "__main__":
    sys.exit(main())
