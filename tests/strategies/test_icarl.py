"""iCaRL: herding, class-balanced memory rebuilt only at task ends, exact class means, NME prediction, BCE targets."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from clbench.strategies.icarl import balanced_quotas

from clbench.engine.runner import RunSpec, create_scenario, run
from clbench.models.buffers import herding_selection


def test_herding_by_hand():
    feats = torch.tensor([[0.0], [1.0], [2.0], [10.0]])  # mean 3.25
    # 1st: |3.25 - f| is smallest at f=2; 2nd: |3.25 - (2 + f)/2| is 1.75 for f=1, 2.25 for f=0, 2.75 for f=10
    assert herding_selection(feats, 2).tolist() == [2, 1]
    assert herding_selection(feats, 9).tolist() == [2, 1, 3, 0]  # never more than available, no repeats


def test_quotas_differ_by_at_most_one():
    q = balanced_quotas(20, range(6))
    assert sum(q.values()) == 20 and max(q.values()) - min(q.values()) <= 1


class _BufferWatch(pl.Callback):
    def __init__(self):
        self.per_fit: list[list[torch.Tensor]] = []

    def on_train_start(self, trainer, pl_module):
        self.per_fit.append([pl_module.buffer.state_dict()["field.y"].clone() if pl_module.buffer.fields else None])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.per_fit[-1].append(pl_module.buffer.state_dict()["field.y"].clone() if pl_module.buffer.fields else None)


def test_memory_balanced_rebuilt_only_at_task_ends_and_exact_means(tmp_path, fast_config_for):
    watch, captured = _BufferWatch(), []

    def capture(i, result, strategy):
        captured.append((dict(strategy.buffer.class_counts()), strategy))

    cfg = fast_config_for(tmp_path, limit_train_batches=3, backbone="resnet18_cifar_nf8")
    result = run(RunSpec("icarl", "synthetic32-3", run=cfg, strategy_overrides={"buffer_size": 20}),
                 callbacks=[watch], on_experience=capture)
    assert result.status == "completed", result.error
    for counts, _ in captured:
        assert sum(counts.values()) == 20 and max(counts.values()) - min(counts.values()) <= 1
    assert [len(c) for c, _ in captured] == [2, 4, 6]
    for states in watch.per_fit:  # unchanged by every training step of a fit
        assert all(s is None and states[0] is None or torch.equal(s, states[0]) for s in states)
    strategy = captured[-1][1]
    stored = strategy.buffer.all()
    feats = strategy.features(stored["x"])
    for c in range(6):
        assert torch.allclose(strategy.class_means[c], feats[stored["y"] == c].mean(0), atol=1e-6)


def test_prediction_is_nearest_mean_of_exemplars(strategy_factory):
    s = strategy_factory("icarl", buffer_size=10)
    s.eval()
    x = torch.randn(8, 1, 8, 8)
    feats = s.backbone(x)
    s.class_means = torch.stack([feats[0], feats[1]])
    pred = s.predict_logits(x).argmax(1)
    nearest = torch.cdist(feats, s.class_means).argmin(1)
    assert torch.equal(pred, nearest) and pred[0] == 0 and pred[1] == 1


def test_bce_targets_are_old_model_sigmoids_for_past_classes(synthetic_scenario, strategy_factory, batch_of):
    s = strategy_factory("icarl", buffer_size=10, wd_reg=0.0)
    s.on_experience_start(synthetic_scenario.info(0))
    s.on_experience_start(synthetic_scenario.info(1))  # snapshot of the task-0 model
    batch = batch_of(synthetic_scenario.train_sets[1], 8)
    out = s(batch.x).logits
    with torch.no_grad():
        old = torch.sigmoid(s.old_model["head"](s.old_model["backbone"](batch.x)))[:, :2]
    targets = torch.cat([old, F.one_hot(batch.y, 4)[:, 2:].float()], dim=1)
    assert torch.allclose(s.step_losses(batch)["bce"], F.binary_cross_entropy_with_logits(out, targets))
