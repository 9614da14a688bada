"""The embedded digits scenarios: `digits-{n}` (1x8x8) and `digits32-{n}` (the same digits at 3x32x32)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clbench.engine.runner import create_scenario


def test_digits32_is_the_same_split_upsampled_bilinearly_to_three_identical_channels():
    small, large = create_scenario("digits-5"), create_scenario("digits32-5")
    assert large.input_shape == (3, 32, 32) and small.input_shape == (1, 8, 8)
    assert large.class_order == small.class_order and large.increments == small.increments
    for sets_small, sets_large in ((small.train_sets, large.train_sets), (small.test_sets, large.test_sets)):
        for a, b in zip(sets_small, sets_large):
            assert torch.equal(a.y, b.y)
            assert torch.equal(b.x[:, 0], b.x[:, 1]) and torch.equal(b.x[:, 0], b.x[:, 2])
            expected = F.interpolate(a.x, size=(32, 32), mode="bilinear", align_corners=False)
            assert torch.equal(b.x[:, :1], expected)
    assert sum(len(s) for s in large.train_sets) + sum(len(s) for s in large.test_sets) == 1797
