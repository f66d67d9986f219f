"""parallel.activation: checkpointed blocks give the same loss and gradients, keep every name, and recompute in backward;
per-block compile matches eager."""
from __future__ import annotations

import copy
import shutil

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from echomotion.config import model_preset
from echomotion.models.echomotion import DualBlock, EchoMotionDiT, Task, VideoBlock
from echomotion.motion.smpl import MOTION_FEATURE_DIM
from parallel.activation import apply_activation_checkpointing, apply_compile, checkpointed_blocks


def tiny(num_layers: int = 3, dual_layers: str = "0,1") -> EchoMotionDiT:
    """Dual and video-only blocks, zero-initialized output layers made random so every gradient is non-trivial."""
    torch.manual_seed(0)
    model = EchoMotionDiT(model_preset("tiny", [f"model.num_layers={num_layers}", f"model.dual_layers={dual_layers}"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.train()


def batch() -> dict:
    g = torch.Generator().manual_seed(0)
    return dict(
        video=torch.randn(2, 16, 3, 4, 6, generator=g),
        video_timestep=torch.tensor([700.0, 30.0]),
        text=torch.randn(2, 16, 32, generator=g),
        motion=torch.randn(2, 5, MOTION_FEATURE_DIM, generator=g),
        motion_timestep=torch.tensor([250.0, 999.0]),
        motion_mask=torch.tensor([[True] * 5, [True] * 3 + [False] * 2]),
        task=torch.tensor([Task.JOINT, Task.M2V]),
    )


def loss_and_grads(model: EchoMotionDiT) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(**batch())
    loss = out.video.square().mean() + out.motion.square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_checkpointed_blocks_by_mode() -> None:
    assert checkpointed_blocks(5, "none", 2) == []
    assert checkpointed_blocks(5, "full", 2) == [0, 1, 2, 3, 4]
    assert checkpointed_blocks(5, "every_k", 2) == [0, 2, 4]
    assert checkpointed_blocks(5, "every_k", 3) == [0, 3]
    with pytest.raises(ValueError, match="parallel.activation_checkpointing"):
        checkpointed_blocks(5, "selective", 2)


@pytest.mark.parametrize("mode, chosen", [("full", [0, 1, 2]), ("every_k", [0, 2])])
def test_checkpointing_keeps_loss_gradients_and_names(mode: str, chosen: list[int]) -> None:
    plain = tiny()
    ref_loss, ref_grads = loss_and_grads(plain)
    model = copy.deepcopy(plain)
    assert apply_activation_checkpointing(model, mode, every=2) == chosen
    assert apply_activation_checkpointing(model, mode, every=2) == chosen  # applying twice wraps nothing twice

    calls = []
    model.blocks[0].self_attn.q.register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    loss, grads = loss_and_grads(model)
    assert len(calls) == 2, "block 0's forward did not run again in backward: nothing was checkpointed"

    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    assert grads.keys() == ref_grads.keys() == {n for n, p in plain.named_parameters()}
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-6, atol=1e-7, msg=name)

    assert [n for n, _ in model.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert list(model.state_dict()) == list(plain.state_dict())
    assert list(get_model_state_dict(model)) == list(get_model_state_dict(plain))
    assert model.dual_layers == plain.dual_layers == [0, 1]
    assert isinstance(model.blocks[0], DualBlock) and isinstance(model.blocks[2], VideoBlock)


def test_dcp_round_trip_between_checkpointed_and_plain_models(tmp_path) -> None:
    model = tiny()
    apply_activation_checkpointing(model, "full", 2)
    dcp.save(get_model_state_dict(model), checkpoint_id=tmp_path, no_dist=True)
    plain = tiny()
    with torch.no_grad():
        for p in plain.parameters():
            p.zero_()
    state = get_model_state_dict(plain)
    dcp.load(state, checkpoint_id=tmp_path, no_dist=True)
    plain.load_state_dict(state)
    for (name, a), b in zip(model.state_dict().items(), plain.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def _cxx_compiler() -> str | None:
    return next((c for c in ("g++", "c++", "clang++") if shutil.which(c)), None)


@pytest.mark.optional(reason="inductor needs a C++ compiler on the machine")
@pytest.mark.skipif(_cxx_compiler() is None, reason="no C++ compiler (g++, c++ or clang++): inductor cannot build CPU kernels")
def test_compiled_checkpointed_blocks_match_eager() -> None:
    """The trainer's order: checkpointing, then compile. Two blocks (a checkpointed dual block, a plain video block): two
    graphs, about a minute of inductor time on 2 cores."""
    eager = tiny(num_layers=2, dual_layers="0")
    ref_loss, ref_grads = loss_and_grads(eager)
    model = copy.deepcopy(eager)
    apply_activation_checkpointing(model, "every_k", 2)
    apply_compile(model)
    loss, grads = loss_and_grads(model)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-5, msg=name)
    assert list(model.state_dict()) == list(eager.state_dict())
