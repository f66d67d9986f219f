"""Fault injection for the tests, read from the environment once at start-up. Nothing here runs in a production run:
with no ECHOMOTION_FAULT_* variable set, `Faults.from_env()` is None and the trainer installs no hook.

- ECHOMOTION_FAULT_NAN_STEPS=2,3      those steps' loss becomes NaN (the skip / streak logic)
- ECHOMOTION_FAULT_KILL_DURING_SAVE=4 SIGKILL this process after its shards of step 4's checkpoint are written, before
                                      the checkpoint is marked complete (in the background thread of an async save)
- ECHOMOTION_FAULT_FAIL_SAVE=4        step 4's shard write raises OSError (a full disk) on this process
- ECHOMOTION_FAULT_SLOW_SAVE=2.5      every checkpoint write takes 2.5 s longer (a save in flight for a while)
- ECHOMOTION_FAULT_SLOW_RANK=1:0.3    rank 1 computes 0.3 s longer every step (a straggler)
"""
from __future__ import annotations

import errno
import os
import signal
import time
from dataclasses import dataclass
from typing import Optional

PREFIX = "ECHOMOTION_FAULT_"


@dataclass(frozen=True)
class Faults:
    nan_steps: frozenset[int] = frozenset()
    kill_during_save: Optional[int] = None
    fail_save: Optional[int] = None
    slow_save_s: float = 0.0
    slow_rank: Optional[tuple[int, float]] = None

    @classmethod
    def from_env(cls) -> Optional["Faults"]:
        env = {k[len(PREFIX):]: v for k, v in os.environ.items() if k.startswith(PREFIX)}
        if not env:
            return None
        slow_rank = env.get("SLOW_RANK")
        rank, delay = slow_rank.split(":") if slow_rank else (None, None)
        return cls(
            nan_steps=frozenset(int(s) for s in env.get("NAN_STEPS", "").split(",") if s),
            kill_during_save=int(env["KILL_DURING_SAVE"]) if "KILL_DURING_SAVE" in env else None,
            fail_save=int(env["FAIL_SAVE"]) if "FAIL_SAVE" in env else None,
            slow_save_s=float(env.get("SLOW_SAVE", 0)),
            slow_rank=(int(rank), float(delay)) if slow_rank else None,
        )

    def loss_is_nan(self, step: int) -> bool:
        return step in self.nan_steps

    def delay_compute(self, rank: int) -> None:
        if self.slow_rank is not None and self.slow_rank[0] == rank:
            time.sleep(self.slow_rank[1])

    def while_writing(self, step: int) -> None:
        """Inside a checkpoint write, before its shards are complete."""
        time.sleep(self.slow_save_s)
        if self.fail_save == step:
            raise OSError(errno.ENOSPC, f"No space left on device (ECHOMOTION_FAULT_FAIL_SAVE={step})")

    def after_shards(self, step: int) -> None:
        """Between this process's last shard file and the checkpoint's meta.json."""
        if self.kill_during_save == step:
            os.kill(os.getpid(), signal.SIGKILL)
