"""A hung collective fails after `train.collective_timeout`, not after PyTorch's 30 minutes (2 gloo ranks)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from echomotion.config import ConfigError, load_config
from tests.distributed.launch import ROOT, run_torchrun


def test_a_hung_collective_fails_after_the_configured_timeout(tmp_path: Path) -> None:
    """Rank 1 never joins rank 0's all-reduce. With a 3 s timeout rank 0 fails with PyTorch's timeout error well inside
    this test's 120 s limit (the 30-minute default would exceed it), and torchrun reports the job as failed."""
    res = run_torchrun(ROOT / "tests/distributed/hang_worker.py", 2, ["3", str(tmp_path / "flight_recorder")],
                       timeout=120, check=False)
    assert res.returncode != 0, res.output[-3000:]
    failed = re.search(r"rank 0 collective failed after [\d.]+ s: (.*)", res.output)
    assert failed, res.output[-3000:]
    assert re.search(r"time(d)? ?out", failed[1], re.IGNORECASE), failed[0]
    assert "rank 0 collective returned" not in res.output


def test_the_collective_timeout_must_be_positive() -> None:
    with pytest.raises(ConfigError, match=r"train.collective_timeout=0.0 must be > 0 seconds"):
        load_config(ROOT / "configs/tiny.yaml", ["train.collective_timeout=0"])
