"""DER++: stored logits frozen at insertion, the stored-width MSE, and train-step FLOPs 1.5x ER's."""

from __future__ import annotations

import pytest
import torch
from clbench.edge.flops import measure_flops
from clbench.strategies.der_pp import stored_logit_mse


def build(name, scenario, build_strategy, **cfg):
    from clbench.models.backbones import build_backbone

    torch.manual_seed(0)
    return build_strategy(name, scenario, backbone=build_backbone("resnet18_cifar_nf8"), **cfg)


def step(strategy, batch):
    strategy.step_losses(batch)
    strategy.on_train_batch_end(None, batch, 0)


def test_stored_logit_mse_uses_only_the_stored_columns():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    replay = {"logits": torch.tensor([[0.0, 2.0, 9.0, 9.0, 9.0, 9.0], [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]]),
              "width": torch.tensor([2, 4])}
    # row 0: (1-0)^2 + 0 over 2 columns; row 1: 4 ones over 4 columns -> 5 / 6
    assert stored_logit_mse(logits, replay).item() == pytest.approx(5 / 6)


def test_stored_logits_never_change(scenario, build_strategy, batch_of):
    s = build("der_pp", scenario, build_strategy, buffer_size=20, replay_batch_size=8)
    s.on_experience_start(scenario.info(0))
    step(s, batch_of(scenario.train_sets[0], 20))
    first = {k: v.clone() for k, v in s.buffer.all().items()}
    s.on_experience_start(scenario.info(1))
    loader = iter(torch.utils.data.DataLoader(range(len(scenario.train_sets[1])), batch_size=8))
    for idx in loader:
        x, y = scenario.train_sets[1].x[idx], scenario.train_sets[1].y[idx]
        from clbench.types import Batch

        step(s, Batch(x, y))
        s.backbone.conv1.weight.data.add_(0.1)  # the network moves, stored logits must not
    now = s.buffer.all()
    kept = (now["x"] == first["x"]).flatten(1).all(dim=1)
    assert 0 < kept.sum() < len(kept)  # some old rows survived, some were replaced
    assert torch.equal(now["logits"][kept], first["logits"][kept])
    assert (first["width"] == 2).all() and (now["width"][~kept] == 4).all()


def test_der_pp_step_costs_one_and_a_half_er_steps(scenario, build_strategy, batch_of):
    flops = {}
    for name in ("er", "der_pp"):
        s = build(name, scenario, build_strategy, buffer_size=32, replay_batch_size=8)
        s.on_experience_start(scenario.info(0))
        step(s, batch_of(scenario.train_sets[0], 32))
        batch = batch_of(scenario.train_sets[0], 8)
        flops[name] = measure_flops(lambda: sum(s.step_losses(batch).values()).backward())
    assert flops["der_pp"] / flops["er"] == pytest.approx(1.5, abs=0.01)
