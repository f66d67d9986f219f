"""Starting, watching and stopping launcher processes from the ops tests."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Mapping, Optional

import psutil

from tests.distributed.launch import child_env, trainer_overrides  # noqa: F401 (re-exported for the ops tests)

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs/tiny.yaml")


def launcher(*args: str) -> list[str]:
    return [sys.executable, "-m", "launcher", *args]


def start(cmd: list[str], log: Path, env: Optional[Mapping[str, str]] = None) -> subprocess.Popen:
    """Output goes to a file (a pipe nobody reads would block a chatty run); a session of its own for clean kills."""
    with log.open("w") as fh:
        return subprocess.Popen(cmd, cwd=ROOT, env=child_env(env), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher and everything under it (torchrun's workers run in sessions of their own)."""
    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()


def wait_for(
    condition: Callable[[], bool], procs: list[subprocess.Popen], logs: list[Path], timeout: float, what: str | Callable[[], str]
) -> None:
    """Poll until `condition`; fail early, with the logs, if a process exits first or time runs out. `what` (or what it
    returns, asked at failure time) names the wait in the failure message."""
    deadline = time.time() + timeout
    while not condition():
        ended = [p for p in procs if p.poll() is not None]
        if ended or time.time() > deadline:
            tails = "\n".join(f"--- {log.name}:\n{log.read_text()[-4000:]}" for log in logs)
            for p in procs:
                kill_tree(p)
            reason = f"a process exited (code {ended[0].returncode})" if ended else f"{timeout:.0f} s passed"
            raise AssertionError(f"waiting for {what() if callable(what) else what}: {reason}\n{tails}")
        time.sleep(0.2)


def finish(procs: list[subprocess.Popen], logs: list[Path], ranks: int, timeout: float = 240) -> str:
    """Wait for every process; pass when each exited 0 and every rank printed its done line."""
    deadline = time.time() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for q in procs:
                kill_tree(q)
    out = "\n".join(log.read_text() for log in logs)
    assert [p.returncode for p in procs] == [0] * len(procs), f"exit codes {[p.returncode for p in procs]}:\n{out[-6000:]}"
    for r in range(ranks):
        assert f"rank {r} done" in out, f"rank {r} did not finish:\n{out[-6000:]}"
    return out


def stop(proc: subprocess.Popen, timeout: float = 120) -> None:
    """SIGTERM (torchrun forwards it: the trainer checkpoints and exits), then wait."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
