"""DeepSpeed ZeRO (`parallel.engine=deepspeed`) inside the same trainer computes the same training as one process, on gloo
under torchrun.

The reference is `layout_worker.py` run as a plain single process on the same global batch (as in test_layouts.py, whose
fixtures and comparisons this file shares). Covered: ZeRO-3 on 2 processes and ZeRO-3 + Ulysses sp 2 on 4 (dp_shard 2 x
sp 2), Phase 1 and Phase 2, on losses, global gradient norms and every parameter's full gradient after step 1; ZeRO-2 and
ZeRO-3 + cpu offload on losses and norms; ZeRO-3 in one process without a launcher; a ZeRO-3 checkpoint resumed exactly
and exported; a NaN loss skipped as one process skips it; the generated DeepSpeed config and its JSON overrides.
Gradient accumulation under ZeRO-3 is in test_layouts.py, next to FSDP's; the deepspeed launcher in
tests/ops/test_launch.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from echomotion.config import ConfigError, load_config
from echomotion.export import export_checkpoint, load_exported
from tests.distributed.launch import ROOT
from tests.distributed.test_layouts import (  # noqa: F401  (assets, reference: fixtures)
    LOSS_RTOL,
    assert_same_gradients,
    assert_same_steps,
    assets,
    check_layout,
    reference,
    run_layout,
)

ZERO = "parallel.engine=deepspeed"
LAYOUTS = {  # name: (processes, overrides)
    "zero3_2": (2, [ZERO]),
    "zero3_sp2": (4, [ZERO, "parallel.sp=2"]),
}


@pytest.mark.parametrize("phase", [1, 2])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_zero3_matches_one_process(name: str, phase: int, assets: list[str], reference: dict, tmp_path: Path) -> None:
    nproc, extra = LAYOUTS[name]
    check_layout(nproc, extra, phase, assets, reference, tmp_path)


@pytest.mark.parametrize("nproc, extra", [(2, ["parallel.zero_stage=2"]), (2, ["parallel.cpu_offload=true"]), (1, [])],
                         ids=["zero2", "zero3_offload", "zero3_one_process"])
def test_other_zero_setups_match_one_process(nproc: int, extra: list[str], assets: list[str], reference: dict,
                                             tmp_path: Path) -> None:
    """ZeRO-2 (gradients and optimizer state partitioned, parameters whole) and ZeRO-3 with `parallel.cpu_offload`
    (ZeRO-Offload of optimizer state and parameters, our torch AdamW stepping on the host) finish their gradients inside
    engine.step(), so only losses and DeepSpeed's global gradient norms are compared; ZeRO-3 in one process without a
    launcher (the engine starts a one-rank process group) also on gradients."""
    got = run_layout(assets, tmp_path / "run.pt", nproc, "train.phase=2", ZERO, *extra)
    assert_same_steps(got, reference[2], (1, 2, 3))
    if not extra:
        assert_same_gradients(got["grads"], reference[2]["grads"])


def test_zero3_checkpoint_resumes_and_exports(assets: list[str], reference: dict, tmp_path: Path) -> None:
    """ZeRO-3 on 2 processes: saved after step 2 (DeepSpeed's files inside our crash-safe step folder) and resumed with
    the same engine, steps 3 and 4 equal the uninterrupted ZeRO-3 run bit for bit (and one process within 1e-5); the
    checkpoint exports (zero_to_fp32) to the same weights one process has after step 2; resuming it under FSDP fails
    with what to do instead."""
    uninterrupted = run_layout(assets, tmp_path / "zero.pt", 2, "train.phase=2", ZERO, steps=4, save_at=2)
    ckpt = tmp_path / "zero" / "checkpoints" / "step-00000002"
    assert (ckpt / "meta.json").exists() and (ckpt / "deepspeed").is_dir()
    assert not list(ckpt.parent.glob("*.partial"))
    resumed = run_layout(assets, tmp_path / "resumed.pt", 2, "train.phase=2", ZERO, f"train.resume={ckpt}", steps=4)
    assert sorted(resumed["loss"]) == [3, 4]
    for s in (3, 4):
        assert (resumed["loss"][s], resumed["grad_norm"][s]) == (uninterrupted["loss"][s], uninterrupted["grad_norm"][s])
    assert_same_steps(resumed, reference[2], (3, 4))

    run_layout(assets, tmp_path / "one.pt", 1, "train.phase=2", steps=2, save_at=2)
    ours = load_exported(export_checkpoint(ckpt, tmp_path / "zero.safetensors"))[0].state_dict()
    want = load_exported(export_checkpoint(tmp_path / "one" / "checkpoints" / "step-00000002", tmp_path / "one.safetensors"))[0]
    assert_same_weights(ours, want.state_dict(), sum(reference[2]["lr"][s] for s in (1, 2)))
    with pytest.raises(AssertionError, match="written by parallel.engine=deepspeed; resume it with that engine"):
        run_layout(assets, tmp_path / "cross.pt", 1, "train.phase=2", f"train.resume={ckpt}", steps=3)


def test_zero3_skips_a_nan_step_like_one_process(assets: list[str], tmp_path: Path) -> None:
    """A NaN loss at step 2 of Phase 1: DeepSpeed's ZeRO optimizer sees a non-finite gradient norm, skips the update and
    drops the gradients; the trainer counts the skip. Step 3 then equals one process that skipped step 2 (same weights,
    same Adam step count, same learning-rate schedule), and so do the exported weights after step 3, the frozen video
    expert included (zero_to_fp32 rebuilds frozen parameters too). The run also JIT-builds no DeepSpeed op: an empty
    extensions folder stays empty."""
    fault = {"ECHOMOTION_FAULT_NAN_STEPS": "2"}
    want = run_layout(assets, tmp_path / "one.pt", 1, "train.phase=1", env=fault, save_at=3)
    extensions = tmp_path / "torch_extensions"
    got = run_layout(assets, tmp_path / "zero.pt", 2, "train.phase=1", ZERO, save_at=3,
                     env={**fault, "TORCH_EXTENSIONS_DIR": str(extensions)})
    for run in (got, want):
        assert run["skipped"] == {1: 0, 2: 1, 3: 1}
        assert run["loss"][2] != run["loss"][2]  # NaN, logged
    assert got["loss"][3] == pytest.approx(want["loss"][3], rel=LOSS_RTOL)
    assert got["grad_norm"][3] == pytest.approx(want["grad_norm"][3], rel=LOSS_RTOL)
    assert not extensions.exists() or not any(extensions.iterdir())

    step3 = Path("checkpoints") / "step-00000003"
    ours = load_exported(export_checkpoint(tmp_path / "zero" / step3, tmp_path / "zero.safetensors"))[0].state_dict()
    theirs = load_exported(export_checkpoint(tmp_path / "one" / step3, tmp_path / "one.safetensors"))[0].state_dict()
    assert_same_weights(ours, theirs, sum(want["lr"][s] for s in (1, 3)))


def assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], lr_sum: float) -> None:
    """Exported weights after a few AdamW steps against one process's: each tensor within 1e-5 of its norm. Not per
    element: Adam divides by the gradient's own magnitude, so an element whose gradient is near zero turns the round-off
    of a different reduction order into a visible step (seen: 1.5e-6 on a 0.2-sized weight, 2e-7 of the tensor's norm),
    while a wrong or missing update moves whole tensors by ~lr per element. A k-projection bias has an analytically zero
    gradient (softmax ignores a constant added to every key), so its steps are pure round-off of up to lr either way:
    bounded by the steps' learning rates."""
    assert set(got) == set(want)
    for name, value in want.items():
        diff = (got[name] - value).double()
        if name.endswith(".k.bias"):
            assert diff.abs().max() <= 2 * lr_sum, name
        else:
            assert diff.norm() <= LOSS_RTOL * value.double().norm(), f"{name}: {float(diff.norm() / value.double().norm()):.2e}"


# ------------------------------------------------------------------------------------------- generated DeepSpeed config
def test_deepspeed_config_is_generated_from_ours_and_json_overrides_merge(tmp_path: Path) -> None:
    from parallel.deepspeed_engine import deepspeed_config

    overrides = tmp_path / "ds.json"
    overrides.write_text(json.dumps({"zero_optimization": {"stage3_prefetch_bucket_size": 1000, "stage": "auto"},
                                     "gradient_clipping": "auto", "gradient_accumulation_steps": 4, "bf16": {"enabled": "auto"}}))
    cfg = load_config(ROOT / "configs/tiny.yaml", [
        ZERO, "parallel.zero_stage=2", "data.batch_size=3", "train.grad_accum=4", "train.grad_clip=2.0",
    ])
    generated = deepspeed_config(cfg)
    assert generated["train_micro_batch_size_per_gpu"] == 3
    assert generated["gradient_accumulation_steps"] == 4
    assert generated["gradient_clipping"] == 2.0
    assert generated["zero_optimization"] == {"stage": 2}
    assert generated["bf16"] == {"enabled": False}
    assert generated["zero_force_ds_cpu_optimizer"] is False  # our torch AdamW may step offloaded state
    cfg.parallel.cpu_offload = True
    assert deepspeed_config(cfg)["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": False}}
    cfg.parallel.zero_stage = 3
    assert deepspeed_config(cfg)["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": False}
    cfg.parallel.cpu_offload, cfg.parallel.zero_stage = False, 2

    cfg.parallel.deepspeed_config = str(overrides)
    merged = deepspeed_config(cfg)
    assert merged["zero_optimization"] == {"stage": 2, "stage3_prefetch_bucket_size": 1000}  # nested keys merged
    assert merged["gradient_clipping"] == 2.0 and merged["bf16"] == {"enabled": False}  # "auto": the trainer's value
    assert merged["train_micro_batch_size_per_gpu"] == 3 and merged["gradient_accumulation_steps"] == 4  # equal: fine

    overrides.write_text(json.dumps({"gradient_clipping": 0.5, "zero_optimization": {"stage": 3},
                                     "train_micro_batch_size_per_gpu": 3}))
    with pytest.raises(ConfigError) as refused:
        deepspeed_config(cfg)
    assert ("gradient_clipping=0.5 (the trainer's train.grad_clip makes it 2.0: set train.grad_clip instead)" in str(refused.value)
            and "zero_optimization.stage=3 (the trainer's parallel.zero_stage makes it 2: set parallel.zero_stage instead)"
            in str(refused.value) and "train_micro_batch_size_per_gpu" not in str(refused.value))

    overrides.write_text('{"zero_optimization": {"stage": 3,}}')
    with pytest.raises(ConfigError, match=r"ds\.json is not valid JSON"):
        deepspeed_config(cfg)
    overrides.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        deepspeed_config(cfg)
    overrides.write_text('{"optimizer": {"type": "Adam"}, "scheduler": {"type": "WarmupLR"}}')
    with pytest.raises(ConfigError, match=r"sets \['optimizer', 'scheduler'\], but the trainer owns"):
        deepspeed_config(cfg)


def test_invalid_deepspeed_settings_are_refused_at_load(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="parallel.zero_stage=4: choose 1, 2 or 3"):
        load_config(None, [ZERO, "parallel.zero_stage=4"])
    with pytest.raises(ConfigError, match="is not a file"):
        load_config(None, [ZERO, f"parallel.deepspeed_config={tmp_path / 'missing.json'}"])
    with pytest.raises(ConfigError, match="train.ema_decay > 0 keeps an EMA copy"):
        load_config(None, [ZERO, "train.ema_decay=0.999"])
    with pytest.raises(ConfigError, match="set parallel.dp_replicate=1"):
        load_config(None, [ZERO, "parallel.dp_replicate=2"])
