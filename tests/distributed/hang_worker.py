"""A hung collective: rank 0 enters an all-reduce that rank 1 never joins (it sleeps, then leaves).

    torchrun --nproc_per_node=2 tests/distributed/hang_worker.py TIMEOUT_S RECORDER_DIR

Rank 0 must fail after TIMEOUT_S with PyTorch's timeout error, not after the 30-minute default, and the flight recorder
(enabled by `init_distributed`) may leave its dump in RECORDER_DIR.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from echomotion.distributed import init_distributed  # noqa: E402


def main() -> None:
    timeout_s, recorder = float(sys.argv[1]), Path(sys.argv[2])
    env = init_distributed(timeout_s, recorder)
    dist.all_reduce(torch.ones(4))  # both ranks: the recorder's first entry completes
    if env.rank == 0:
        start = time.monotonic()
        try:
            dist.all_reduce(torch.ones(4))
        except Exception as e:  # the timeout; printed for the test, then re-raised so the rank exits non-zero
            print(f"rank 0 collective failed after {time.monotonic() - start:.1f} s: {type(e).__name__}: {e}", flush=True)
            raise
        print("rank 0 collective returned", flush=True)
    else:
        time.sleep(8 * timeout_s)


if __name__ == "__main__":
    main()
