"""Variable-length motion-only clips: a seeded random window down to data.motion_frames, masked padding up to it, and
padded frames that carry no loss. The windows' use in a streamed run (and after resume) is in test_prepare_motion.py."""
from __future__ import annotations

import pytest
import torch

from echomotion.config import DiffusionConfig
from echomotion.data.batch import Collate
from echomotion.data.dataset import Item, crop_motion
from echomotion.data.errors import DataError
from echomotion.diffusion import TrainingBatch, training_loss
from echomotion.models.echomotion import Prediction
from echomotion.motion.smpl import MOTION_FEATURE_DIM
from tests.unit.test_diffusion import _tiny_model

FEATURES, TEXT_LEN, TEXT_DIM = MOTION_FEATURE_DIM, 6, 32


def _item(clip: str, frames: int) -> Item:
    return Item(clip, clip, None, torch.arange(frames, dtype=torch.float32)[:, None].expand(frames, FEATURES), torch.ones(3, 8))


def test_crop_is_a_window_fixed_by_seed_epoch_and_sample() -> None:
    motion = torch.arange(50, dtype=torch.float32)[:, None].expand(50, FEATURES)
    windows = {(e, s): crop_motion(motion, 16, 9176, e, s) for e in range(4) for s in range(8)}
    for w in windows.values():  # consecutive frames of the clip
        assert w.shape == (16, FEATURES) and torch.equal(w[:, 0], w[0, 0] + torch.arange(16.0))
    assert all(torch.equal(crop_motion(motion, 16, 9176, e, s), w) for (e, s), w in windows.items())  # a resume recrops
    starts = {int(w[0, 0]) for w in windows.values()}
    assert len(starts) > 10 and min(starts) >= 0 and max(starts) <= 34  # varies over epochs and samples
    assert int(crop_motion(motion, 16, 1, 0, 0)[0, 0]) != int(crop_motion(motion, 16, 2, 0, 0)[0, 0]) or \
        int(crop_motion(motion, 16, 1, 0, 1)[0, 0]) != int(crop_motion(motion, 16, 2, 0, 1)[0, 0])  # the seed matters
    assert crop_motion(motion[:10], 16, 9176, 0, 0).shape[0] == 10  # shorter clips are left to collate's padding


def test_collate_pads_motion_only_batches_to_motion_frames() -> None:
    batch = Collate(text_len=4, sp_multiple=4, motion_frames=10)([_item("a", 3), _item("b", 10)])
    assert batch.motion.shape == (2, 12, FEATURES)  # 10 -> 12 so 12 x 51 tokens divide by sp 4
    assert batch.motion_mask.sum(1).tolist() == [3, 10] and not batch.motion[0, 3:].any()
    with pytest.raises(DataError, match="data.motion_frames=10"):
        Collate(text_len=4, motion_frames=10)([_item("a", 11)])


class _PerFrame(torch.nn.Module):
    """A model whose motion output at a frame depends only on that frame's input, so a per-frame loop can recompute it."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.3))
        self.seen: dict = {}

    def forward(self, motion: torch.Tensor, motion_timestep: torch.Tensor, **kwargs) -> Prediction:
        self.seen = {"motion": motion.detach().clone(), "sigma": motion_timestep.detach() / 1000}
        return Prediction(None, self.scale * motion + 0.1)


def _padded_batch(lengths: list[int], frames: int, fill: float) -> TrainingBatch:
    g = torch.Generator().manual_seed(0)
    motion = torch.full((len(lengths), frames, FEATURES), fill)
    mask = torch.zeros(len(lengths), frames, dtype=torch.bool)
    for i, n in enumerate(lengths):
        motion[i, :n] = torch.randn(n, FEATURES, generator=g)
        mask[i, :n] = True
    return TrainingBatch(text=torch.randn(len(lengths), TEXT_LEN, TEXT_DIM, generator=g), motion=motion, motion_mask=mask)


def test_padded_frames_carry_no_loss_against_a_loop_over_real_frames() -> None:
    """The Phase 1 loss of a padded batch is the mean squared velocity error over the real frames only: recomputed
    frame by frame from the clean data and the noisy input the model saw (noise = (x_sigma - (1 - sigma) x) / sigma)."""
    lengths, cfg, null = [5, 12, 1], DiffusionConfig(), torch.zeros(TEXT_LEN, TEXT_DIM)
    batch, model = _padded_batch(lengths, 16, fill=1e3), _PerFrame()
    loss, logs = training_loss(model, batch, 1, cfg, null, torch.Generator().manual_seed(4))
    total, count = 0.0, 0
    for i, n in enumerate(lengths):
        s = float(model.seen["sigma"][i])
        for f in range(n):
            x, noisy = batch.motion[i, f].double(), model.seen["motion"][i, f].double()
            target = (noisy - (1 - s) * x) / s - x
            pred = 0.3 * noisy + 0.1
            total, count = total + float(((pred - target) ** 2).sum()), count + FEATURES
    assert loss.item() == pytest.approx(total / count, rel=1e-4)
    assert logs["count/motion"] == count


def test_padding_content_does_not_change_the_loss_of_the_model() -> None:
    """Through the real model (attention across frames): whatever the padded frames hold, the loss is the same."""
    model, cfg, null = _tiny_model(), DiffusionConfig(), torch.zeros(TEXT_LEN, TEXT_DIM)
    losses = [training_loss(model, _padded_batch([3, 8], 8, fill), 1, cfg, null, torch.Generator().manual_seed(1))[0]
              for fill in (0.0, 50.0)]
    assert losses[0].item() == pytest.approx(losses[1].item(), rel=1e-5)
