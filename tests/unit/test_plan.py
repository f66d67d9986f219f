"""The layout planner (parallel/plan.py) against the real model: exact parameter inventory, exact optimizer-state bytes
after an AdamW step, and activation bytes measured from what autograd saves on CPU."""
from __future__ import annotations

import json
import math

import pytest
import torch

from echomotion.config import ModelConfig, model_preset
from echomotion.models import EchoMotionDiT, Task
from echomotion.motion.smpl import MOTION_FEATURE_DIM
from parallel.activation import apply_activation_checkpointing
from parallel.tensor_parallel import expert_plan
from parallel.plan import (
    Candidate,
    Hardware,
    PlanError,
    Workload,
    activation_bytes,
    parameter_count,
    parameter_inventory,
    plan,
    state_bytes,
    token_counts,
)
from tests.tool_scripts import load_tool

plan_cli = load_tool("plan").main

SINGLE = Candidate(tp=1, sp=1, dp_shard=1, dp_replicate=1, ac="none")
VARIANTS = [
    [],
    ["model.num_layers=3", "model.dual_layers=odd", "model.task_hint=false"],
    ["model.dim=96", "model.num_heads=4", "model.ffn_dim=160", "model.motion.mlp_hidden=40", "model.patch_size=[1,1,1]"],
    ["model.in_channels=48", "model.out_channels=48", "model.text_dim=24", "model.freq_dim=64", "model.dual_layers=none"],
]


@pytest.mark.parametrize("overrides", VARIANTS)
def test_parameter_inventory_matches_the_model(overrides: list[str]) -> None:
    m = model_preset("tiny", overrides)
    model = EchoMotionDiT(m)
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert {p.name: p.shape for p in parameter_inventory(m)} == expected
    assert parameter_count(m) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("preset", ["wan2.1-1.3b", "wan2.2-5b"])
def test_parameter_count_of_the_presets(preset: str) -> None:
    m = model_preset(preset)
    with torch.device("meta"):
        model = EchoMotionDiT(m)
    assert parameter_count(m) == sum(p.numel() for p in model.parameters())


def test_tensor_parallel_split_follows_the_tp_plan() -> None:
    """Column-parallel: weight and bias split by rows; row-parallel: weight by columns; q/k norms sharded."""
    styles = {path: type(style).__name__ for path, style in expert_plan().items()}
    for p in parameter_inventory(model_preset("tiny")):
        if p.block is None:
            assert p.tp_dim is None, p.name
            continue
        module, _, leaf = p.name.split(".", 2)[2].removeprefix("motion.").rpartition(".")
        style = styles.get(module)
        if style == "ColwiseParallel":
            assert p.tp_dim == 0, p.name
        elif style == "RowwiseParallel":
            assert p.tp_dim == (1 if leaf == "weight" else None), p.name
        else:
            assert p.tp_dim == (0 if module.endswith(("norm_q", "norm_k")) else None), p.name


def test_parameter_gradient_and_optimizer_bytes_after_an_adamw_step() -> None:
    m = model_preset("tiny")
    torch.manual_seed(0)
    model = EchoMotionDiT(m)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    out = model(**inputs(m, batch=1, frames=9, height=64, width=64, motion_frames=3))
    (out.video.square().mean() + out.motion.square().mean()).backward()
    opt.step()
    measured = (
        sum(p.numel() * p.element_size() for p in model.parameters()),
        sum(p.grad.numel() * p.grad.element_size() for p in model.parameters()),
        sum(t.numel() * t.element_size() for state in opt.state.values() for t in state.values()),
    )
    assert state_bytes(m, SINGLE, Workload(9, 64, 64)) == measured


def test_state_bytes_shard_and_split() -> None:
    """FSDP2 shards dim 0 of every TP-local tensor, padded: a [1, 6, dim] table stays whole on each rank."""
    m = model_preset("wan2.2-5b")
    n = parameter_count(m)
    layout = Candidate(tp=2, sp=4, dp_shard=8, dp_replicate=1, ac="none")
    params, grads, optimizer = state_bytes(m, layout, Workload(121, 704, 1280))
    # 64 ways (TP 2 x FSDP 32) for the expert linears; what TP replicates (embeddings, heads, modulation, norm3) and the
    # padding are split only 32 ways: a little more than 8 bytes x n / 64 of AdamW moments
    assert 1 < optimizer / (8 * n / 64) < 1.05
    # params and grads add the gathered bf16 root and blocks (two blocks for params, one for grads)
    assert params - 4 * n / 64 > grads - 4 * n / 64 > 0


# ------------------------------------------------------------------------------------------------------ activations
ACT_MODEL = ["model.dim=96", "model.num_heads=4", "model.ffn_dim=160", "model.num_layers=4", "model.dual_layers=even"]
SHAPE = dict(frames=9, height=128, width=128, motion_frames=5)  # 3 x 8 x 8 video tokens, 255 motion tokens


def inputs(m: ModelConfig, batch: int, frames: int, height: int, width: int, motion_frames: int) -> dict:
    g = torch.Generator().manual_seed(0)
    latent = (1 + (frames - 1) // 4, height // 8, width // 8)
    return dict(
        video=torch.randn(batch, m.in_channels, *latent, generator=g),
        video_timestep=torch.full((batch,), 500.0),
        text=torch.randn(batch, m.text_len, m.text_dim, generator=g),
        motion=torch.randn(batch, motion_frames, MOTION_FEATURE_DIM, generator=g),
        motion_timestep=torch.full((batch,), 300.0),
        task=torch.full((batch,), int(Task.JOINT)),
    )


def measured_activation_bytes(m: ModelConfig, batch: int, precision: str, ac: str = "none", every: int = 2) -> int:
    """Unique storage bytes autograd keeps after a forward, parameters excluded.

    Checkpointing is the trainer's own (`parallel.activation`): non-reentrant `torch.utils.checkpoint` keeps a block's
    inputs (the residual streams, recorded here by a pre-hook; context, RoPE and modulation are held outside anyway)
    instead of what its ops save, and recomputes the rest in the backward.
    """
    torch.manual_seed(0)
    model = EchoMotionDiT(m)
    kept: dict[int, int] = {}

    def keep_inputs(block: torch.nn.Module, args: tuple) -> None:
        for stream in args[:2]:
            if stream is not None:
                kept[stream.x.untyped_storage().data_ptr()] = stream.x.untyped_storage().nbytes()

    for i in apply_activation_checkpointing(model, ac, every):
        model.blocks[i].register_forward_pre_hook(keep_inputs)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(**inputs(m, batch, **SHAPE))
    (out.video.sum() + out.motion.sum()).backward()  # the graph is complete and usable
    return sum(kept.values())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("batch", [1, 2])
def test_activation_bytes_without_checkpointing(precision: str, batch: int) -> None:
    """Measured within 0.3% on torch 2.14 CPU (flash SDPA kernel); 5% allows for kernel and version differences."""
    m = model_preset("tiny", ACT_MODEL)
    w = Workload(**SHAPE, micro_batch=batch, precision=precision)
    est = activation_bytes(m, w, SINGLE)
    assert est.recompute == 0
    assert est.saved == pytest.approx(measured_activation_bytes(m, batch, precision), rel=0.05)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("ac,every", [("full", 2), ("every_k", 2), ("every_k", 3)])
def test_activation_checkpointing_reduces_as_modelled(precision: str, ac: str, every: int) -> None:
    m = model_preset("tiny", ACT_MODEL)
    w = Workload(**SHAPE, micro_batch=2, precision=precision, ac_every=every)
    none = measured_activation_bytes(m, 2, precision)
    with_ac = measured_activation_bytes(m, 2, precision, ac, every)
    est_none = activation_bytes(m, w, SINGLE).saved
    est = activation_bytes(m, w, Candidate(ac=ac))
    assert est.saved == pytest.approx(with_ac, rel=0.05)
    assert est_none / est.saved == pytest.approx(none / with_ac, rel=0.05)
    assert 0 < est.recompute and est.peak < est_none  # the backward re-creates one checkpointed block at a time


def test_sequence_and_tensor_parallel_divide_the_block_activations() -> None:
    m = model_preset("wan2.2-5b")
    w = Workload(121, 704, 1280)
    one = activation_bytes(m, w, Candidate(tp=1, sp=1, dp_shard=64, dp_replicate=1, ac="none")).saved
    sp8 = activation_bytes(m, w, Candidate(tp=1, sp=8, dp_shard=8, dp_replicate=1, ac="none")).saved
    tp2 = activation_bytes(m, w, Candidate(tp=2, sp=1, dp_shard=32, dp_replicate=1, ac="none")).saved
    assert one / 8 < sp8 < one / 6  # embeddings, heads and text stay whole on every rank
    assert one / 2 < tp2 < one  # full-width tensors (residual, norms) stay whole under TP


# --------------------------------------------------------------------------------------------------------- planning
def test_tokens_of_the_standard_shapes() -> None:
    assert token_counts(model_preset("wan2.2-5b"), Workload(121, 704, 1280)) == (31 * 22 * 40, 121 * 51, 512)
    assert token_counts(model_preset("wan2.1-1.3b"), Workload(81, 480, 832)) == (21 * 30 * 52, 81 * 51, 512)


def test_5b_on_64_gpus_has_a_feasible_layout() -> None:
    estimates = plan(model_preset("wan2.2-5b"), 64, Workload(121, 704, 1280), Hardware(mem_gib=80))
    best = estimates[0]
    assert best.feasible and best.memory.total < 76 * 1024**3
    assert best.layout.world == 64 and best.tokens_per_s > 0
    times = [e.time.total for e in estimates if e.feasible]
    assert times == sorted(times)


@pytest.mark.parametrize("gpus", [8, 64])
def test_heads_not_divisible_by_tp_sp_are_never_proposed(gpus: int) -> None:
    """12 heads (Wan2.1-1.3B): tp 1 x sp 8 cannot split them."""
    estimates = plan(model_preset("wan2.1-1.3b"), gpus, Workload(81, 480, 832))
    assert any(e.feasible for e in estimates)
    for e in estimates:
        if 12 % (e.layout.tp * e.layout.sp):
            assert not e.feasible and "heads" in e.reasons
    assert all((e.layout.tp, e.layout.sp) != (1, 8) for e in estimates if e.feasible)


def test_memory_bound_layouts_are_excluded_with_the_reason() -> None:
    estimates = plan(model_preset("wan2.2-5b"), 8, Workload(121, 704, 1280), Hardware(mem_gib=16))
    assert not any(e.feasible for e in estimates)
    assert all("memory" in e.reasons for e in estimates if e.layout.tp * e.layout.sp in (1, 2))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(gpus=0), "gpus=0"),
        (dict(w=Workload(120, 704, 1280)), r"1 \+ 4k frames"),
        (dict(w=Workload(121, 700, 1280)), "multiple of 32"),
        (dict(w=Workload(121, 704, 1280, precision="fp16")), "precision"),
        (dict(hw=Hardware(mfu=1.5)), "mfu"),
    ],
)
def test_bad_inputs_are_named(kwargs: dict, message: str) -> None:
    args = dict(m=model_preset("wan2.2-5b"), gpus=8, w=Workload(121, 704, 1280), hw=Hardware()) | kwargs
    with pytest.raises(PlanError, match=message):
        plan(**args)


SHAPE_ARGS = ["--frames", "121", "--height", "704", "--width", "1280"]


def test_cli_prints_the_top_layouts(capsys: pytest.CaptureFixture) -> None:
    assert plan_cli(["--model", "wan2.2-5b", "--gpus", "64", "--gpu-mem", "80", *SHAPE_ARGS, "--top", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "27,280 video + 6,171 motion" in lines[0]
    assert lines[2].startswith("| tp | sp |") and len(lines) == 2 + 2 + 3


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--model", "wan9", "--gpus", "8"], "unknown model preset 'wan9'; choose one of ['tiny', 'wan2.1-1.3b', 'wan2.2-5b']"),
        (["--model", "wan2.2-5b", "--gpus", "0"], "gpus=0 must be a positive"),
        (["--model", "wan2.2-5b", "--gpus", "8", "--top", "0"], "--top=0"),
    ],
)
def test_cli_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    assert plan_cli([*argv, *SHAPE_ARGS]) == 2
    assert message in capsys.readouterr().err


def test_cli_json_lists_every_layout(capsys: pytest.CaptureFixture) -> None:
    shape = ["--frames", "81", "--height", "480", "--width", "832"]
    assert plan_cli(["--model", "wan2.1-1.3b", "--gpus", "8", *shape, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    layouts = report["layouts"]
    assert report["tokens"] == {"video": 32760, "motion": 4131, "text": 512}
    assert len(layouts) == len({(x["tp"], x["sp"], x["dp_shard"], x["dp_replicate"], x["ac"]) for x in layouts})
    assert all(math.isclose(sum(v for k, v in x["memory_gib"].items() if k != "total"), x["memory_gib"]["total"])
               for x in layouts)
