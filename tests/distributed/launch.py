"""Launch a script under torchrun (gloo, CPU) from a test and collect each rank's output.

A run passes when it exits 0 (what a scheduler trusts: tools/exit_codes.py measured 50 of 50 clean two-rank trainings)
and every rank printed its done line ("rank <r> done").
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

from tests.s3_server import free_port

ROOT = Path(__file__).resolve().parents[2]


def child_env(extra: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """The environment for a child process: this checkout importable, one OpenMP thread per rank (2 shared cores)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(extra or {})}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def trainer_overrides(humove: Path, run_dir: Path, *extra: str) -> list[str]:
    """A tiny, fast training run on a test's HuMoVe-mini folder."""
    return [
        f"data.path={humove / 'train'}",
        f"data.stats_path={humove / 'motion_stats.json'}",
        f"data.null_text_path={humove / 'null_text.pt'}",
        "data.batch_size=2",
        "data.num_workers=0",
        "model.num_layers=1",
        "train.progress=false",
        f"train.run_dir={run_dir}",
        *extra,
    ]


@dataclass
class TorchrunResult:
    returncode: int
    output: str  # stdout and stderr of torchrun and all ranks, interleaved
    ranks_done: set[int]


def run_torchrun(
    script: str | Path,
    nproc: int,
    args: Sequence[str] = (),
    *,
    timeout: float = 180,
    env: Optional[Mapping[str, str]] = None,
    check: bool = True,
) -> TorchrunResult:
    """Run `script` on `nproc` local ranks. With check=True, fail unless it exited 0 and every rank printed
    "rank <r> done"."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(script), *args,
    ]
    # A session of its own, so that a timeout kills the ranks along with torchrun.
    proc = subprocess.Popen(cmd, env=child_env(env), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise AssertionError(f"torchrun {script} timed out after {timeout} s:\n{output[-6000:]}") from None
    done = {int(m) for m in re.findall(r"rank (\d+) done", output)}  # ranks may interleave a line
    result = TorchrunResult(proc.returncode, output, done)
    if check and (proc.returncode != 0 or done != set(range(nproc))):
        raise AssertionError(
            f"torchrun {script} (exit {proc.returncode}): ranks done {sorted(done)} of {nproc}:\n{output[-6000:]}"
        )
    return result


STREAM_WORKER = Path(__file__).with_name("stream_worker.py")


def run_stream_phases(out: Path, phases: list[dict], nproc: int, **kwargs) -> tuple[dict[str, list[dict]], str]:
    """Run stream_worker.py with these phases on `nproc` ranks; returns ({phase name: [record of each rank]}, the ranks'
    output). `kwargs` go to run_torchrun."""
    out.mkdir(parents=True, exist_ok=True)
    spec = out / "spec.json"
    spec.write_text(json.dumps({"out": str(out), "phases": phases}))
    result = run_torchrun(STREAM_WORKER, nproc, [str(spec)], **kwargs)
    records = {
        p["name"]: [json.loads((out / f"{p['name']}.rank{r}.json").read_text()) for r in range(nproc)] for p in phases
    }
    return records, result.output
