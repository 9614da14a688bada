"""EASE: one new adapter (subspace) per task, prototypes in every subspace, old classes' prototypes
complemented by softmax-weighted similarity, and the alpha-reweighted cosine ensemble."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from clbench.strategies.ease import (
    complemented,
    ensemble_logits,
    transferred_prototypes,
)
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from clbench.engine.runner import (
    RunSpec,
    create_scenario,
    create_strategy,
    run,
    strategy_config,
)
from clbench.errors import UsageError
from clbench.models.adapters import AdapterSet
from clbench.models.backbones import build_backbone
from clbench.types import Batch, Phase

E = math.e


def _state(module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _strategy(**overrides):
    torch.manual_seed(0)
    cfg = strategy_config("ease", {"bottleneck": 4, **overrides})
    return create_strategy("ease", build_backbone("clbench_vit_tiny", in_chans=3, img_size=32), 10, cfg, seed=0)


@pytest.fixture(scope="module")
def digits():
    return create_scenario("digits32-5")


@pytest.fixture(scope="module")
def ease_run(tmp_path_factory, fast_config_for):
    """digits32-5 on the tiny ViT, one epoch over all the data per task (the prototype pass sees every image)."""
    snapshots = []

    def keep(i, result, strategy):
        snapshots.append({"backbone": _state(strategy.backbone), "vectors": strategy.task_adapter_vectors.clone(),
                          "prototypes": strategy.prototypes.clone(), "strategy": strategy})

    cfg = fast_config_for(tmp_path_factory.mktemp("ease"), backbone="clbench_vit_tiny", limit_train_batches=None, batch_size=64)
    result = run(RunSpec("ease", "digits32-5", run=cfg, seed=0, strategy_overrides={"bottleneck": 8}), on_experience=keep)
    assert result.status == "completed", result.error
    return result, snapshots


# ---------------------------------------------------------------- a whole run
def test_backbone_frozen_and_one_new_adapter_per_task_older_ones_bit_identical(ease_run):
    result, snapshots = ease_run
    torch.manual_seed(0)
    initial = build_backbone("clbench_vit_tiny", in_chans=3, img_size=32)
    assert _same(snapshots[0]["backbone"], _state(initial))  # the run builds the backbone from seed 0
    assert all(_same(s["backbone"], snapshots[0]["backbone"]) for s in snapshots[1:])
    for i, s in enumerate(snapshots):
        vectors = s["vectors"]
        assert len(vectors) == i + 1  # one adapter per task
        if i:
            assert torch.equal(vectors[:i], snapshots[i - 1]["vectors"])  # earlier adapters untouched
            assert all(not torch.equal(vectors[i], vectors[k]) for k in range(i))  # a different one
    for vector in snapshots[-1]["vectors"]:
        adapters = AdapterSet.for_vit(initial, 8)
        vector_to_parameters(vector, list(adapters.parameters()))
        assert all(a.up.weight.abs().sum() > 0 for a in adapters.adapters)  # each was trained from W_up = 0
    # every task: a gradient phase, then the prototype pass; the run is a completed 5 x 5 accuracy matrix
    assert all({r["phase"] for r in e["flops_step_shapes"]} == {"train", "prototypes"} for e in result.edge["per_experience"])
    assert len(result.accuracy_matrix) == 5 and result.strategy_report["subspaces"] == 5
    assert result.metrics["final_avg_acc"] > 0.2  # well above chance (0.1) after one epoch from random weights


def test_the_profiler_counts_the_stored_task_adapters_in_the_parameters_and_memory(ease_run):
    """Inference runs every finished task's adapter, so each counts like a parameter: after task t the
    backbone, the adapter in training, the evaluation slot, t + 1 stored adapters and the prototypes of
    all 10 classes in each of the t + 1 subspaces."""
    result, snapshots = ease_run
    strategy = snapshots[-1]["strategy"]
    backbone = sum(p.numel() for p in strategy.backbone.parameters())
    one = 4 * (8 * 64 + 8 + 64 * 8 + 64)  # clbench_vit_tiny: 4 blocks of width 64; per block W_down, b_down, W_up, b_up
    for t, record in enumerate(result.edge["per_experience"]):
        stored = (t + 1) * one + (t + 1) * 10 * 64
        assert record["total_params"] == backbone + 2 * one + stored
        assert record["stored_state_bytes"] == stored * 4  # float32


def test_new_class_prototypes_are_mean_embeddings_in_every_subspace(ease_run, digits):
    _, snapshots = ease_run
    strategy = snapshots[-1]["strategy"]
    torch.manual_seed(0)
    plain = build_backbone("clbench_vit_tiny", in_chans=3, img_size=32).eval()
    for i, train_set in enumerate(digits.train_sets):
        x, y = train_set.x, train_set.y
        for s in range(i + 1):  # the subspaces that exist when task i's classes arrive
            adapters = AdapterSet.for_vit(plain, 8).eval()
            vector_to_parameters(strategy.task_adapter_vectors[s], list(adapters.parameters()))
            with torch.no_grad(), strategy.router.using(adapters):
                phi = strategy.backbone(x).double()  # the frozen ViT with adapter s, eval mode
            for c in y.unique().tolist():
                assert torch.allclose(strategy.prototypes[s, c], phi[y == c].mean(0).float(), atol=1e-5), (i, s, c)
                assert torch.equal(snapshots[i]["prototypes"][s, c], strategy.prototypes[s, c])  # made once


def test_old_classes_are_recomplemented_in_every_newer_subspace(ease_run, digits):
    _, snapshots = ease_run
    strategy = snapshots[-1]["strategy"]
    task_of = strategy.class_task
    assert sorted(task_of.tolist()) == sorted(i for i, s in enumerate(digits.train_sets) for _ in s.y.unique())
    p = strategy.prototypes
    for k in range(4):
        old = (task_of == k).nonzero().squeeze(1)
        for s in range(k + 1, 5):
            new = (task_of >= s).nonzero().squeeze(1)  # every class with data in subspace s
            w = torch.softmax(F.cosine_similarity(p[k, old].unsqueeze(1), p[k, new].unsqueeze(0), dim=2), dim=1)
            assert torch.allclose(p[s, old], w @ p[s, new], atol=1e-6), (k, s)
    # recalc_sim: task 0's prototypes in subspace 1 were redone as later classes arrived
    old0 = (task_of == 0).nonzero().squeeze(1)
    assert not torch.allclose(snapshots[1]["prototypes"][1, old0], p[1, old0])


# ---------------------------------------------------------------- the paper's formulas by hand
def test_complemented_prototype_is_the_softmax_weighted_sum_on_a_hand_built_two_class_example():
    # old class 0 (task 0); new classes 1, 2 (task 1); the similarity is measured in subspace 0
    p = torch.zeros(2, 3, 2)
    p[0] = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 5.0]])  # cos(P_0, P_1) = 1, cos(P_0, P_2) = 0
    p[1, 1:] = torch.tensor([[2.0, 0.0], [0.0, 4.0]])
    out = complemented(p, torch.tensor([0, 1, 1]), current=1)
    w1, w2 = E / (E + 1), 1 / (E + 1)  # softmax(1, 0): plain cosines, no temperature
    assert torch.allclose(out[1, 0], torch.tensor([2 * w1, 4 * w2]))
    assert torch.equal(out[:, 1:], p[:, 1:]) and torch.equal(out[0], p[0])  # data prototypes untouched
    assert torch.allclose(transferred_prototypes(p[0, :1], p[0, 1:], p[1, 1:]), out[1, :1])


def test_complement_uses_the_old_classes_own_subspace_and_recalculates_older_subspaces():
    # tasks: class 0 | class 1 | classes 2, 3; rows 9 are placeholders the rule must overwrite (or keep)
    p = torch.zeros(3, 4, 2)
    p[0] = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    p[1] = torch.tensor([[9.0, 9.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    p[2] = torch.tensor([[9.0, 9.0], [9.0, 9.0], [2.0, 0.0], [0.0, 2.0]])
    task = torch.tensor([0, 1, 2, 2])
    out = complemented(p, task, current=2)
    # class 0 in subspace 1, measured in subspace 0 against classes 1, 2, 3: cosines (1, 1, 0)
    assert torch.allclose(out[1, 0], torch.tensor([(E + 1) / (2 * E + 1), E / (2 * E + 1)]))
    # class 0 in subspace 2, against classes 2, 3 in subspace 0: cosines (1, 0)
    assert torch.allclose(out[2, 0], torch.tensor([2 * E / (E + 1), 2 / (E + 1)]))
    # class 1 in subspace 2, measured in ITS subspace 1: cosines (0, 1); subspace 0 would give (1, 0)
    assert torch.allclose(out[2, 1], torch.tensor([2 / (E + 1), 2 * E / (E + 1)]))
    # without recalculation only the newest subspace is filled, with the current task's classes
    kept = complemented(p, task, current=2, recalc=False)
    assert torch.equal(kept[1, 0], torch.tensor([9.0, 9.0]))
    assert torch.allclose(kept[2, :2], out[2, :2])


def _three_subspaces():
    """Sample 0 has phi_s = 3 e_s; prototypes give it the cosines
    s\\c  0    1    2
    0    1.0  0.6  0.0
    1    0.8  1.0  0.6
    2    0.0  0.8  1.0     (class c learned in task c; classes 3.. unseen)"""
    e = torch.eye(3)
    p = torch.zeros(3, 10, 3)
    p[0, :3] = torch.stack([e[0], 3 * e[0] + 4 * e[1], e[1]])
    p[1, :3] = torch.stack([3 * e[0] + 4 * e[1], e[1], 3 * e[1] + 4 * e[2]])
    p[2, :3] = torch.stack([e[0], 3 * e[1] + 4 * e[2], e[2]])
    p = 2.5 * p  # magnitudes must not matter
    features = [torch.stack([3 * e[s], torch.ones(3)]) for s in range(3)]  # sample 1: all-ones
    task = torch.tensor([0, 1, 2] + [-1] * 7)
    return features, p, task


def test_logits_are_the_own_subspace_cosine_plus_alpha_over_the_other_subspaces():
    features, p, task = _three_subspaces()
    logits = ensemble_logits(features, p, task, alpha=0.1)  # the released code: alpha / (3 - 1)
    assert torch.allclose(logits[0, :3], torch.tensor([1 + 0.05 * (0.8 + 0.0), 1 + 0.05 * (0.6 + 0.8), 1 + 0.05 * (0.0 + 0.6)]))
    assert torch.all(logits[:, 3:] == 0)  # unseen classes
    paper = ensemble_logits(features, p, task, alpha=0.1, divisor="tasks")  # the paper: alpha / 3
    assert torch.allclose(paper[0, :3], torch.tensor([1 + 0.8 / 30, 1 + 1.4 / 30, 1 + 0.6 / 30]))
    # sample 1 (all-ones features): cos(1, P) = sum(P) / (sqrt(3) |P|)
    r3 = math.sqrt(3)
    cos = torch.tensor([[1, 7 / 5, 1], [7 / 5, 1, 7 / 5], [1, 7 / 5, 1]]) / r3  # [s][c]
    expected = [cos[c, c] + 0.05 * sum(cos[s, c] for s in range(3) if s != c) for c in range(3)]
    assert torch.allclose(logits[1, :3], torch.stack(expected))
    # one subspace (after the first task): the cosine alone
    assert torch.allclose(ensemble_logits(features[:1], p[:1], torch.tensor([0] + [-1] * 9), 0.1)[0, 0], torch.tensor(1.0))


def test_predict_logits_run_the_rule_over_the_stored_subspaces():
    features, p, task = _three_subspaces()
    strategy = _strategy(alpha_divisor="tasks")
    assert torch.all(strategy.predict_logits(torch.zeros(2, 3, 32, 32)) == 0)  # nothing learned yet
    strategy.task_adapter_vectors = torch.zeros(3, strategy.task_adapter_vectors.shape[1])
    strategy.prototypes, strategy.class_task = p, task
    strategy.subspace_features = lambda x, s: features[s]
    logits = strategy.predict_logits(torch.zeros(2, 3, 32, 32))
    assert torch.allclose(logits[0, :3], torch.tensor([1 + 0.8 / 30, 1 + 1.4 / 30, 1 + 0.6 / 30]))


# ---------------------------------------------------------------- mechanics of one task
def test_each_task_trains_a_fresh_adapter_and_its_own_head_over_the_current_classes(digits):
    strategy = _strategy()
    backbone_before = _state(strategy.backbone)
    strategy.on_experience_start(digits.info(0))
    with torch.no_grad():
        for a in strategy.adapter.adapters:
            a.up.weight.fill_(0.5)  # "trained"
    trained = parameters_to_vector(strategy.adapter.parameters()).clone()
    strategy.on_experience_end(digits.info(0), digits.train_sets[0])
    assert torch.equal(strategy.task_adapter_vectors[0], trained)

    info = digits.info(1)
    strategy.on_experience_start(info)
    assert all(torch.all(a.up.weight == 0) and torch.all(a.up_bias == 0) for a in strategy.adapter.adapters)  # new
    strategy.phase = Phase("train")
    strategy.setup("fit")
    head = strategy.task_head
    assert head.fc.out_features == len(info.classes) and head.scale.item() == 1.0  # cosine head, learnable scale 1
    trainable = {id(p) for p in strategy.trainable_parameters()}
    assert trainable == {id(p) for p in [*strategy.adapter.parameters(), *head.parameters()]}
    x, y = digits.train_sets[1].x[:6], digits.train_sets[1].y[:6]
    strategy.train()
    torch.manual_seed(1)
    loss = strategy.step_losses(Batch(x, y))["ce"]
    torch.manual_seed(1)  # the same adapter dropout draws
    with strategy.router.using(strategy.adapter):
        z = F.normalize(strategy.backbone(x), dim=1) @ F.normalize(head.fc.weight, dim=1).T
    position = torch.tensor([list(info.classes).index(c) for c in y.tolist()])
    assert torch.allclose(loss, F.cross_entropy(z, position))
    strategy.on_experience_end(info, digits.train_sets[1])
    assert strategy.task_head is None and "task_head.fc.weight" not in strategy.state_dict()
    assert _same(_state(strategy.backbone), backbone_before)


def test_the_prototype_pass_runs_every_subspace_unaugmented_in_eval_mode(digits):
    strategy = _strategy()
    strategy.augment = lambda x: x + 100.0  # a train augmentation the pass must not apply
    strategy.on_experience_start(digits.info(0))
    strategy.on_experience_end(digits.info(0), digits.train_sets[0])
    strategy.on_experience_start(digits.info(1))
    strategy.phase = Phase("prototypes", epochs=1)
    strategy.train()
    x, y = digits.train_sets[1].x[:8], digits.train_sets[1].y[:8]
    assert strategy.training_step(Batch(x, y), 0) is None
    assert len(strategy._pass_means) == 2  # the finished subspace and the one just trained
    for s, means in enumerate(strategy._pass_means):
        strategy.eval()
        with torch.no_grad():
            phi = strategy.subspace_features(x, s)
        strategy.train()
        for c in y.unique().tolist():
            assert torch.allclose(means.means[c].float(), phi[y == c].mean(0), atol=1e-6)
    assert strategy.configure_optimizers() is None


# ---------------------------------------------------------------- usage
def test_ease_without_a_vit_backbone_is_a_usage_error(tmp_path, fast_config_for):
    with pytest.raises(UsageError, match="no ViT blocks"):
        run(RunSpec("ease", "digits-5", run=fast_config_for(tmp_path, backbone="clbench_mlp"), seed=0))


@pytest.mark.parametrize("bad", [{"alpha_divisor": "steps"}, {"alpha": -0.1}, {"bottleneck": 0}])
def test_invalid_options_are_usage_errors(bad):
    with pytest.raises(UsageError, match=next(iter(bad))):
        strategy_config("ease", bad)


def test_a_resumed_run_ends_like_an_uninterrupted_one(tmp_path, fast_config_for, resume_pair):
    """The growing adapter and prototype buffers come back from the checkpoint into a fresh strategy."""

    def spec(out, resume):
        return RunSpec("ease", "digits32-5", run=fast_config_for(out, backbone="clbench_vit_tiny"), seed=0,
                       resume=resume, strategy_overrides={"bottleneck": 4})

    whole, resumed = resume_pair(spec, tmp_path, stop_after=1)
    assert resumed.status == "completed" and resumed.accuracy_matrix == whole.accuracy_matrix
    assert resumed.strategy_report == whole.strategy_report == {"subspaces": 5}


def test_paper_settings_are_the_released_configs():
    from clbench.strategies.ease import EASE

    from clbench.engine.runner import paper_settings

    run_values, values = paper_settings(EASE, "cifar100-20")
    assert run_values == {"class_order": "paper", "epochs": 20, "batch_size": 48, "global_batch_size": 48}
    assert values == {"optimizer": "sgd", "lr": 0.025, "momentum": 0.9, "weight_decay": 5e-4, "lr_schedule": "cosine", "bottleneck": 64, "alpha": 0.1}
    default = strategy_config("ease", {})
    assert (default.lr, default.weight_decay, default.lr_schedule, default.bottleneck, default.alpha) == (0.025, 5e-4, "cosine", 64, 0.1)
    assert paper_settings(EASE, "imagenet-r-10")[0] == {"class_order": "paper", "epochs": 20, "batch_size": 16, "global_batch_size": 16}
