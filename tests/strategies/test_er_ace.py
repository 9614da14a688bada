"""ER-ACE: no gradient to absent past classes from the incoming batch; masking only from task 2; FLOPs = ER's."""

from __future__ import annotations

import pytest
import torch
from clbench.edge.flops import measure_flops
from clbench.strategies.er_ace import asymmetric_mask

from clbench.types import Batch, Output


def build(name, scenario, build_strategy, **cfg):
    from clbench.models.backbones import build_backbone

    torch.manual_seed(0)
    return build_strategy(name, scenario, backbone=build_backbone("resnet18_cifar_nf8"), **cfg)


def test_mask_keeps_present_labels_and_classes_from_the_newest_seen_upwards():
    seen = torch.tensor([True, True, True, False, False, False])
    keep = asymmetric_mask(torch.tensor([2, 2]), seen, 5)
    assert keep[0].tolist() == [False, False, True, True, True]


def test_current_batch_gives_zero_gradient_to_absent_past_classes(scenario, build_strategy, batch_of, monkeypatch):
    s = build("er_ace", scenario, build_strategy, buffer_size=0)
    s.on_experience_start(scenario.info(0))
    s.step_losses(batch_of(scenario.train_sets[0], 16))  # task 0 labels become "seen"
    s.on_experience_start(scenario.info(1))
    logits = torch.randn(4, 4, requires_grad=True)
    monkeypatch.setattr(s, "current_output", lambda batch: Output(logits))
    batch = Batch(torch.zeros(4, 3, 32, 32), torch.tensor([2, 3, 2, 3]))
    s.step_losses(batch)["ce"].backward()
    assert torch.equal(logits.grad[:, :2], torch.zeros(4, 2))  # past classes 0, 1: exactly zero
    assert logits.grad[:, 2:].abs().sum() > 0


def test_first_task_is_plain_cross_entropy(scenario, build_strategy, batch_of, monkeypatch):
    import torch.nn.functional as F

    s = build("er_ace", scenario, build_strategy, buffer_size=20)
    s.on_experience_start(scenario.info(0))
    batch = batch_of(scenario.train_sets[0], 16)
    s.on_train_batch_end(None, batch, 0)
    logits = torch.randn(16, 2)
    monkeypatch.setattr(s, "current_output", lambda b: Output(logits))
    terms = s.step_losses(batch)
    assert list(terms) == ["ce"] and torch.allclose(terms["ce"], F.cross_entropy(logits, batch.y))


def test_er_ace_step_costs_what_an_er_step_costs(scenario, build_strategy, batch_of):
    flops = {}
    for name in ("er", "er_ace"):
        s = build(name, scenario, build_strategy, buffer_size=32, replay_batch_size=8)
        s.on_experience_start(scenario.info(0))
        s.on_train_batch_end(None, batch_of(scenario.train_sets[0], 32), 0)
        s.on_experience_start(scenario.info(1))
        batch = batch_of(scenario.train_sets[1], 8)
        flops[name] = measure_flops(lambda: sum(s.step_losses(batch).values()).backward())
    assert flops["er_ace"] / flops["er"] == pytest.approx(1.0, abs=0.01)
