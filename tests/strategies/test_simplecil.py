"""SimpleCIL: prototypes are per-class mean embeddings of a frozen backbone; cosine classifier."""

from __future__ import annotations

import math

import torch
from torch import nn

from clbench.engine.runner import (
    RunSpec,
    create_scenario,
    create_strategy,
    run,
    strategy_config,
)
from clbench.types import Batch, ExperienceInfo


class _Flatten(nn.Module):
    """A 'backbone' whose embedding is the input itself, with a dropout that eval mode must switch off."""

    num_features = 2

    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.unused = nn.Linear(2, 2)  # a parameter that must never change

    def forward(self, x):
        return self.drop(x.flatten(1))


def _strategy(num_classes=2):
    return create_strategy("simplecil", _Flatten(), num_classes, strategy_config("simplecil", {}))


def test_prototypes_are_mean_embeddings_and_the_backbone_never_changes(tmp_path, fast_config_for):
    snapshots = []

    def keep(i, result, strategy):
        snapshots.append(({k: v.clone() for k, v in strategy.backbone.state_dict().items()},
                          strategy.prototypes.clone(), strategy))

    cfg = fast_config_for(tmp_path, limit_train_batches=None, epochs=3)  # the prototype pass takes one epoch anyway
    result = run(RunSpec("simplecil", "digits-5", run=cfg, seed=0), on_experience=keep)
    assert result.status == "completed", result.error
    first_state = snapshots[0][0]
    for state, _, _ in snapshots[1:]:  # bit-identical across experiences
        assert state.keys() == first_state.keys()
        assert all(torch.equal(state[k], first_state[k]) for k in state)

    strategy = snapshots[-1][2]
    scenario = create_scenario("digits-5")
    strategy.backbone.eval()
    for i, train_set in enumerate(scenario.train_sets):
        x, y = train_set.x, train_set.y
        with torch.no_grad():
            features = strategy.backbone(x).double()
        for c in y.unique().tolist():
            expected = features[y == c].mean(0).float()
            assert torch.allclose(strategy.prototypes[c], expected, atol=1e-6), (i, c)
            # a class's prototype is fixed once its experience is over
            assert torch.equal(snapshots[i][1][c], strategy.prototypes[c])
            if i > 0:
                assert torch.all(snapshots[i - 1][1][c] == 0)  # and did not exist before it
    # the epochs setting does not matter: one pass per experience
    assert [r["steps"] for r in result.edge["per_experience"]] == [
        math.ceil(len(s) / cfg.batch_size) for s in scenario.train_sets]


def test_logits_are_cosines_to_the_prototypes_and_predict_the_closest():
    strategy = _strategy()
    strategy.class_means.sums[:] = torch.tensor([[2.0, 0.0], [0.0, 6.0]], dtype=torch.float64)
    strategy.class_means.counts[:] = torch.tensor([2, 3])  # prototypes (1, 0) and (0, 2)
    strategy.train()  # the classifier must not depend on the module's mode
    logits = strategy.predict_logits(torch.tensor([[3.0, 1.0], [-1.0, 2.0]]))
    s10, s5 = math.sqrt(10), math.sqrt(5)
    assert torch.allclose(logits, torch.tensor([[3 / s10, 1 / s10], [-1 / s5, 2 / s5]]))
    assert logits.argmax(1).tolist() == [0, 1]


def test_the_prototype_pass_uses_unaugmented_inputs_in_eval_mode():
    strategy = _strategy()
    strategy.augment = lambda x: x + 100.0  # a train augmentation the pass must not apply
    strategy.on_experience_start(ExperienceInfo(0, (0, 1), (0, 1), 1, 2))
    strategy.train()
    before = {k: v.clone() for k, v in strategy.state_dict().items() if not k.startswith("class_means.")}
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    strategy.training_step(Batch(x, torch.tensor([0, 1, 0])), 0)
    assert torch.equal(strategy.prototypes, torch.tensor([[3.0, 4.0], [3.0, 4.0]]))  # dropout off, no +100
    assert strategy.class_means.counts.tolist() == [2, 1]
    after = strategy.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in strategy.parameters())


def test_runs_on_the_cards_tiny_configuration(tmp_path, fast_config_for):
    """digits at 3x32x32 and the tiny ViT, the pre-trained-model methods' CPU setup."""
    cfg = fast_config_for(tmp_path, backbone="clbench_vit_tiny", limit_train_batches=None)
    result = run(RunSpec("simplecil", "digits32-5", run=cfg, seed=0))
    assert result.status == "completed", result.error
    assert result.edge["totals"]["trainable_params"] == 0
    assert result.metrics["final_avg_acc"] > 0.3  # well above chance (0.1), even on random features
