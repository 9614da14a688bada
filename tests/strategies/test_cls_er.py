"""CLS-ER: EMA arithmetic, the consistency target's choice, stable-copy inference, head growth of the copies."""

from __future__ import annotations

import pytest
import torch

from clbench.types import Batch


def test_ema_update_follows_the_warmup_decay(strategy_factory, synthetic_scenario):
    s = strategy_factory("cls_er", buffer_size=10)
    s.on_experience_start(synthetic_scenario.info(0))
    ema_before = [p.clone() for p in s.ema["plastic"].parameters()]
    with torch.no_grad():
        for p in s.head.parameters():
            p.add_(1.0)
    s.ema_steps.fill_(3)  # decay = min(1 - 1/4, 0.999) = 0.75
    s.update_ema("plastic", 0.999)
    working = list(s.backbone.parameters()) + list(s.head.parameters())
    for ema, old, p in zip(s.ema["plastic"].parameters(), ema_before, working):
        assert torch.allclose(ema, 0.75 * old + 0.25 * p)
    assert all(torch.equal(a, b) for a, b in zip(s.ema["stable"].parameters(), ema_before))


def test_consistency_target_takes_the_copy_more_confident_in_the_label(strategy_factory, synthetic_scenario, monkeypatch):
    s = strategy_factory("cls_er", buffer_size=10)
    stable = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    plastic = torch.tensor([[0.0, 0.0], [0.0, 3.0]])
    monkeypatch.setattr(s, "ema_logits", lambda which, x: stable if which == "stable" else plastic)
    target = s.consistency_target(torch.zeros(2, 1), torch.tensor([0, 1]))
    assert torch.equal(target, torch.stack([stable[0], plastic[1]]))


def test_inference_uses_the_stable_copy(strategy_factory, synthetic_scenario):
    s = strategy_factory("cls_er", buffer_size=10)
    s.on_experience_start(synthetic_scenario.info(0))
    s.eval()
    x = torch.randn(4, 1, 8, 8)
    before = s.predict_logits(x).clone()
    with torch.no_grad():
        for p in list(s.ema["plastic"].parameters()) + list(s.head.parameters()):
            p.add_(5.0)
    assert torch.equal(s.predict_logits(x), before)
    with torch.no_grad():
        s.ema["stable"]["head"].fc.bias.add_(torch.tensor([5.0, 0.0]))
    assert not torch.equal(s.predict_logits(x), before)


def test_copies_grow_with_the_working_head_and_stay_frozen(strategy_factory, synthetic_scenario):
    s = strategy_factory("cls_er", buffer_size=10)
    s.on_experience_start(synthetic_scenario.info(0))
    s.on_experience_start(synthetic_scenario.info(1))
    for copy in s.ema.values():
        assert copy["head"].out_features == 4
        assert torch.equal(copy["head"].fc.weight[2:], s.head.fc.weight[2:])
        assert not any(p.requires_grad for p in copy.parameters())
    assert not any(p is q for p in s.trainable_parameters() for q in s.ema.parameters())


def test_loss_has_ce_and_consistency_once_the_buffer_has_samples(strategy_factory, synthetic_scenario, batch_of):
    s = strategy_factory("cls_er", buffer_size=10, replay_batch_size=4)
    s.on_experience_start(synthetic_scenario.info(0))
    batch = batch_of(synthetic_scenario.train_sets[0], 8)
    assert set(s.step_losses(batch)) == {"ce"}
    s.on_train_batch_end(None, batch, 0)
    assert int(s.ema_steps) == 1
    terms = s.step_losses(batch)
    assert set(terms) == {"ce", "consistency"} and terms["consistency"] >= 0
