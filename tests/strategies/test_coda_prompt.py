"""CODA-Prompt: faithfulness checks (frozen backbone, alpha = cos(q * A, K), prompt =
sum alpha_m P_m, earlier groups frozen and later ones unused, new groups orthogonal to earlier
ones, masked training logits, what trains), on hand-computed examples and a short digits32-5 run."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from clbench.strategies.coda_prompt import (
    CodaPrompt,
    coda_weights,
    ortho_penalty,
    orthogonal_rows,
)

from clbench.engine.runner import (
    RunSpec,
    create_scenario,
    create_strategy,
    run,
    strategy_config,
)
from clbench.errors import UsageError
from clbench.models.backbones import build_backbone
from clbench.types import Batch

TINY = {"pool_size": 10, "prompt_length": 2, "prompt_blocks": 4}  # digits32-5: T = 5, M = 2 T, groups of 2
PART = ("prompts", "keys", "attention")


def _flat(pool_part: torch.Tensor, block: int) -> torch.Tensor:
    """A block's components as rows (M, n)."""
    return pool_part[block].flatten(1)


@pytest.fixture(scope="module")
def coda_run(tmp_path_factory, fast_config_for, fit_snapshots):
    # "start" is right after on_experience_start initialised the task's group
    snaps = fit_snapshots(lambda m: {"pool": m.pool.stacked(), "head": m.head.fc.weight, "backbone": m.backbone.state_dict()})
    final = []
    cfg = fast_config_for(tmp_path_factory.mktemp("coda"), backbone="clbench_vit_tiny", epochs=1, limit_train_batches=3)
    result = run(RunSpec("coda_prompt", "digits32-5", run=cfg, seed=0, strategy_overrides=TINY), callbacks=[snaps],
                 on_experience=lambda i, r, s: final.append(s))
    return result, snaps.at, final[-1]


def _strategy(**overrides):
    torch.manual_seed(0)
    return create_strategy("coda_prompt", build_backbone("clbench_vit_tiny", in_chans=3, img_size=32), 10,
                           strategy_config("coda_prompt", {**TINY, **overrides}), seed=0)


def test_end_to_end_run_on_digits32_5(coda_run):
    result, at, strategy = coda_run
    assert result.status == "completed", result.error
    assert len(result.accuracy_matrix) == 5 and all(len(row) == 5 for row in result.accuracy_matrix)
    assert all(a == 0.0 for i, row in enumerate(result.accuracy_matrix) for a in row[i + 1:])  # unseen: 0
    assert result.strategy_config["pool_size"] == 10 and result.strategy_config["optimizer"] == "adam"
    assert strategy.head.fc.weight.shape == (10, strategy.backbone.num_features)


def test_the_backbone_never_changes(coda_run):
    _, at, _ = coda_run
    torch.manual_seed(0)
    initial = build_backbone("clbench_vit_tiny", in_chans=3, img_size=32).state_dict()  # the run builds it from seed 0
    for key, snap in at.items():
        assert all(torch.equal(snap["backbone"][k], initial[k]) for k in initial), key


def test_each_task_trains_its_group_only_earlier_groups_stay_bit_identical_later_ones_zero(coda_run):
    _, at, _ = coda_run
    for t in range(5):
        s, f = 2 * t, 2 * t + 2
        start, end = at[(t, "start")]["pool"], at[(t, "end")]["pool"]
        for name, before, after in zip(PART, start, end):
            assert torch.equal(after[:, :s], before[:, :s]), (t, name)  # frozen
            changed = (after[:, s:f] - before[:, s:f]).abs().amax(dim=tuple(range(2, after.dim())))
            assert changed.gt(0).all(), (t, name)  # every block's every new component trained
            assert torch.all(after[:, f:] == 0) and torch.all(before[:, f:] == 0), (t, name)  # untouched, unused
        if t > 0:  # nothing changed between the end of task t-1 and the start of task t but the new group
            previous = at[(t - 1, "end")]["pool"]
            assert all(torch.equal(b[:, :s], p[:, :s]) for b, p in zip(start, previous))
    # the head: rows of earlier classes are untouched by later tasks, the current rows train
    for t in range(1, 5):
        before, after = at[(t, "start")]["head"], at[(t, "end")]["head"]
        assert torch.equal(before[: 2 * t], after[: 2 * t]) and not torch.equal(before[2 * t:], after[2 * t:])


def test_a_new_group_is_orthonormal_and_orthogonal_to_the_trained_earlier_groups(coda_run):
    _, at, _ = coda_run
    for t in range(5):
        s, f = 2 * t, 2 * t + 2
        for name, part in zip(PART, at[(t, "start")]["pool"]):
            for block in range(4):
                rows = _flat(part, block)
                new = rows[s:f]
                assert torch.allclose(new @ new.T, torch.eye(2), atol=1e-5), (t, name, block)
                if s:
                    assert (new @ rows[:s].T).abs().max().item() < 1e-5, (t, name, block)
    # the earlier groups were trained away from orthogonality, so the check above is not vacuous
    last = _flat(at[(4, "start")]["pool"][1], 0)[:8]
    assert (last @ last.T - torch.eye(8)).abs().max() > 1e-4


def test_gram_schmidt_is_orthogonal_to_the_span_of_non_orthogonal_earlier_rows():
    earlier = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])  # not orthogonal: span is the xy-plane
    torch.manual_seed(0)
    new = orthogonal_rows(earlier, 1)
    assert torch.allclose(new.abs(), torch.tensor([[0.0, 0.0, 1.0]]), atol=1e-6)  # only the z axis is left
    # projecting out each earlier row separately (the code's rule) would not be orthogonal here
    v = torch.tensor([1.0, 2.0, 3.0])
    one_by_one = v - sum((v @ u) / (u @ u) * u for u in earlier)
    assert (one_by_one @ earlier.T).abs().max() > 0.5
    torch.manual_seed(1)
    fresh = orthogonal_rows(torch.zeros(0, 5), 3)
    assert torch.allclose(fresh @ fresh.T, torch.eye(3), atol=1e-6)
    with pytest.raises(ValueError):
        orthogonal_rows(earlier, 2)


def test_weights_are_cosines_of_the_attended_query_and_the_keys_on_a_hand_example():
    q = torch.tensor([[1.0, 2.0], [-1.0, 1.0]])
    attention = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])  # one block, two components
    keys = torch.tensor([[[2.0, 0.0], [0.0, 3.0]]])  # keys need not be unit: cosine
    alpha = coda_weights(q, attention, keys)
    # q0*A0 = (1, 0) vs (1, 0): 1; q0*A1 = (1, 2) vs (0, 1): 2/sqrt(5)
    # q1*A0 = (-1, 0) vs (1, 0): -1; q1*A1 = (-1, 1) vs (0, 1): 1/sqrt(2)
    expected = torch.tensor([[[1.0, 2 / math.sqrt(5)], [-1.0, 1 / math.sqrt(2)]]])
    assert alpha.shape == (1, 2, 2) and torch.allclose(alpha, expected, atol=1e-6)


def test_the_prefix_is_the_alpha_weighted_sum_of_the_components_in_use():
    scenario = create_scenario("digits32-5")
    strategy = _strategy()
    for i in range(2):
        strategy.on_experience_start(scenario.info(i))  # groups 0 and 1 in use: components 0..3
    strategy.eval()
    x = scenario.test_sets[0].x[:3]
    prompts, keys, attention = (t.detach() for t in strategy.pool.stacked(4))
    with torch.no_grad(), strategy.router.using(None):
        q = strategy.backbone(x)  # the unprompted [CLS]
    expected = torch.zeros(4, 2, 3, 2, 64)  # (blocks, key/value, batch, length, D)
    for n in range(4):
        for b in range(3):
            for m in range(4):
                alpha = F.cosine_similarity(q[b] * attention[n, m], keys[n, m], dim=0)
                expected[n, :, b] += alpha * prompts[n, m]
    prefix = strategy.prompt(x)
    assert prefix.shape == (4, 2, 3, 2, 4, 16)  # heads 4 x head_dim 16
    assert torch.allclose(prefix.reshape(4, 2, 3, 2, 64), expected, atol=1e-6)
    with torch.no_grad(), strategy.router.using(expected.reshape(prefix.shape)):
        features = strategy.backbone(x)
    assert torch.allclose(strategy(x).features, features, atol=1e-5)  # the forward uses that prefix
    assert not torch.allclose(features, q, atol=1e-3)  # and the prefix matters


def test_later_groups_have_no_effect_and_only_the_current_group_and_head_train():
    scenario = create_scenario("digits32-5")
    strategy = _strategy()
    for i in range(2):
        strategy.on_experience_start(scenario.info(i))
    strategy.eval()
    x = scenario.test_sets[0].x[:4]
    logits = strategy(x).logits.detach()
    with torch.no_grad():
        for part in (strategy.pool.prompts, strategy.pool.keys, strategy.pool.attention):
            for m in range(4, 10):
                part[m].normal_()
    assert torch.equal(strategy(x).logits, logits)  # later groups (4..9) are unused
    with torch.no_grad():
        strategy.pool.prompts[0].mul_(3.0)
    assert not torch.allclose(strategy(x).logits, logits)  # the earlier group is used
    group = set(map(id, strategy.pool.parameters_of(2, 4)))
    trainable = {id(p) for p in strategy.optimizer_params()}
    assert trainable == group | {id(p) for p in strategy.head.parameters()}
    assert not any(p.requires_grad for p in strategy.backbone.parameters())
    # T comes from the scenario: on digits32-2 the ten components form two groups of five
    two = _strategy()
    two.on_experience_start(create_scenario("digits32-2").info(0))
    assert {id(p) for p in two.pool.parameters() if p.requires_grad} == set(map(id, two.pool.parameters_of(0, 5)))


def test_training_logits_are_masked_to_the_current_classes_and_gradients_reach_the_current_group():
    scenario = create_scenario("digits32-5")
    strategy = _strategy()
    for i in range(2):
        strategy.on_experience_start(scenario.info(i))
    strategy.train()
    data = scenario.train_sets[1]
    x, y = data.x[:8], data.y[:8]
    assert set(y.tolist()) <= {2, 3}
    losses = strategy.step_losses(Batch(x, y))
    assert set(losses) == {"ce"}  # ortho_weight = 0: no penalty term
    logits = strategy.step_output.logits.detach()
    assert torch.allclose(losses["ce"], F.cross_entropy(logits[:, [2, 3]], y - 2))  # CE over the current classes
    losses["ce"].backward()
    grad = strategy.head.fc.weight.grad
    assert torch.all(grad[:2] == 0) and grad[2:].abs().sum() > 0
    for m in range(2, 4):
        assert strategy.pool.prompts[m].grad.abs().sum() > 0 and strategy.pool.keys[m].grad.abs().sum() > 0
        assert strategy.pool.attention[m].grad.abs().sum() > 0
    assert all(strategy.pool.prompts[m].grad is None for m in (0, 1, 4))


def test_orthogonality_penalty_on_a_hand_example_and_as_a_loss_term():
    x = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # X X^T - I = [[0, 1], [1, 1]]
    assert ortho_penalty(x).item() == pytest.approx(3 / 4)
    scenario = create_scenario("digits32-5")
    strategy = _strategy(ortho_weight=0.5)
    for i in range(2):
        strategy.on_experience_start(scenario.info(i))
    assert strategy.pool.ortho_penalty(4).item() == pytest.approx(0.0, abs=1e-10)  # freshly orthonormal
    with torch.no_grad():
        strategy.pool.keys[3][1].mul_(2.0)  # block 1's key 3: norm 2, so (K K^T - I)[3, 3] = 3
    assert strategy.pool.ortho_penalty(4).item() == pytest.approx(9 / 16, abs=1e-5)
    data = scenario.train_sets[1]
    losses = strategy.step_losses(Batch(data.x[:4], data.y[:4]))
    assert losses["ortho"].item() == pytest.approx(0.5 * 9 / 16, abs=1e-5)


def test_paper_settings_and_defaults_are_pilots():
    cfg = strategy_config("coda_prompt", {})
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.lr_schedule) == ("adam", 0.001, 0.0, "cosine")
    assert (cfg.pool_size, cfg.prompt_length, cfg.prompt_blocks, cfg.ortho_weight) == (100, 4, 5, 0.0)
    assert CodaPrompt.PAPER_SETTINGS["cifar100-10"]["epochs"] == 20
    assert CodaPrompt.PAPER_SETTINGS["cifar100-10"]["batch_size"] == 128
    assert {s["lr_schedule"] for s in CodaPrompt.PAPER_SETTINGS.values()} == {"coda_cosine"}


def test_the_codes_cosine_schedule_ends_at_1_6_percent_of_lr(tmp_path, fast_config_for):
    import pytorch_lightning as pl

    class FirstFitRates(pl.Callback):
        rates: list[float] = []

        def on_train_epoch_start(self, trainer, pl_module):
            if pl_module.experience.index == 0:
                self.rates.append(trainer.optimizers[0].param_groups[0]["lr"])

    rates = FirstFitRates()
    cfg = fast_config_for(tmp_path, backbone="clbench_vit_tiny", epochs=3, limit_train_batches=1)
    result = run(RunSpec("coda_prompt", "digits32-5", run=cfg, seed=0,
                         strategy_overrides={**TINY, "lr_schedule": "coda_cosine", "lr": 0.01}), callbacks=[rates])
    assert result.status == "completed", result.error
    # lr * cos(99 pi e / (200 (E - 1))), E = 3: cos(99 pi / 400) = 0.7127, cos(99 pi / 200) = 0.0157
    assert rates.rates == pytest.approx([0.01, 0.01 * math.cos(99 * math.pi / 400), 0.01 * math.cos(99 * math.pi / 200)])
    assert rates.rates[-1] / rates.rates[0] == pytest.approx(0.0157, abs=1e-4)
    with pytest.raises(UsageError, match="lr_schedule='coda_cosine' is invalid"):  # the code's, not every method's
        strategy_config("naive", {"lr_schedule": "coda_cosine"})


def test_bad_inputs_are_usage_errors():
    scenario = create_scenario("digits32-5")
    torch.manual_seed(0)
    with pytest.raises(UsageError, match="ViT|vit|blocks"):
        create_strategy("coda_prompt", build_backbone("clbench_convnet", in_chans=3, img_size=32), 10,
                        strategy_config("coda_prompt", TINY), seed=0)
    with pytest.raises(UsageError, match="pool_size=65"):  # more components than the 64-wide features
        _strategy(pool_size=65)
    with pytest.raises(UsageError, match="prompt_blocks=5"):  # the tiny ViT has 4 blocks
        _strategy(prompt_blocks=5)
    with pytest.raises(UsageError, match="pool_size=3 is invalid for 5 experiences"):
        _strategy(pool_size=3).on_experience_start(scenario.info(0))
    for key, value in (("ortho_weight", -1.0), ("pool_size", 0), ("prompt_length", 0)):
        with pytest.raises(UsageError, match=key):
            strategy_config("coda_prompt", {key: value})
