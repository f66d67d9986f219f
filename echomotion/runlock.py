"""One job per run directory, and no worker outliving its launcher.

Two jobs writing the same run_dir (a second launch by mistake, or a restarted job while the old worker still runs) would
race on checkpoints and metrics. Rank 0 holds an exclusive `flock` on run_dir/.lock for the job's life; a second job stops
at start-up naming the holder (host, pid, start time, from the lock file). The kernel drops a flock when its holder dies,
however it dies, so a stale lock needs no clean-up: the next job takes it and rewrites the holder. Caveat: flock is
reliable between processes of one host; on NFS (Linux >= 2.6.12 maps it to POSIX byte-range locks through lockd) it
works across hosts only where the server and every client run lockd, and a client that loses its lease loses the lock
silently (docs/operations.md, "Failure modes").
"""
from __future__ import annotations

import ctypes
import datetime
import fcntl
import json
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Optional

from .config import ConfigError

LOCK_NAME = ".lock"
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class RunDirInUse(RuntimeError):
    """Another live job holds the run directory; the message names it and the fix."""


class RunDirLock:
    """An exclusive flock on run_dir/.lock, held until `release` or the process ends."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.fd: Optional[int] = None

    def acquire(self) -> "RunDirLock":
        """Take the lock and record this holder; RunDirInUse if a live job holds it."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited across exec (O_CLOEXEC by default)
        except OSError as e:
            raise ConfigError(f"train.run_dir={self.path.parent}: cannot create {self.path}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.read(fd, 4096))
            os.close(fd)
            raise RunDirInUse(
                f"train.run_dir={self.path.parent} is in use by another job ({holder}; lock {self.path}): wait for it to "
                "end or stop it, or give this run another train.run_dir"
            ) from None
        holder = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(holder).encode())
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        """Drop the lock; the file stays (unlinking it would let a new job lock a fresh file while another waits on the
        old one)."""
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _describe(raw: bytes) -> str:
    try:
        h = json.loads(raw)
        return f"host {h['host']}, pid {h['pid']}, started {h['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder not recorded yet"


def exit_with_parent() -> None:
    """Under a launcher (torchrun, the deepspeed launcher), on Linux: SIGKILL this worker when its launcher dies, so no
    worker whose agent was killed runs on as an orphan writing into the run directory. The kernel signals when the
    parent *thread* that started us exits; torchrun's agent starts workers from its main thread, which lives as long as
    the agent. A plain `python -m echomotion.train` is left alone (its parent is a shell a user may leave)."""
    if not sys.platform.startswith("linux") or not {"TORCHELASTIC_RUN_ID", "LOCAL_RANK"} & set(os.environ):
        return
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return  # refused (a seccomp sandbox): the launcher's own kill of its workers is then the only guard
    if os.getppid() == 1:  # the launcher died before the prctl took effect (we were re-parented to init)
        os.kill(os.getpid(), signal.SIGKILL)
