"""Naive fine-tuning: plain cross-entropy on the current experience, and it forgets."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clbench.engine.runner import RunSpec, run


def test_loss_is_cross_entropy_on_the_current_batch_only(strategy_factory, synthetic_scenario, batch_of):
    strategy = strategy_factory("naive")
    strategy.on_experience_start(synthetic_scenario.info(0))
    batch = batch_of(synthetic_scenario.train_sets[0], 16)
    terms = strategy.step_losses(batch)
    assert set(terms) == {"ce"}
    logits = strategy.head(strategy.backbone(batch.x))
    assert torch.allclose(terms["ce"], F.cross_entropy(logits, batch.y))
    assert logits.shape[1] == 2  # only the classes seen so far have outputs


def test_naive_forgets_the_first_experience(tmp_path, fast_config_for):
    """The lower bound: after training on experience 1 alone, experience 0 is mostly lost."""
    cfg = fast_config_for(tmp_path, epochs=3, limit_train_batches=None)
    result = run(RunSpec("naive", "synthetic-2", run=cfg, seed=0))
    m = result.accuracy_matrix
    assert m[0][0] > 0.9 and m[1][1] > 0.9
    assert m[1][0] < m[0][0] - 0.5, m
