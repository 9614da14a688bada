"""TUNA: minimum-entropy task adapter plus the universal (sign-elected merge) adapter at inference."""

from __future__ import annotations

import math

import pytest
import torch

from clbench.engine.runner import (
    RunSpec,
    create_scenario,
    create_strategy,
    run,
    strategy_config,
)
from clbench.models.backbones import build_backbone



def largest_magnitude(thetas: torch.Tensor) -> torch.Tensor:
    """Per element the entry of largest magnitude, whatever its sign (what the merge is not)."""
    return thetas.gather(0, thetas.abs().argmax(0, keepdim=True))[0]


def _strategy(**overrides):
    torch.manual_seed(0)
    cfg = strategy_config("tuna", {"bottleneck": 4, **overrides})
    strategy = create_strategy("tuna", build_backbone("clbench_vit_tiny", in_chans=3, img_size=32), 10, cfg, seed=0)
    strategy.on_experience_start(create_scenario("digits32-5").info(0))
    return strategy


def test_inference_takes_the_minimum_entropy_task_adapter_plus_the_universal_one(sign_elected_by_hand):
    strategy = _strategy()
    thetas = torch.randn(3, strategy.task_adapter_vectors.shape[1])
    strategy.task_adapter_vectors[:3] = thetas
    strategy.task_adapter_count.fill_(3)
    q = [torch.tensor([[0.6, 0.4], [0.5, 0.5]]), torch.tensor([[0.9, 0.1], [0.2, 0.8]]), torch.tensor([[0.3, 0.7], [0.1, 0.9]])]
    h = [torch.tensor([0.5, 0.2]), torch.tensor([0.3, 0.6]), torch.tensor([0.4, 0.1])]
    universal_q = torch.tensor([[0.25, 0.75], [0.7, 0.3]])

    def mocked(theta, x):  # each stored adapter has its own hand-set prediction and entropy
        for i in range(3):
            if torch.equal(theta, thetas[i]):
                return q[i], h[i]
        assert torch.equal(theta, sign_elected_by_hand(thetas))  # anything else must be the universal adapter
        return universal_q, torch.zeros(2)

    strategy.expert_prediction = mocked
    scores = strategy.predict_logits(torch.zeros(2, 3, 32, 32))
    # sample 0: adapter 1 has the lowest entropy (0.3); sample 1: adapter 2 (0.1)
    assert torch.allclose(scores, torch.stack([q[1][0], q[2][1]]) + universal_q)


def test_the_universal_adapter_is_the_sign_elected_merge_or_the_latest():
    strategy = _strategy()
    # columns: the elected sign is the sign of the sum; the last two columns are where electing the
    # sign first differs from taking the largest magnitude: 3 + 2 > 4 elects +, so 3 (not -4);
    # -1 - 1.5 + 2 < 0 elects -, so -1.5 (not 2)
    thetas = torch.tensor([[1.0, -2.0, 0.5, 3.0, -1.0], [3.0, 1.0, -4.0, 2.0, -1.5], [-1.0, -0.5, 0.25, -4.0, 2.0]])
    strategy.task_adapter_vectors = torch.zeros(5, 5)
    strategy.task_adapter_vectors[:3] = thetas
    strategy.task_adapter_count.fill_(3)
    assert strategy.universal_adapter().tolist() == [3.0, -2.0, -4.0, 3.0, -1.5]
    assert largest_magnitude(thetas).tolist()[3:] == [-4.0, 2.0]
    latest = _strategy(universal="latest")
    latest.task_adapter_vectors = strategy.task_adapter_vectors.clone()
    latest.task_adapter_count.fill_(3)
    assert torch.equal(latest.universal_adapter(), thetas[2])


def test_a_run_stores_one_adapter_per_task_and_predicts_by_the_rule(tmp_path, fast_config_for, sign_elected_by_hand):
    held = []
    cfg = fast_config_for(tmp_path, backbone="clbench_vit_tiny", epochs=1, limit_train_batches=3)
    overrides = {"bottleneck": 4, "align_epochs": 1, "align_per_class": 8}
    result = run(RunSpec("tuna", "digits32-5", run=cfg, seed=0, strategy_overrides=overrides),
                 on_experience=lambda i, r, s: held.append(s))
    assert result.status == "completed", result.error
    strategy = held[-1]
    assert len(strategy.task_adapters) == 5 and not torch.equal(strategy.task_adapters[0], strategy.task_adapters[4])
    x = create_scenario("digits32-5").test_sets[2].x[:4]
    strategy.eval()
    predictions = [strategy.expert_prediction(theta, x) for theta in strategy.task_adapters]
    best = torch.stack([hh for _, hh in predictions]).argmin(0)
    expected = torch.stack([predictions[b][0][i] for i, b in enumerate(best.tolist())])
    merged = sign_elected_by_hand(strategy.task_adapters)  # the universal adapter, merged here independently
    assert torch.equal(strategy.universal_adapter(), merged)
    # the run's adapters disagree in sign on some elements, where a plain largest-magnitude merge differs
    assert not torch.equal(largest_magnitude(strategy.task_adapters), merged)
    expected = expected + strategy.expert_prediction(merged, x)[0]
    assert torch.allclose(strategy.predict_logits(x), expected)


def test_up_projection_overlap_by_hand():
    from clbench.strategies.tuna import up_projection_overlap

    now = [torch.eye(2)]
    then = [torch.tensor([[1.0, 0.0], [3.0, 0.0]])]  # rows normalise to (1, 0): I @ then^T has mean 1/2
    assert up_projection_overlap(now, [then]).item() == 0.5
    assert up_projection_overlap(now, [then, then]).item() == 1.0  # summed over earlier tasks
    # averaged over blocks; the absolute value of each block's mean
    assert up_projection_overlap([torch.eye(2), -torch.eye(2)], [then * 1, then * 1]).item() == 0.5


def test_orthogonality_term_uses_the_stored_earlier_adapters_weighted_by_exp_minus_t_plus_1():
    from clbench.strategies.tuna import up_projection_overlap

    from clbench.types import Batch

    scenario = create_scenario("digits32-5")
    strategy = _strategy(orthogonality=0.5)
    for a in strategy.adapter.adapters:
        torch.nn.init.normal_(a.up.weight)
    stored = [a.up.weight.detach().clone() for a in strategy.adapter.adapters]
    strategy.on_experience_end(scenario.info(0), scenario.train_sets[0])
    strategy.on_experience_start(scenario.info(1))
    for a in strategy.adapter.adapters:  # training moves on from the stored adapter
        torch.nn.init.normal_(a.up.weight)
    x = scenario.train_sets[1].x[:4]
    batch = Batch(x, torch.tensor(scenario.info(1).classes[:1] * 4))
    term = strategy.step_losses(batch)["orthogonality"]
    expected = 0.5 * math.exp(-2) * up_projection_overlap([a.up.weight for a in strategy.adapter.adapters], [stored])
    assert term.item() == pytest.approx(expected.item(), rel=1e-6) and term.item() > 0
    term.backward()
    assert strategy.adapter.adapters[0].up.weight.grad is not None
    fresh = _strategy()  # off by default
    fresh.on_experience_end(scenario.info(0), scenario.train_sets[0])
    fresh.on_experience_start(scenario.info(1))
    assert "orthogonality" not in fresh.step_losses(batch)


@pytest.mark.parametrize("name", ["tuna", "daf", "saef", "sgds"])
def test_a_resumed_run_ends_like_an_uninterrupted_one(tmp_path, name, resume_pair, fast_config_for):
    """State registered once the number of tasks is known (the stored task adapters, SAEF's leaf
    prototypes) is restored on --resume, before any experience starts again."""
    from clbench.registry import STRATEGIES

    overrides = {**STRATEGIES.get(name).contract_overrides, "align_epochs": 1}

    def spec(out, resume):
        cfg = fast_config_for(out, backbone="clbench_vit_tiny", epochs=1, limit_train_batches=2)
        return RunSpec(name, "digits32-2", run=cfg, seed=0, strategy_overrides=overrides, resume=resume)

    whole, resumed = resume_pair(spec, tmp_path, stop_after=0)
    assert resumed.status == "completed", resumed.error
    assert resumed.accuracy_matrix == whole.accuracy_matrix


def adapter_values(blocks: int, dim: int, bottleneck: int) -> int:
    """One adapter set's values from its shapes: per block W_down (r x d) + b_d (r) + W_up (d x r) + b_u (d)."""
    return blocks * (bottleneck * dim + bottleneck + dim * bottleneck + dim)


def test_the_profiler_counts_the_stored_task_adapters_in_the_parameters_and_memory(tmp_path, fast_config_for):
    assert adapter_values(12, 768, 16) == 304_320  # one stored adapter at ViT-B/16
    counted, model = [], []  # the strategy's parameters after each task; its backbone and head

    def keep(i, result, s):
        counted.append(sum(p.numel() for p in s.parameters()))
        model.append(sum(p.numel() for m in (s.backbone, s.head) for p in m.parameters()))

    cfg = fast_config_for(tmp_path, backbone="clbench_vit_tiny", epochs=1, limit_train_batches=1, flops="off")
    result = run(RunSpec("tuna", "digits32-2", run=cfg, seed=0,
                         strategy_overrides={"bottleneck": 4, "align_epochs": 1, "align_per_class": 8}), on_experience=keep)
    assert result.status == "completed", result.error
    one = adapter_values(4, 64, 4)  # clbench_vit_tiny: 4 blocks of width 64
    for t, record in enumerate(result.edge["per_experience"]):
        # the parameters: backbone, head, the adapter in training and the evaluation slot; no stored adapter
        assert counted[t] == model[t] + 2 * one
        assert record["total_params"] == counted[t] + (t + 1) * one
        assert record["stored_state_bytes"] == (t + 1) * one * 4  # float32
    assert result.edge["totals"]["total_params"] == counted[1] + 2 * one


def test_the_universal_choice_and_the_orthogonality_weight_are_checked_with_a_message_naming_the_field():
    from clbench.errors import UsageError

    with pytest.raises(UsageError, match=r"universal='mixed' is invalid; expected one of: merged, latest"):
        strategy_config("tuna", {"universal": "mixed"})
    with pytest.raises(UsageError, match=r"orthogonality=-0.1 is invalid"):
        strategy_config("tuna", {"orthogonality": -0.1})
    assert strategy_config("tuna", {"universal": "latest", "orthogonality": 0.0}).universal == "latest"


def test_the_runs_seed_and_add_ons_reach_the_strategy():
    """create_strategy passes the seed (and the add-ons) as keywords: the classifier alignment's
    Gaussian samples are drawn from a generator seeded with the run's seed (+ 29)."""
    torch.manual_seed(0)
    strategy = create_strategy("tuna", build_backbone("clbench_vit_tiny", in_chans=3, img_size=32), 10,
                               strategy_config("tuna", {"bottleneck": 4}), seed=5)
    assert strategy.seed == 5
    assert torch.equal(strategy.alignment_generator.get_state(), torch.Generator().manual_seed(5 + 29).get_state())
