"""Joint training: experience i trains on the union of experiences 0..i."""

from __future__ import annotations

import torch

from clbench.datasets import dataset_labels
from clbench.engine.runner import RunSpec, run


def test_training_data_is_the_union_of_experiences_so_far(strategy_factory, synthetic_scenario):
    strategy = strategy_factory("joint")
    sets = synthetic_scenario.train_sets
    first = strategy.training_data(synthetic_scenario.info(0), sets[0])
    assert len(first) == len(sets[0])
    second = strategy.training_data(synthetic_scenario.info(1), sets[1])
    assert len(second) == len(sets[0]) + len(sets[1])
    assert set(dataset_labels(second).tolist()) == {0, 1, 2, 3}
    assert torch.equal(second.x, torch.cat([sets[0].x, sets[1].x]))  # the samples themselves, not copies of one


def test_joint_keeps_the_first_experience_where_naive_forgets(tmp_path, fast_config_for):
    cfg = fast_config_for(tmp_path, epochs=3, limit_train_batches=None)
    joint = run(RunSpec("joint", "synthetic-2", run=cfg, seed=0)).accuracy_matrix
    naive = run(RunSpec("naive", "synthetic-2", run=cfg, seed=0)).accuracy_matrix
    assert joint[1][0] > 0.9, joint
    assert joint[1][0] > naive[1][0] + 0.4, (joint, naive)
