"""SGDS (Liu et al., arXiv 2601.21345, as reconstructed in the strategy's docstring): faithfulness checks
(routing, rank, ALLOCATE, REUSE, P(y|c), the similarity order of the new classes in a run, frozen backbone)."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from clbench.strategies.sgds import semantic_probabilities

from clbench.engine.runner import (
    RunSpec,
    create_scenario,
    create_strategy,
    run,
    strategy_config,
)
from clbench.models.backbones import build_backbone
from clbench.types import Batch

K = 4


def _strategy(seed=0, **overrides):
    torch.manual_seed(0)
    cfg = strategy_config("sgds", {"bottleneck": 16, "units_per_class": K, "adapter_dropout": 0.0, **overrides})
    return create_strategy("sgds", build_backbone("clbench_vit_tiny", in_chans=3, img_size=32), 10, cfg, seed=seed)


def _randomise(adapters):
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in adapters.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_semantic_probabilities_are_the_softmax_of_cosines_on_a_hand_built_example():
    p = semantic_probabilities(torch.tensor([2.0, 0.0]), torch.tensor([[1.0, 0.0], [0.0, 3.0], [1.0, 1.0]]), 1.0)
    e = [math.exp(1.0), math.exp(0.0), math.exp(1 / math.sqrt(2))]
    assert p.tolist() == pytest.approx([v / sum(e) for v in e])
    sharp = semantic_probabilities(torch.tensor([2.0, 0.0]), torch.tensor([[1.0, 0.0], [0.0, 3.0]]), 0.5)
    assert sharp.tolist() == pytest.approx([math.exp(2) / (math.exp(2) + 1), 1 / (math.exp(2) + 1)])


def test_a_masked_step_leaves_the_units_outside_the_class_set_bit_identical():
    strategy = _strategy()
    scenario = create_scenario("digits32-5")
    strategy.on_experience_start(scenario.info(0))
    units = [1, 5, 9, 13]
    strategy.unit_sets[0, units] = True
    _randomise(strategy.adapter)
    before = {k: v.clone() for k, v in strategy.adapter.state_dict().items()}
    data = scenario.train_sets[0]
    x = data.x[data.y == 0][:8]
    optimizer = torch.optim.SGD([p for p in strategy.parameters() if p.requires_grad], lr=0.1, weight_decay=0.0)
    strategy.train_loss(Batch(x, torch.zeros(len(x), dtype=torch.long))).backward()
    optimizer.step()
    after = strategy.adapter.state_dict()
    outside = [i for i in range(16) if i not in units]
    for b in range(len(strategy.adapter)):
        down_w, down_b, up_w = (f"adapters.{b}.down.weight", f"adapters.{b}.down.bias", f"adapters.{b}.up.weight")
        assert torch.equal(after[down_w][outside], before[down_w][outside])
        assert torch.equal(after[down_b][outside], before[down_b][outside])
        assert torch.equal(after[up_w][:, outside], before[up_w][:, outside])
        assert not torch.equal(after[up_w][:, units], before[up_w][:, units])  # the class's own units learn


def test_a_class_masked_adapter_output_has_rank_at_most_k():
    strategy = _strategy()
    adapter = strategy.adapter[0]
    _randomise(adapter)
    x = torch.randn(5, 17, 64)
    mask = torch.zeros(5, 16)
    mask[:, [0, 3, 6, 9]] = 1
    with torch.no_grad():
        masked = (adapter(x, mask) - adapter.up_bias).reshape(-1, 64)
        dense = (adapter(x) - adapter.up_bias).reshape(-1, 64)
    assert torch.linalg.matrix_rank(masked.double(), rtol=1e-6) <= K
    assert torch.linalg.matrix_rank(dense.double(), rtol=1e-6) > K  # the bound is the mask's doing


def _two_old_classes(strategy, new_prototypes):
    """Task 2 of digits32-5 (classes 2, 3 new) after classes 0 and 1 took units 0-3 and 4-7."""
    strategy.on_experience_start(create_scenario("digits32-5").info(1))
    eye = torch.eye(64, dtype=torch.float64)
    for c, proto in zip((0, 1, 2, 3), (eye[0], eye[1], *new_prototypes)):
        strategy.ptm_means.sums[c], strategy.ptm_means.counts[c] = proto, 1
    strategy.unit_sets[0, 0:4] = strategy.unit_sets[1, 4:8] = True
    strategy.unit_usage[0:8] = 1
    return eye


def test_allocate_gives_a_dissimilar_class_unused_units_and_counts_them():
    strategy = _strategy()
    eye = torch.eye(64, dtype=torch.float64)
    _two_old_classes(strategy, (eye[2], eye[3]))  # orthogonal to every old prototype
    usage_before = strategy.unit_usage.clone()
    strategy.assign_units([2, 3])
    s0, s1, s2, s3 = (set(strategy.unit_sets[c].nonzero().flatten().tolist()) for c in range(4))
    assert len(s2) == len(s3) == K
    assert not s2 & (s0 | s1) and not s3 & (s0 | s1 | s2)  # 8 units were free: all disjoint
    grown = (strategy.unit_usage - usage_before).tolist()
    assert grown == [1 if i in s2 | s3 else 0 for i in range(16)]
    assert [d["strategy"] for d in strategy.decisions] == ["allocate", "allocate"]


def test_reuse_puts_a_class_equal_to_an_old_one_into_its_neighbours_units():
    strategy = _strategy(reuse_epsilon=0.0)
    eye = torch.eye(64, dtype=torch.float64)
    _two_old_classes(strategy, (eye[0] * 3, eye[3]))  # class 2 has class 0's prototype direction
    strategy.assign_units([2, 3])
    s0 = set(strategy.unit_sets[0].nonzero().flatten().tolist())
    assert set(strategy.unit_sets[2].nonzero().flatten().tolist()) == s0  # one neighbour with k units
    first = strategy.decisions[0]  # the most similar new class is decided first
    assert (first["class"], first["strategy"], first["neighbour"], first["overlap"]) == (2, "reuse", 0, K)
    assert strategy.decisions[1]["strategy"] == "allocate"


def test_a_run_keeps_the_backbone_frozen_infers_dense_and_reports_the_decisions(tmp_path, fast_config_for):
    snapshots = []

    def keep(i, result, strategy):
        snapshots.append(({k: v.clone() for k, v in strategy.backbone.state_dict().items()}, strategy))

    cfg = fast_config_for(tmp_path, backbone="clbench_vit_tiny", epochs=1, limit_train_batches=None)
    overrides = {"bottleneck": 16, "units_per_class": K, "align_epochs": 1, "align_per_class": 8}
    result = run(RunSpec("sgds", "digits32-5", run=cfg, seed=0, strategy_overrides=overrides), on_experience=keep)
    assert result.status == "completed", result.error
    first = snapshots[0][0]
    assert all(torch.equal(state[k], first[k]) for state, _ in snapshots[1:] for k in first)
    strategy = snapshots[-1][1]
    assert len(result.strategy_report["units"]) == 10 and all(strategy.unit_sets.sum(1) == K)
    assert result.strategy_report["units_exhausted_at_task"] == strategy.units_exhausted_at
    scenario = create_scenario("digits32-5")
    last = scenario.train_sets[-1]
    strategy.eval()
    with torch.no_grad():
        plain = strategy.backbone(last.x)  # prototypes: the frozen PTM's [CLS] means
        for c in last.y.unique().tolist():
            assert torch.allclose(strategy.prototypes[c].float(), plain[last.y == c].mean(0), atol=1e-5)
        x = scenario.test_sets[0].x[:4]
        dense = strategy.cfg.scale * strategy.head(strategy.features(x))  # no labels, no mask
        assert torch.allclose(strategy.predict_logits(x), dense)


class _Stop(Exception):
    """Ends a run once the experiences a test needs are done."""


class _HandSetPrototypes(pl.Callback):
    """Experience 1, once its prototype pass has measured the new classes and before the module's
    own end-of-fit (where the units are assigned): the prototypes of classes 0-3 are set by hand."""

    def __init__(self, prototypes):
        self.prototypes = prototypes

    def on_fit_end(self, trainer, pl_module):  # the callbacks' on_fit_end runs before the module's
        if pl_module.phase.name == "prototypes" and pl_module.experience.index == 1:
            for c, proto in self.prototypes.items():
                pl_module.ptm_means.sums[c], pl_module.ptm_means.counts[c] = proto, 1


def test_a_run_decides_the_new_classes_in_order_of_similarity_not_of_labels(tmp_path, fast_config_for):
    """8 units, 4 per class: task 0's classes 0 and 1 take them all. In task 1 class 3 (the second
    label) is class 0's twin and class 2 is unlike every old class, so the most similar class comes
    last in label order. Deciding 3 first reuses S_0 (usage 2 there), and class 2's ALLOCATE then
    finds exactly S_1 least used; deciding 2 first would face a tie among all 8 units."""
    eye = torch.eye(64, dtype=torch.float64)
    hand = _HandSetPrototypes({0: eye[0], 1: eye[1], 2: eye[2], 3: 3 * eye[0]})
    kept, exhausted = {}, {}

    def stop_after_task_1(i, result, strategy):
        kept[i] = (strategy.unit_sets.clone(), strategy.unit_usage.clone(), list(strategy.decisions), strategy)
        exhausted[i] = strategy.units_exhausted_at
        if i == 1:
            raise _Stop

    cfg = fast_config_for(tmp_path, backbone="clbench_vit_tiny", epochs=1, limit_train_batches=1, profile=False)
    overrides = {"bottleneck": 8, "units_per_class": K, "reuse_epsilon": 0.0, "align_epochs": 1, "align_per_class": 8}
    with pytest.raises(_Stop):
        run(RunSpec("sgds", "digits32-5", run=cfg, seed=0, strategy_overrides=overrides), callbacks=[hand],
            on_experience=stop_after_task_1)
    sets_0, _, _, _ = kept[0]
    s0, s1 = (set(sets_0[c].nonzero().flatten().tolist()) for c in (0, 1))
    assert len(s0) == len(s1) == K and not s0 & s1  # task 0: two disjoint sets, every unit used
    sets, usage, decisions, strategy = kept[1]
    assert torch.allclose(strategy.prototypes[3], 3 * eye[0])  # the hand-set prototypes were the ones used
    s2, s3 = (set(sets[c].nonzero().flatten().tolist()) for c in (2, 3))
    assert s3 == s0  # one neighbour with k units, epsilon 0: its set
    assert s2 == s1  # after the reuse, S_1's units are the least used
    assert usage.tolist() == [2] * 8
    assert torch.equal(sets[:2], sets_0[:2])  # masks never change once assigned
    assert [(d["class"], d["strategy"]) for d in decisions[2:]] == [(3, "reuse"), (2, "allocate")]
    # task 0's second class found exactly k unused units; task 1's ALLOCATE found none: the first
    # task short of free units is 1
    assert exhausted == {0: None, 1: 1}


def test_a_runs_training_fit_leaves_the_units_of_no_class_bit_identical(tmp_path, fast_config_for, fit_snapshots):
    """16 units, 4 per class: task 0's two classes own 8; the other 8 units get no gradient from
    the masked steps (with weight decay 0 instead of the recipe's 5e-4, which shrinks every weight),
    in every block, while the owned units learn."""
    snaps = fit_snapshots(lambda m: {"adapter": m.adapter.state_dict(), "sets": m.unit_sets}, by_phase=True)

    def stop(i, result, strategy):
        raise _Stop

    cfg = fast_config_for(tmp_path, backbone="clbench_vit_tiny", epochs=1, limit_train_batches=2, profile=False)
    overrides = {"bottleneck": 16, "units_per_class": K, "align_epochs": 1, "align_per_class": 8, "weight_decay": 0.0}
    with pytest.raises(_Stop):
        run(RunSpec("sgds", "digits32-5", run=cfg, seed=0, strategy_overrides=overrides), callbacks=[snaps],
            on_experience=stop)
    before, after = snaps.at[(0, "train", "start")], snaps.at[(0, "train", "end")]
    owned = before["sets"][0] | before["sets"][1]
    assert int(owned.sum()) == 2 * K
    free = (~owned).nonzero().flatten().tolist()
    used = owned.nonzero().flatten().tolist()
    b, a = before["adapter"], after["adapter"]
    blocks = {k.split(".")[1] for k in b if k.startswith("adapters.")}
    for block in blocks:
        down_w, down_b, up_w = (f"adapters.{block}.down.weight", f"adapters.{block}.down.bias", f"adapters.{block}.up.weight")
        assert torch.equal(a[down_w][free], b[down_w][free]) and torch.equal(a[down_b][free], b[down_b][free])
        assert torch.equal(a[up_w][:, free], b[up_w][:, free])
        assert not torch.equal(a[up_w][:, used], b[up_w][:, used])


def test_union_inference_keeps_only_the_units_of_the_assigned_sets():
    """Classes 0 and 1 own units 0-3 and 4-7 of 16: with inference_units="union" every label-free
    forward equals the dense forward of an adapter whose units 8-15 are cut out by hand (their rows
    of W_down and entries of b_d zeroed: ReLU(0) = 0, so they add nothing)."""
    import copy

    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    predictions = {}
    for units in ("dense", "union"):
        strategy = _strategy(inference_units=units)
        strategy.on_experience_start(create_scenario("digits32-5").info(0))
        strategy.unit_sets[0, 0:4] = strategy.unit_sets[1, 4:8] = True
        _randomise(strategy.adapter)
        strategy.eval()
        predictions[units] = strategy.predict_logits(x)
        features = strategy.eval_features(x)  # what the stage-2 Gaussians are measured on
    assert strategy.cfg.inference_units == "union" and _strategy().cfg.inference_units == "dense"  # the default
    cut = copy.deepcopy(strategy.adapter)
    with torch.no_grad():
        for adapter in cut.adapters:
            adapter.down.weight[8:] = 0
            adapter.down.bias[8:] = 0
        with strategy.router.using(cut):
            by_hand = strategy.backbone(x)
        with strategy.router.using(strategy.adapter):
            dense = strategy.backbone(x)
    assert torch.allclose(features, by_hand, atol=1e-6)
    assert torch.allclose(predictions["union"], strategy.cfg.scale * strategy.head(by_hand), atol=1e-5)
    assert torch.allclose(predictions["dense"], strategy.cfg.scale * strategy.head(dense), atol=1e-5)
    assert (predictions["union"] - predictions["dense"]).abs().max() > 1e-3  # units 8-15 mattered
    strategy.unit_sets[2, 8:12] = strategy.unit_sets[3, 12:16] = True  # every unit used: union is dense
    assert torch.allclose(strategy.predict_logits(x), predictions["dense"], atol=1e-6)


def test_inference_units_must_be_dense_or_union():
    from clbench.errors import UsageError

    with pytest.raises(UsageError, match="inference_units"):
        _strategy(inference_units="masked")


def test_units_per_class_must_lie_between_one_and_the_bottleneck():
    from clbench.errors import UsageError

    for k in (0, 17):
        with pytest.raises(UsageError, match=rf"units_per_class={k} is invalid; expected 1 to bottleneck \(16\)"):
            _strategy(units_per_class=k)
    assert _strategy(units_per_class=1).cfg.units_per_class == 1
    assert _strategy(units_per_class=16).cfg.units_per_class == 16  # every unit for one class


def test_allocate_takes_the_least_used_units_in_the_order_of_a_permutation_drawn_from_the_runs_seed():
    """Task 0, no old class: both classes ALLOCATE. Ties among the least used units are broken by a
    random permutation of the units drawn from a generator seeded with the run's seed (seed + 41),
    whatever the global RNG holds: class 0 takes the permutation's first k units, class 1 the first k
    of the next permutation that are still unused. 32 units: above 16, an unstable sort of the tied
    usage counts would reorder them."""
    g = torch.Generator().manual_seed(0 + 41)
    first = torch.randperm(32, generator=g).tolist()
    second = torch.randperm(32, generator=g).tolist()
    s0 = first[:K]
    s1 = [u for u in second if u not in s0][:K]
    for global_seed in (1, 2):
        strategy = _strategy(bottleneck=32)
        strategy.on_experience_start(create_scenario("digits32-5").info(0))
        torch.manual_seed(global_seed)
        strategy.assign_units([0, 1])
        assert strategy.unit_sets[0].nonzero().flatten().tolist() == sorted(s0)
        assert strategy.unit_sets[1].nonzero().flatten().tolist() == sorted(s1)
        assert strategy.unit_usage.tolist() == [1 if u in s0 + s1 else 0 for u in range(32)]
        assert strategy.decisions == [{"class": 0, "task": 0, "strategy": "allocate", "units": sorted(s0)},
                                      {"class": 1, "task": 0, "strategy": "allocate", "units": sorted(s1)}]
        assert strategy.units_exhausted_at is None  # 28 free units were left for class 1
    other = _strategy(seed=1, bottleneck=32)  # the run's seed reaches the strategy
    other.on_experience_start(create_scenario("digits32-5").info(0))
    other.assign_units([0, 1])
    assert other.unit_sets[0].nonzero().flatten().tolist() != sorted(s0)  # another seed, other units


def test_reuse_at_exactly_the_threshold_takes_the_neighbours_units_and_reports_the_decision():
    """cos(3 e0 + 4 e2, e0) = 3/5 exactly: with gamma_r = 0.6 class 2 REUSEs class 0's units (the
    threshold is inclusive); with the default epsilon (1e-6) the k draws take the neighbour's k units."""
    strategy = _strategy(reuse_threshold=0.6)
    eye = torch.eye(64, dtype=torch.float64)
    _two_old_classes(strategy, (3 * eye[0] + 4 * eye[2], eye[3]))
    strategy.assign_units([2, 3])
    reuse, allocate = strategy.decisions
    assert reuse == {"class": 2, "task": 1, "neighbour": 0, "similarity": 0.6, "strategy": "reuse",
                     "units": [0, 1, 2, 3], "overlap": K}
    assert (allocate["class"], allocate["task"], allocate["strategy"], allocate["similarity"]) == (3, 1, "allocate", 0.0)
    assert allocate["neighbour"] == 0 and allocate["overlap"] == 0  # 8 units were free: none shared with S_0
    assert strategy.unit_sets[2].nonzero().flatten().tolist() == [0, 1, 2, 3]
    assert strategy.unit_usage[:4].tolist() == [2, 2, 2, 2]


def test_reuse_draws_from_every_neighbour_at_or_above_the_threshold():
    """Class 0 owns only units 0 and 1, class 1 units 4-7; the new class 2 equals class 0 (cos 1)
    and has cos exactly 0.6 = gamma_r with class 1, so both are neighbours: with epsilon 0 its k = 4
    units are drawn from {0, 1, 4, 5, 6, 7}, at least two of them class 1's."""
    strategy = _strategy(reuse_threshold=0.6, reuse_epsilon=0.0)
    eye = torch.eye(64, dtype=torch.float64)
    _two_old_classes(strategy, (eye[0], eye[5]))
    strategy.ptm_means.sums[1] = 3 * eye[0] + 4 * eye[1]
    strategy.unit_sets[0] = False
    strategy.unit_sets[0, :2] = True
    strategy.assign_units([2, 3])
    drawn = set(strategy.unit_sets[2].nonzero().flatten().tolist())
    assert len(drawn) == K and drawn <= {0, 1, 4, 5, 6, 7} and len(drawn & {4, 5, 6, 7}) >= 2
    assert strategy.decisions[0]["strategy"] == "reuse" and strategy.decisions[0]["neighbour"] == 0
    assert strategy.decisions[0]["overlap"] == len(drawn & {0, 1})  # |S_2 & S_0|, S_0 = {0, 1}


def test_reuse_draws_come_from_the_unit_generator_and_survive_a_resume():
    """A neighbour with 8 units and k = 4: which 4 are drawn depends on the unit generator only (not
    the global RNG), and its state travels in the resume state (`extra_state`)."""
    eye = torch.eye(64, dtype=torch.float64)
    drawn = []
    for global_seed in (1, 2):
        strategy = _strategy(reuse_epsilon=0.0)
        _two_old_classes(strategy, (eye[0], eye[3]))
        strategy.unit_sets[0, 0:8] = True
        torch.manual_seed(global_seed)
        strategy.assign_units([2, 3])
        drawn.append(strategy.unit_sets[2].nonzero().flatten().tolist())
        assert len(drawn[-1]) == K and set(drawn[-1]) <= set(range(8))
    assert drawn[0] == drawn[1]
    # resume: the module's state and the extra state saved after task 1, loaded into a new strategy
    resumed = _strategy(reuse_epsilon=0.0)
    resumed.on_experience_start(create_scenario("digits32-5").info(1))
    resumed.load_state_dict(strategy.state_dict())
    resumed.load_extra_state(strategy.extra_state())
    reseeded = _strategy(reuse_epsilon=0.0)  # the same, with the generator's state not carried over
    reseeded.on_experience_start(create_scenario("digits32-5").info(1))
    reseeded.load_state_dict(strategy.state_dict())
    for s in (strategy, resumed, reseeded):  # task 2: class 4 is class 0's twin, class 5 unlike all
        s.on_experience_start(create_scenario("digits32-5").info(2))
        s.ptm_means.sums[4], s.ptm_means.counts[4] = eye[0], 1
        s.ptm_means.sums[5], s.ptm_means.counts[5] = eye[9], 1
        s.assign_units([4, 5])
    assert torch.equal(resumed.unit_sets, strategy.unit_sets)
    assert not torch.equal(reseeded.unit_sets, strategy.unit_sets)


def test_the_label_free_features_of_the_class_statistics_are_measured_without_dropout():
    """Stage 2 measures the Gaussians with `eval_features` while the module is in training mode:
    dropout must be off there, the adapter's and the backbone's (a ViT built with dropout here), so
    the features equal those of the module in eval mode; the modes are given back afterwards."""
    import timm

    torch.manual_seed(0)
    backbone = timm.create_model("clbench_vit_tiny", num_classes=0, in_chans=3, img_size=32, proj_drop_rate=0.5)
    cfg = strategy_config("sgds", {"bottleneck": 16, "units_per_class": K, "adapter_dropout": 0.5, "inference_units": "union"})
    strategy = create_strategy("sgds", backbone, 10, cfg, seed=0)
    strategy.on_experience_start(create_scenario("digits32-5").info(0))
    strategy.unit_sets[0, 0:4] = strategy.unit_sets[1, 4:8] = True
    _randomise(strategy.adapter)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    strategy.train()
    measured = strategy.eval_features(x)
    assert strategy.adapter.training and strategy.backbone.training
    strategy.eval()
    with torch.no_grad():
        expected = strategy.features(x, unit_mask=strategy.unit_sets.any(0).float().expand(4, -1))
        out = strategy(x)  # the forward add-ons read: the same label-free features, and s times the cosines
    assert torch.allclose(measured, expected, atol=1e-6)
    assert torch.allclose(out.features, expected, atol=1e-6)
    assert torch.allclose(out.logits, strategy.cfg.scale * strategy.head(expected), atol=1e-5)


def test_the_masked_training_loss_is_cosface_over_the_tasks_classes_with_the_margin():
    """Stage 1's loss, written out: per sample, the cosines of the current task's classes under the
    sample's class mask, the margin m subtracted from its own class's, cross-entropy of s times them."""
    strategy = _strategy(margin=0.3)
    scenario = create_scenario("digits32-5")
    strategy.on_experience_start(scenario.info(1))  # classes 2 and 3
    strategy.unit_sets[2, 0:4] = strategy.unit_sets[3, 4:8] = True
    _randomise(strategy.adapter)
    data = scenario.train_sets[1]
    pick = torch.cat([(data.y == 2).nonzero()[:3, 0], (data.y == 3).nonzero()[:3, 0]])
    x, y = data.x[pick], data.y[pick]
    loss = strategy.train_loss(Batch(x, y))
    with torch.no_grad():
        total = 0.0
        for i in range(len(x)):
            cosines = strategy.head(strategy.features(x[i:i + 1], unit_mask=strategy.unit_sets[y[i:i + 1]].float()))[0]
            z = [float(cosines[c]) - (0.3 if c == int(y[i]) else 0.0) for c in (2, 3)]
            own = z[(2, 3).index(int(y[i]))]
            total += -(strategy.cfg.scale * own - math.log(sum(math.exp(strategy.cfg.scale * v) for v in z)))
    assert set(y.tolist()) == {2, 3}
    assert loss.item() == pytest.approx(total / len(x), rel=1e-5)
