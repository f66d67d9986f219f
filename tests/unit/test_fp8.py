"""parallel.fp8 on a CPU machine: parallel.fp8=te stops with an actionable error; the swap covers exactly the expert
linears; and, with a stand-in for Transformer Engine (same constructor, same row-divisibility rule), the swap keeps names,
weights, frozen flags and the model's function, padding the rows TE's FP8 GEMMs cannot take."""
from __future__ import annotations

import copy
import sys
import types
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from echomotion.config import ParallelConfig, model_preset
from echomotion.models.echomotion import EchoMotionDiT, Task
from echomotion.motion.smpl import MOTION_FEATURE_DIM
from parallel.fp8 import check_fp8_available, convert_to_fp8, convert_to_te, fp8_autocast, te_linear_paths


def tiny(dual_layers: str = "0,2") -> EchoMotionDiT:
    """Three layers, dual and video-only; zero-initialized output layers made random so every path carries signal."""
    torch.manual_seed(0)
    model = EchoMotionDiT(model_preset("tiny", ["model.num_layers=3", f"model.dual_layers={dual_layers}"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def test_fp8_te_on_cpu_names_the_key_what_is_missing_and_the_fix() -> None:
    with pytest.raises(RuntimeError) as err:
        check_fp8_available(ParallelConfig(fp8="te"), torch.device("cpu"))
    msg = str(err.value)
    for needed in ("parallel.fp8=te", "CUDA", "Transformer Engine", "pip install 'echomotion[gpu]'", "parallel.fp8=none"):
        assert needed in msg, f"{needed!r} missing from: {msg}"


def test_fp8_none_needs_nothing() -> None:
    check_fp8_available(ParallelConfig(fp8="none"), torch.device("cpu"))
    with fp8_autocast(ParallelConfig(fp8="none")):
        pass


@pytest.mark.parametrize("dual_layers", ["0,2", "all", "none"])
def test_swap_list_is_exactly_the_expert_linears(dual_layers: str) -> None:
    model = tiny(dual_layers)
    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    # brute force: in these blocks every nn.Linear is an expert linear; everything else (embeddings, time projection, task
    # hint, motion MLPs, heads) lives outside `blocks.`
    expected = {name for name in linears if name.startswith("blocks.")}
    paths = te_linear_paths(model)
    assert len(paths) == len(set(paths)) and set(paths) == expected
    dual = set(model.dual_layers)
    assert sum(".motion." in p for p in paths) == 10 * len(dual)
    assert all(int(p.split(".")[1]) in dual for p in paths if ".motion." in p)
    assert not any("modulation" in p or "norm" in p for p in paths)
    assert {"head.head", "text_embedding.0", "time_projection.1"} <= linears - set(paths)


# --------------------------------------------------------------------------------------- a stand-in Transformer Engine
@dataclass
class FakeRecipe:
    kind: str
    fp8_format: str


def fake_transformer_engine() -> dict[str, types.ModuleType]:
    """`transformer_engine.pytorch.Linear` with TE's constructor and its FP8 shape rule (rows of the flattened input
    divisible by 8), an `autocast` that records its recipe, and `transformer_engine.common.recipe`."""
    te = types.ModuleType("transformer_engine.pytorch")

    class Linear(nn.Linear):
        def __init__(self, in_features: int, out_features: int, bias: bool = True, *, params_dtype=None, device=None):
            super().__init__(in_features, out_features, bias=bias, dtype=params_dtype, device=device)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            assert x.shape[:-1].numel() % 8 == 0, f"FP8 GEMM rows not divisible by 8: {list(x.shape)}"
            return super().forward(x)

    te.Linear = Linear
    te.calls = []
    te.autocast = lambda **kw: te.calls.append(kw) or torch.autocast("cpu", enabled=False)
    recipe = types.ModuleType("transformer_engine.common.recipe")
    recipe.Format = types.SimpleNamespace(HYBRID="hybrid")
    recipe.DelayedScaling = lambda fp8_format: FakeRecipe("delayed", fp8_format)
    recipe.Float8CurrentScaling = lambda fp8_format: FakeRecipe("current", fp8_format)
    root, common = types.ModuleType("transformer_engine"), types.ModuleType("transformer_engine.common")
    root.pytorch, root.common, common.recipe = te, common, recipe
    return {"transformer_engine": root, "transformer_engine.pytorch": te, "transformer_engine.common": common,
            "transformer_engine.common.recipe": recipe}


@pytest.fixture
def fake_te(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    modules = fake_transformer_engine()
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return modules["transformer_engine.pytorch"]


def test_convert_keeps_names_weights_frozen_flags_and_function(fake_te: types.ModuleType) -> None:
    plain = tiny()
    for name, p in plain.named_parameters():  # Phase 1: video experts frozen
        p.requires_grad_(".motion." in name or not name.startswith("blocks."))
    model = copy.deepcopy(plain)
    swapped = convert_to_te(model, "delayed")
    assert swapped == te_linear_paths(plain)
    assert all(isinstance(model.get_submodule(p), fake_te.Linear) for p in swapped)
    assert not any(isinstance(m, fake_te.Linear) for n, m in model.named_modules() if n not in swapped)

    assert list(model.state_dict()) == list(plain.state_dict())
    for (name, a), (_, b) in zip(model.named_parameters(), plain.named_parameters()):
        assert a.requires_grad == b.requires_grad, name
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)

    # 2 x 5 frames x 51 = 510 motion rows (not divisible by 8): the swapped linears must pad them
    g = torch.Generator().manual_seed(0)
    kw = dict(video=torch.randn(2, 16, 2, 4, 4, generator=g), video_timestep=torch.tensor([700.0, 30.0]),
              text=torch.randn(2, 16, 32, generator=g), motion=torch.randn(2, 5, MOTION_FEATURE_DIM, generator=g),
              motion_timestep=torch.tensor([250.0, 999.0]), task=torch.tensor([Task.JOINT, Task.V2M]))
    outs = []
    for m in (plain, model):
        out = m(**kw)
        (out.video.square().mean() + out.motion.square().mean()).backward()
        outs.append((out, {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    (ref, ref_grads), (got, grads) = outs
    torch.testing.assert_close(got.video, ref.video, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.motion, ref.motion, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("recipe", ["delayed", "current"])
def test_autocast_builds_the_configured_recipe(fake_te: types.ModuleType, recipe: str) -> None:
    with fp8_autocast(ParallelConfig(fp8="te", fp8_recipe=recipe)):
        pass
    (call,) = fake_te.calls
    assert call["enabled"] and call["recipe"] == FakeRecipe(recipe, "hybrid") and call["amax_reduction_group"] is None


# ------------------------------------------------------------------------------------------- torchao, the real library
def test_torchao_swap_keeps_names_and_quantizes_only_the_expert_linears() -> None:
    """The real torchao Float8Linear on CPU (its float8 matmul is emulated there): exactly the expert linears change
    class, names, weights and state_dict keys stay, and the model's output moves by FP8 rounding, not more."""
    from torchao.float8.float8_linear import Float8Linear

    plain = tiny()
    model = copy.deepcopy(plain)
    swapped = convert_to_fp8(model, ParallelConfig(fp8="torchao"))
    assert swapped == te_linear_paths(plain)
    assert {n for n, m in model.named_modules() if isinstance(m, Float8Linear)} == set(swapped)
    assert list(model.state_dict()) == list(plain.state_dict())
    for (name, a), (_, b) in zip(model.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)

    g = torch.Generator().manual_seed(0)  # 2 x 5 frames x 51 = 510 motion rows: not a multiple of 16
    kw = dict(video=torch.randn(2, 16, 2, 4, 4, generator=g), video_timestep=torch.tensor([700.0, 30.0]),
              text=torch.randn(2, 16, 32, generator=g), motion=torch.randn(2, 5, MOTION_FEATURE_DIM, generator=g),
              motion_timestep=torch.tensor([250.0, 999.0]), task=torch.tensor([Task.JOINT, Task.V2M]))
    ref, got = plain(**kw), model(**kw)
    (got.video.square().mean() + got.motion.square().mean()).backward()
    for a, b in ((got.video, ref.video), (got.motion, ref.motion)):
        rel = float((a - b).norm() / b.norm())
        # e4m3 keeps 3 mantissa bits (relative rounding up to 1/16 per element); 0 would mean nothing was quantized
        assert 1e-4 < rel < 0.1, rel
    assert all(model.get_submodule(p).weight.grad is not None for p in swapped)


@pytest.mark.parametrize("overrides, problem", [
    ({"fp8": "torchao", "fp8_recipe": "delayed"}, "parallel.fp8_recipe='delayed' with parallel.fp8=torchao"),
    ({"fp8": "te", "fp8_recipe": "rowwise"}, "parallel.fp8_recipe='rowwise' with parallel.fp8=te"),
    ({"fp8": "torchao", "tp": 2}, "parallel.fp8=torchao with parallel.tp > 1"),
    ({"fp8": "fp4"}, "parallel.fp8='fp4'"),
])
def test_fp8_config_problems_name_the_fix(overrides: dict, problem: str) -> None:
    from echomotion.config import _fp8_problems

    problems = _fp8_problems(ParallelConfig(**overrides))
    assert any(problem in p for p in problems), problems


def test_fp8_recipe_defaults_per_backend() -> None:
    from echomotion.config import fp8_recipe

    assert fp8_recipe(ParallelConfig(fp8="te")) == "delayed"
    assert fp8_recipe(ParallelConfig(fp8="torchao")) == "current"
    assert fp8_recipe(ParallelConfig(fp8="torchao", fp8_recipe="rowwise")) == "rowwise"
