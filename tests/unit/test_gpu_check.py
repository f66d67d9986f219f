"""tools/gpu_check.py, the GPU validation kit, cannot rot between the rare GPU runs: its --dry-run goes through the same
code on the CPU at tiny shapes (block rows, FP8 rows, training and sampling comparisons) and must pass here."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.tool_scripts import load_tool

gpu_check = load_tool("gpu_check")


def test_dry_run_measures_every_section_and_passes(tmp_path: Path) -> None:
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["environment"]["torch"] == torch.__version__
    rows = {r["variant"]: r for r in result["blocks"]}
    # the block's FLOPs, by hand for the tiny preset (dim 64, ffn 128, 16 text tokens; 3 x 8 x 8 latent / (1, 2, 2)
    # patches = 48 video tokens, 9 frames x 51 = 459 motion tokens): per expert q/k/v/o 8 D^2 L, cross q/o 4 D^2 L,
    # cross k/v 4 D^2 L_t, FFN 4 D F L, cross scores/values 4 L L_t D; joint attention 4 (L_v + L_m)^2 D; x3 for backward
    d, f, lt, lv, lm = 64, 128, 16, 48, 459
    expert = [8 * d * d * n + 4 * d * d * n + 4 * d * d * lt + 4 * d * f * n + 4 * n * lt * d for n in (lv, lm)]
    assert rows["bf16 sdpa-math"]["step_flops"] == 3 * (sum(expert) + 4 * (lv + lm) ** 2 * d)
    assert rows["fp8-torchao"]["seconds_median"] > 0
    assert rows["fp8-te"]["skipped"].startswith("not importable")  # never faked on a machine without TE
    checks = result["training"]["checks"]
    assert set(checks) == {"cpu bf16 vs cpu fp32", "cpu fp8-torchao vs cpu bf16"} and all(c["passed"] for c in checks.values())
    assert all(r["passed"] for r in result["sampling"].values())
    assert "## Tiny model, 4 training steps" in (tmp_path / "gpu_check.md").read_text()


def test_the_loss_comparison_fails_beyond_its_tolerance() -> None:
    ref = {"losses": [1.0, 2.0, 3.0]}
    assert gpu_check.compare({"losses": [1.0, 2.0, 3.0]}, ref, 0.05)["passed"]
    assert not gpu_check.compare({"losses": [1.1, 2.2, 3.3]}, ref, 0.05)["passed"]  # 10% off


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without CUDA gets")
def test_without_cuda_the_real_run_stops_and_names_the_dry_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    assert "--dry-run" in capsys.readouterr().err
