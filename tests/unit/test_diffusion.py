"""Flow matching, training tasks, guidance (paper Eq. 4-6) and solvers, checked against independent references."""
from __future__ import annotations

import math

import pytest
import torch

from echomotion.config import Config, DiffusionConfig, SampleConfig, model_preset
from echomotion.diffusion import (
    Request,
    TrainingBatch,
    add_noise,
    build_inputs,
    flow_loss,
    guided_velocity,
    integrate,
    sample,
    sample_sigmas,
    sampling_sigmas,
    shift_sigma,
    training_loss,
    velocity_target,
)
from echomotion.diffusion.sampler import check_motion_length
from echomotion.export import load_exported, save_exported
from echomotion.models import EchoMotionDiT, Task
from echomotion.motion.smpl import MOTION_FEATURE_DIM

FEATURES = MOTION_FEATURE_DIM
TEXT_LEN, TEXT_DIM = 6, 32


# ------------------------------------------------------------------------------------------------------------ schedule
def brute_force_shift(sigma: float, shift: float) -> float:
    """Independent definition: the shift multiplies the noise-to-signal ratio sigma / (1 - sigma) by `shift`; find sigma'
    with that ratio by bisection."""
    if sigma >= 1.0:
        return 1.0
    want = shift * sigma / (1.0 - sigma)
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if mid / (1 - mid) < want:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@pytest.mark.parametrize("shift", [1.0, 3.0, 8.0, 0.5])
def test_shift_matches_brute_force(shift):
    grid = torch.linspace(0, 1, 41, dtype=torch.float64)
    got = shift_sigma(grid, shift)
    want = torch.tensor([brute_force_shift(float(s), shift) for s in grid], dtype=torch.float64)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    assert shift_sigma(0.25, shift) == pytest.approx(brute_force_shift(0.25, shift), abs=1e-12)


@pytest.mark.parametrize("steps,shift", [(1, 8.0), (7, 1.0), (50, 8.0)])
def test_sampling_sigmas_endpoints_and_monotonic(steps, shift):
    s = sampling_sigmas(steps, shift)
    assert s.shape == (steps + 1,)
    assert s[0].item() == 1.0 and s[-1].item() == 0.0
    assert bool((s[1:] < s[:-1]).all())
    if shift == 1.0:
        torch.testing.assert_close(s, torch.linspace(1, 0, steps + 1, dtype=torch.float64))


def test_sample_sigmas_distribution_and_reproducibility():
    """sigma = shift(u), u ~ U(0, 1)  =>  P(sigma <= a) = shift^-1(a) = a / (shift - (shift - 1) a)."""
    shift, n = 8.0, 40_000
    s = sample_sigmas(n, shift, torch.Generator().manual_seed(3))
    assert s.dtype == torch.float32 and bool(((s >= 0) & (s <= 1)).all())
    for a in (0.2, 0.5, 0.8, 0.95):
        assert (s <= a).float().mean().item() == pytest.approx(a / (shift - (shift - 1) * a), abs=0.01)
    torch.testing.assert_close(s, sample_sigmas(n, shift, torch.Generator().manual_seed(3)), rtol=0, atol=0)


def test_add_noise_and_target_algebra():
    g = torch.Generator().manual_seed(0)
    data, noise = (torch.randn(3, 4, 5, generator=g, dtype=torch.float64) for _ in range(2))
    sigma = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    x, v = add_noise(data, noise, sigma), velocity_target(data, noise)
    s = sigma[:, None, None]
    torch.testing.assert_close(x - s * v, data)
    torch.testing.assert_close(x + (1 - s) * v, noise)
    torch.testing.assert_close(x[0], data[0])
    torch.testing.assert_close(x[2], noise[2])


def test_flow_loss_masks_like_an_explicit_loop():
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(3, 5, 7, generator=g), torch.randn(3, 5, 7, generator=g)
    weight = torch.tensor([1.0, 0.0, 1.0])
    frames = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0]], dtype=torch.bool)
    errors = [((pred[b, f] - target[b, f]) ** 2).tolist() for b in range(3) for f in range(5) if weight[b] and frames[b, f]]
    want = sum(sum(e) for e in errors) / sum(len(e) for e in errors)
    assert flow_loss(pred, target, weight, frames).item() == pytest.approx(want, rel=1e-6)
    p = pred.clone().requires_grad_(True)
    nothing = flow_loss(p, target, torch.zeros(3), frames)
    nothing.backward()
    assert nothing.item() == 0.0 and p.grad is not None and not bool(p.grad.any())


# ------------------------------------------------------------------------------------------------------------ tasks
def _batch(b: int, frames: int = 4, video=(2, 1, 2, 2), seed: int = 0) -> TrainingBatch:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, frames, dtype=torch.bool)
    mask[0, -1] = False
    return TrainingBatch(
        text=torch.randn(b, TEXT_LEN, TEXT_DIM, generator=g),
        motion=torch.randn(b, frames, FEATURES, generator=g),
        motion_mask=mask,
        video=torch.randn(b, *video, generator=g) if video is not None else None,
    )


def _cfg(task: Task | None = None, drop: float = 0.0, **kw) -> DiffusionConfig:
    probs = [0.4, 0.3, 0.3] if task is None else [float(task == t) for t in (Task.JOINT, Task.M2V, Task.V2M)]
    drops = dict(joint_text_drop=drop, m2v_text_drop=drop, m2v_motion_drop=drop, v2m_video_drop=drop, t2m_text_drop=drop)
    return DiffusionConfig(task_probs=probs, **{**drops, **kw})


NULL = torch.full((TEXT_LEN, TEXT_DIM), -7.0)


def _is_null(text: torch.Tensor) -> torch.Tensor:
    return (text == -7.0).all(dim=(1, 2))


@pytest.mark.parametrize("task", [Task.T2M, Task.JOINT, Task.M2V, Task.V2M], ids=lambda t: t.name)
@pytest.mark.parametrize("drop", [0.0, 1.0])
def test_build_inputs_per_task(task, drop):
    b = 3
    batch = _batch(b)
    phase = 1 if task == Task.T2M else 2
    inp = build_inputs(batch, phase, _cfg(None if task == Task.T2M else task, drop), NULL, torch.Generator().manual_seed(5))
    assert inp.task.tolist() == [int(task)] * b
    sig_m = inp.motion_timestep / 1000
    # text: always null in V2M, else null exactly when dropped
    assert _is_null(inp.text).tolist() == [task == Task.V2M or drop == 1.0] * b
    # generated modalities: x = data + sigma * target noise relation; conditions: clean data at timestep 0, weight 0
    gen_motion = task != Task.M2V
    assert inp.motion_weight.tolist() == [float(gen_motion)] * b
    if gen_motion:
        torch.testing.assert_close(inp.motion - sig_m[:, None, None] * inp.motion_target, batch.motion)
        assert bool((sig_m > 0).all())
    else:
        assert inp.motion_timestep.tolist() == [0.0] * b
        torch.testing.assert_close(inp.motion, batch.motion, rtol=0, atol=0)
    dropped_motion = task == Task.M2V and drop == 1.0
    torch.testing.assert_close(inp.motion_mask, batch.motion_mask & (not dropped_motion), rtol=0, atol=0)
    torch.testing.assert_close(inp.motion_loss_mask, batch.motion_mask, rtol=0, atol=0)
    if task == Task.T2M:
        assert inp.video is None and inp.kwargs()["video"] is None
        return
    sig_v = inp.video_timestep / 1000
    gen_video = task != Task.V2M
    assert inp.video_weight.tolist() == [float(gen_video)] * b
    if gen_video:
        torch.testing.assert_close(inp.video - sig_v.view(-1, 1, 1, 1, 1) * inp.video_target, batch.video)
    else:
        assert inp.video_timestep.tolist() == [0.0] * b
        torch.testing.assert_close(inp.video, batch.video, rtol=0, atol=0)
    if task == Task.JOINT:
        torch.testing.assert_close(sig_v, sig_m, rtol=0, atol=0)  # joint: one sigma for both modalities
    assert inp.video_mask.tolist() == [not (task == Task.V2M and drop == 1.0)] * b


def test_build_inputs_rates_and_reproducibility():
    n = 6000
    batch = _batch(n, frames=1, video=(1, 1, 1, 1))
    batch.motion_mask[0] = True
    cfg = _cfg(joint_text_drop=0.1, m2v_text_drop=0.2, m2v_motion_drop=0.3, v2m_video_drop=0.4)
    inp = build_inputs(batch, 2, cfg, NULL, torch.Generator().manual_seed(11))
    again = build_inputs(batch, 2, cfg, NULL, torch.Generator().manual_seed(11))
    for key, value in inp.kwargs().items():
        torch.testing.assert_close(value, again.kwargs()[key], rtol=0, atol=0)
    joint, m2v, v2m = (inp.task == int(t) for t in (Task.JOINT, Task.M2V, Task.V2M))
    for sel, p in ((joint, 0.4), (m2v, 0.3), (v2m, 0.3)):
        assert sel.float().mean().item() == pytest.approx(p, abs=0.025)
    null = _is_null(inp.text)
    motion_dropped = ~inp.motion_mask[:, 0]
    assert null[joint].float().mean().item() == pytest.approx(0.1, abs=0.025)
    assert null[m2v].float().mean().item() == pytest.approx(0.2, abs=0.03)
    assert bool(null[v2m].all())
    assert motion_dropped[m2v].float().mean().item() == pytest.approx(0.3, abs=0.03)
    assert not bool(motion_dropped[~m2v].any())
    assert (~inp.video_mask)[v2m].float().mean().item() == pytest.approx(0.4, abs=0.035)
    assert bool(inp.video_mask[~v2m].all())
    # text and motion drops in M2V are independent: P(both) = 0.2 * 0.3
    assert (null & motion_dropped)[m2v].float().mean().item() == pytest.approx(0.06, abs=0.02)


def test_build_inputs_errors_name_the_fix():
    with pytest.raises(ValueError, match="phase 2 needs video"):
        build_inputs(_batch(2, video=None), 2, _cfg(), NULL)
    with pytest.raises(ValueError, match="pad it to the same text length"):
        build_inputs(_batch(2), 2, _cfg(), NULL[:3])
    with pytest.raises(ValueError, match="phase=3"):
        build_inputs(_batch(2), 3, _cfg(), NULL)


# ------------------------------------------------------------------------------------------------------------ guidance
def _tiny_model(seed: int = 0, overrides: list[str] | None = None) -> EchoMotionDiT:
    torch.manual_seed(seed)
    model = EchoMotionDiT(model_preset("tiny", overrides)).eval()
    # The zero-initialized output layers would make every velocity 0 (and every guidance check vacuous): randomize them.
    zeroed = [model.head.head.weight, model.task_hint.mlp[2].weight]
    zeroed += [mlp[2].weight for mlp in (model.motion_head.pos, model.motion_head.rot, model.motion_head.shape)]
    for p in zeroed:
        torch.nn.init.normal_(p, std=0.2)
    return model


@pytest.fixture(scope="module")
def model() -> EchoMotionDiT:
    return _tiny_model()


B, FRAMES, VIDEO = 2, 5, (16, 2, 4, 6)
W1, W2, SIGMA = 3.5, 1.75, 0.7
GUIDANCE = SampleConfig(text_guidance=W1, condition_guidance=W2)


def _cfg_inputs():
    g = torch.Generator().manual_seed(2)
    text = torch.randn(B, TEXT_LEN, TEXT_DIM, generator=g)
    null = torch.randn(TEXT_LEN, TEXT_DIM, generator=g)
    video = torch.randn(B, *VIDEO, generator=g)
    motion = torch.randn(B, FRAMES, FEATURES, generator=g)
    mask = torch.ones(B, FRAMES, dtype=torch.bool)
    mask[1, -2:] = False
    return text, null.expand(B, -1, -1), video, motion, mask


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _t(value: float) -> torch.Tensor:
    return torch.full((B,), value)


@torch.no_grad()
def test_cfg_t2vm_matches_eq4(model):
    text, null, x, m, mask = _cfg_inputs()
    t = _t(1000 * SIGMA)
    hint = torch.full((B,), int(Task.JOINT))

    def u(y):
        return model(video=x, video_timestep=t, motion=m, motion_timestep=t, motion_mask=mask, text=y, task=hint)

    cond, uncond = u(text), u(null)
    want_v = uncond.video + W1 * (cond.video - uncond.video)
    want_m = uncond.motion + W1 * (cond.motion - uncond.motion)
    got = guided_velocity(model, Request("t2vm", text, motion_mask=mask), x, m, SIGMA, null[0], GUIDANCE)
    assert _rel(cond.video, uncond.video) > 1e-3 and _rel(cond.motion, uncond.motion) > 1e-3  # text matters
    assert _rel(got.video, want_v) < 1e-5 and _rel(got.motion, want_m) < 1e-5


@torch.no_grad()
def test_cfg_t2m_matches_eq4_without_video(model):
    text, null, _, m, mask = _cfg_inputs()
    t, hint = _t(1000 * SIGMA), torch.full((B,), int(Task.T2M))
    cond = model(motion=m, motion_timestep=t, motion_mask=mask, text=text, task=hint).motion
    uncond = model(motion=m, motion_timestep=t, motion_mask=mask, text=null, task=hint).motion
    got = guided_velocity(model, Request("t2m", text, motion_mask=mask), None, m, SIGMA, null, GUIDANCE)
    assert got.video is None
    assert _rel(cond, uncond) > 1e-3
    assert _rel(got.motion, uncond + W1 * (cond - uncond)) < 1e-5


@torch.no_grad()
def test_cfg_m2v_matches_eq5(model):
    text, null, x, m, mask = _cfg_inputs()
    t, clean, hint = _t(1000 * SIGMA), _t(0.0), torch.full((B,), int(Task.M2V))
    with_m = dict(video=x, video_timestep=t, motion=m, motion_timestep=clean, motion_mask=mask, task=hint)
    u_my = model(text=text, **with_m).video
    u_m = model(text=null, **with_m).video
    u_none = model(video=x, video_timestep=t, text=null, task=hint)  # no motion argument at all
    u_masked = model(text=null, **{**with_m, "motion_mask": torch.zeros_like(mask)}).video
    assert _rel(u_masked, u_none) < 1e-5  # a fully masked motion is the same as no motion
    assert _rel(u_my, u_m) > 1e-3 and _rel(u_m, u_none) > 1e-3
    want = u_none + W1 * (u_my - u_m) + W2 * (u_m - u_none)
    got = guided_velocity(model, Request("m2v", text, motion_mask=mask), x, m, SIGMA, null, GUIDANCE)
    assert got.motion is None
    assert _rel(got.video, want) < 1e-5


@torch.no_grad()
def test_cfg_v2m_matches_eq6(model):
    text, null, x, m, mask = _cfg_inputs()
    t, clean, hint = _t(1000 * SIGMA), _t(0.0), torch.full((B,), int(Task.V2M))
    motion = dict(motion=m, motion_timestep=t, motion_mask=mask, text=null, task=hint)
    u_x = model(video=x, video_timestep=clean, **motion).motion
    u_none = model(**motion).motion  # no video argument at all
    u_masked = model(video=x, video_timestep=clean, video_mask=torch.zeros(B, dtype=torch.bool), **motion).motion
    assert _rel(u_masked, u_none) < 1e-5  # a masked video is the same as no video (RoPE sees only relative positions)
    assert _rel(u_x, u_none) > 1e-3
    got = guided_velocity(model, Request("v2m", text, motion_mask=mask), x, m, SIGMA, null, GUIDANCE)
    assert got.video is None
    assert _rel(got.motion, u_none + W2 * (u_x - u_none)) < 1e-5
    # V2M never reads the text
    other = guided_velocity(model, Request("v2m", motion_mask=mask), x, m, SIGMA, null, GUIDANCE)
    torch.testing.assert_close(other.motion, got.motion, rtol=0, atol=0)


@torch.no_grad()
def test_training_loss_weights_modalities_and_logs_per_task(model):
    """Phase 2, all three tasks in one batch: recompute each logged number sample by sample from the same draws."""
    b = 9
    batch = _batch(b, frames=3, video=(16, 1, 2, 2), seed=3)
    batch.motion_mask[0, -1] = True  # no padding: every generating sample weighs the same in the means below
    cfg = _cfg(video_loss_weight=2.0, motion_loss_weight=0.5)
    loss, logs = training_loss(model, batch, 2, cfg, NULL, torch.Generator().manual_seed(1))
    inp = build_inputs(batch, 2, cfg, NULL, torch.Generator().manual_seed(1))
    out = model(**inp.kwargs())
    tasks = [Task(t) for t in inp.task.tolist()]
    assert {Task.JOINT, Task.M2V, Task.V2M} <= set(tasks)

    def mean_mse(pred, target, which):
        per_sample = [((pred[i] - target[i]) ** 2).mean().item() for i in range(b) if tasks[i] in which]
        return sum(per_sample) / len(per_sample)

    want_v = mean_mse(out.video, inp.video_target, {Task.JOINT, Task.M2V})
    want_m = mean_mse(out.motion, inp.motion_target, {Task.JOINT, Task.V2M})
    assert logs["loss/video"] == pytest.approx(want_v, rel=1e-5)
    assert logs["loss/motion"] == pytest.approx(want_m, rel=1e-5)
    assert loss.item() == pytest.approx(2.0 * want_v + 0.5 * want_m, rel=1e-5)
    assert logs["loss/m2v/video"] == pytest.approx(mean_mse(out.video, inp.video_target, {Task.M2V}), rel=1e-5)
    assert logs["loss/v2m/motion"] == pytest.approx(mean_mse(out.motion, inp.motion_target, {Task.V2M}), rel=1e-5)
    assert logs["loss/joint/motion"] == pytest.approx(mean_mse(out.motion, inp.motion_target, {Task.JOINT}), rel=1e-5)
    assert "loss/m2v/motion" not in logs and "loss/v2m/video" not in logs and "loss/t2m/motion" not in logs


# ------------------------------------------------------------------------------------------------------------ solvers
@torch.no_grad()
@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_one_step_is_the_closed_form(model, solver):
    """One step from sigma = 1 to 0: data = noise - v(noise, 1), with Eq. 4 at timestep 1000 (Heun skips its corrector)."""
    text, null, _, _, _ = _cfg_inputs()
    shape = (B, *VIDEO)
    video, motion = sample(
        model, Request("t2vm", text, video_shape=shape, motion_frames=FRAMES), null,
        SampleConfig(steps=1, solver=solver, text_guidance=W1), generator=torch.Generator().manual_seed(9),
    )
    g = torch.Generator().manual_seed(9)
    nv, nm = torch.randn(shape, generator=g), torch.randn(B, FRAMES, FEATURES, generator=g)
    t, hint = _t(1000.0), torch.full((B,), int(Task.JOINT))
    cond = model(video=nv, video_timestep=t, motion=nm, motion_timestep=t, text=text, task=hint)
    uncond = model(video=nv, video_timestep=t, motion=nm, motion_timestep=t, text=null, task=hint)
    assert _rel(video, nv - (uncond.video + W1 * (cond.video - uncond.video))) < 1e-5
    assert _rel(motion, nm - (uncond.motion + W1 * (cond.motion - uncond.motion))) < 1e-5


def _linear_ode_errors(solver: str, steps: int, shift: float) -> tuple[float, int]:
    """dx/dsigma = cos(sigma) x from sigma = 1 to 0: x(0) = x(1) exp(-sin 1). Returns (max error, velocity calls)."""
    calls = []

    def velocity(x, sigma):
        calls.append(sigma)
        return [math.cos(sigma) * x[0]]

    x1 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    (x0,) = integrate(velocity, [x1], sampling_sigmas(steps, shift), solver)
    return (x0 - x1 * math.exp(-math.sin(1.0))).abs().max().item(), len(calls)


@pytest.mark.parametrize("shift,steps,gain", [(1.0, 16, 4.0), (8.0, 50, 1.5)])
def test_heun_beats_euler_on_a_linear_ode(shift, steps, gain):
    """Heun is second order (doubling the steps quarters its error), Euler first order. With shift 8 the final step to
    sigma = 0 is long (0.14 of 1 at 50 steps) and, being a plain Euler step, dominates Heun's error: hence the smaller
    gain."""
    e_euler, n_euler = _linear_ode_errors("euler", steps, shift)
    e_heun, n_heun = _linear_ode_errors("heun", steps, shift)
    assert n_euler == steps and n_heun == 2 * steps - 1  # no corrector on the last step
    assert e_heun < e_euler / gain
    assert 0.4 < _linear_ode_errors("euler", 2 * steps, shift)[0] / e_euler < 0.6
    assert _linear_ode_errors("heun", 2 * steps, shift)[0] / e_heun < 0.35


@torch.no_grad()
def test_sample_shapes_and_conditions(model):
    text, null, x, m, mask = _cfg_inputs()
    cfg, gen = SampleConfig(steps=2, solver="heun"), torch.Generator().manual_seed(0)
    v, mo = sample(model, Request("t2m", text, motion_frames=FRAMES), null, cfg, generator=gen)
    assert v is None and mo.shape == (B, FRAMES, FEATURES)
    v, mo = sample(model, Request("m2v", text, video_shape=x.shape, motion_cond=m, motion_mask=mask), null, cfg,
                   generator=gen)
    assert v.shape == x.shape and mo is None and bool(torch.isfinite(v).all())
    v, mo = sample(model, Request("v2m", video_cond=x, motion_frames=FRAMES), null, cfg, generator=gen)
    assert v is None and mo.shape == (B, FRAMES, FEATURES) and bool(torch.isfinite(mo).all())
    with pytest.raises(ValueError, match="needs motion_cond"):
        sample(model, Request("m2v", text, video_shape=x.shape), null, cfg)
    with pytest.raises(ValueError, match="video_shape"):
        sample(model, Request("t2vm", text, motion_frames=FRAMES), null, cfg)
    with pytest.raises(ValueError, match="unknown sampling task"):
        sample(model, Request("i2v", text), null, cfg)
    with pytest.raises(ValueError, match="unknown solver"):
        sample(model, Request("t2m", text, motion_frames=FRAMES), null, SampleConfig(steps=1, solver="rk4"))


@torch.no_grad()
@pytest.mark.parametrize("motion_frames", [9, 10, 17, 5])
def test_sample_needs_motion_spanning_the_video(model, motion_frames):
    """3 latent frames sit at times 0..2; motion frame f at f / 4. Only 4 * (3 - 1) + 1 = 9 frames end on the last latent
    (17 would run 2 latents past it), for every task with both modalities; t2m has no video to match."""
    text, null, _, _, _ = _cfg_inputs()
    g = torch.Generator().manual_seed(1)
    x, m = torch.randn(B, 16, 3, 4, 6, generator=g), torch.randn(B, motion_frames, FEATURES, generator=g)
    one_step = SampleConfig(steps=1)
    requests = [
        Request("t2vm", text, video_shape=x.shape, motion_frames=motion_frames),
        Request("m2v", text, video_shape=x.shape, motion_cond=m),
        Request("v2m", video_cond=x, motion_frames=motion_frames),
    ]
    for request in requests:
        if motion_frames == 9:
            sample(model, request, null, one_step)
        else:
            with pytest.raises(ValueError, match=f"motion has {motion_frames} frames .* needs 9 motion frames"):
                sample(model, request, null, one_step)
    sample(model, Request("t2m", text, motion_frames=motion_frames), null, one_step)


@pytest.mark.parametrize(
    "overrides,latent,want",
    [
        ([], 5, 17),
        ([], 1, 1),  # a single latent frame: a single motion frame
        (["model.patch_size=[2,2,2]"], 4, 5),  # 2 token frames, at times 0 and 1
        (["model.rope.temporal_ratio=2"], 3, 5),
    ],
)
def test_motion_length_follows_patch_and_ratio(overrides, latent, want):
    """The allowed length is ratio * (latent / patch_size[0] - 1) + 1, read off the model's own RoPE settings."""
    model = EchoMotionDiT(model_preset("tiny", overrides))
    check_motion_length(model, latent, want)
    for wrong in (want - 1, want + 1):
        with pytest.raises(ValueError, match=f"needs {want} motion frames"):
            check_motion_length(model, latent, wrong)


def test_motion_length_error_names_both_ways_to_fix_it(model):
    with pytest.raises(ValueError, match="needs 9 motion frames .* 17 motion frames would fit a video of 5 latent frames"):
        check_motion_length(model, 3, 17)
    with pytest.raises(ValueError, match="10 motion frames would fit no video length"):
        check_motion_length(model, 3, 10)
    odd = EchoMotionDiT(model_preset("tiny", ["model.rope.temporal_ratio=2.5"]))
    with pytest.raises(ValueError, match="needs no whole number of motion frames"):  # 2.5 * (2 - 1) + 1 = 3.5
        check_motion_length(odd, 2, 3)
    with pytest.raises(ValueError, match="divisible by model.patch_size"):
        check_motion_length(EchoMotionDiT(model_preset("tiny", ["model.patch_size=[2,2,2]"])), 3, 9)


@torch.no_grad()
def test_bf16_export_samples_close_to_fp32(model, tmp_path):
    """A bf16 export loaded as bf16 used to fail in the first Linear after Wan's fp32 modulation ("mat1 and mat2 must have
    the same dtype"); the sampler now autocasts at the weights' dtype. Bound: bf16 keeps 8 significant bits (2^-9 = 0.2%
    rounding per weight and activation); through the layers, guidance (w1 = 3.5 amplifies cond - uncond) and 4 steps
    the error measured 0.7-1.0% of the sample's norm (3 model x 3 noise seeds). 5% leaves a 5x margin and still
    catches a wrong model: the velocity's part is 55-86% of the sample's norm, and another seed's model is 42-118% off."""
    path = save_exported(model, Config(model=model.config), tmp_path / "bf16.safetensors", dtype="bf16")
    bf16, _ = load_exported(path, dtype=torch.bfloat16)
    assert next(bf16.parameters()).dtype == torch.bfloat16
    text, null, _, _, _ = _cfg_inputs()
    request = Request("t2vm", text, video_shape=(B, *VIDEO), motion_frames=FRAMES)
    cfg = SampleConfig(steps=4, text_guidance=W1)
    want = sample(model, request, null, cfg, generator=torch.Generator().manual_seed(1))
    got = sample(bf16, request, null, cfg, generator=torch.Generator().manual_seed(1))
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and bool(torch.isfinite(g).all())
        assert ((g - w).norm() / w.norm()).item() < 0.05


# ------------------------------------------------------------------------------------------------------------ overfit
OVERFIT_MODEL = ["model.dim=32", "model.ffn_dim=64", "model.num_layers=1", "model.text_dim=16", "model.freq_dim=32"]


@pytest.mark.parametrize("task", [Task.T2M, Task.JOINT, Task.M2V, Task.V2M], ids=lambda t: t.name)
def test_tiny_model_overfits_one_batch(task):
    """The real training_loss with the same seed every step (same task, sigma, noise): one fixed regression problem that a
    correct loss/target/masking pipeline must fit. Drops are off so every step sees the same inputs."""
    torch.manual_seed(0)
    model = EchoMotionDiT(model_preset("tiny", OVERFIT_MODEL)).train()
    g = torch.Generator().manual_seed(4)
    batch = TrainingBatch(
        text=torch.randn(2, 8, 16, generator=g),
        motion=torch.randn(2, 4, FEATURES, generator=g),
        motion_mask=torch.tensor([[True] * 4, [True] * 3 + [False]]),
        video=torch.randn(2, 16, 2, 4, 4, generator=g),
    )
    phase = 1 if task == Task.T2M else 2
    cfg = _cfg(None if task == Task.T2M else task)
    null = torch.zeros(8, 16)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(150):
        loss, logs = training_loss(model, batch, phase, cfg, null, torch.Generator().manual_seed(7))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert f"loss/{task.name.lower()}/{'motion' if task in (Task.T2M, Task.V2M) else 'video'}" in logs
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"overfit {task.name}: {first:.4f} -> {last:.5f} (x{first / last:.0f})")
    assert first / last > 10
