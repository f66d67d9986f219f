"""One HuMoVe-mini for all ops tests (generating it takes ~10 s)."""
from __future__ import annotations

from pathlib import Path

import pytest

from echomotion.data.synthetic import generate_humove_mini


@pytest.fixture(scope="session")
def humove(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ops-humove") / "mini"
    generate_humove_mini(out, clips=16, num_frames=9, progress=False)
    return out
