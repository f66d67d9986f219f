"""In CI (CI=true) a skipped test fails unless it is marked optional: a missing dev dependency or tool must not pass as
green (tests/conftest.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"
SKIPPING = '''
import pytest

def test_needs_a_tool():
    pytest.skip("the tool is not installed")

@pytest.mark.optional(reason="CUDA only")
def test_on_cuda():
    pytest.skip("no CUDA")
'''


@pytest.mark.parametrize("ci, failed, skipped", [("true", 1, 1), ("", 0, 2)])
def test_a_required_skip_fails_in_ci(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, ci: str, failed: int,
                                     skipped: int) -> None:
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makeini("[pytest]\nmarkers =\n    optional(reason): may skip\n")
    pytester.makepyfile(SKIPPING)
    monkeypatch.setenv("CI", ci)
    result = pytester.runpytest_inprocess("-rs")
    result.assert_outcomes(failed=failed, skipped=skipped)
    if failed:
        result.stdout.fnmatch_lines(["*skipped in CI, but this test is required: Skipped: the tool is not installed*"])
