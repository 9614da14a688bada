"""SAEF: faithfulness checks (forest shape, pairing, merge, entropy-guided descent,
confidence-weighted combination, clustering, frozen backbone and untouched leaves)."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from clbench.strategies.saef import (
    Node,
    build_tree,
    cluster_tasks,
    combine,
    descend,
    sign_elected_merge,
)

from clbench.engine.runner import RunSpec, run


def _leaves(prototypes, dim=3):
    thetas = torch.arange(len(prototypes) * dim, dtype=torch.float32).reshape(len(prototypes), dim) ** 1.5
    units = F.normalize(torch.tensor(prototypes, dtype=torch.float64), dim=1)
    return [Node(thetas[i], units[i], [i]) for i in range(len(prototypes))], thetas


def test_a_cluster_of_n_leaves_is_a_balanced_binary_tree_of_merged_means():
    angles = [0.0, 0.1, 0.9, 1.0, 2.0, 2.3]
    leaves, thetas = _leaves([[math.cos(a), math.sin(a)] for a in angles])
    root = build_tree(leaves, thetas)
    internal = [n for n in root.nodes() if not n.is_leaf]
    assert len(internal) == 5 and all(len(n.children) == 2 for n in internal)
    assert root.depth == math.ceil(math.log2(6))
    assert sorted(root.leaves) == list(range(6))
    assert sorted(n.leaves[0] for n in root.nodes() if n.is_leaf) == list(range(6))  # each task exactly once
    for n in internal:  # every node is the mean of its leaves
        assert torch.allclose(n.theta, thetas[n.leaves].mean(0))
        a, b = n.children  # the prototype: the children's, weighted by their leaf counts
        assert torch.allclose(n.prototype, F.normalize(len(a.leaves) * a.prototype + len(b.leaves) * b.prototype, dim=0))


def test_the_first_parent_joins_the_two_most_similar_leaves():
    leaves, thetas = _leaves([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.62, 0.78]])
    root = build_tree(leaves, thetas)
    first = next(n for n in root.nodes() if n.created == 0)
    assert sorted(first.leaves) == [2, 3]



def test_sign_elected_merge_on_a_hand_example():
    thetas = torch.tensor([[1.0, -2.0, 0.5, 3.0], [3.0, 1.0, -4.0, 2.0], [-1.0, -0.5, 0.25, -4.0]])
    # signs of the sums: +, -, -, +; largest magnitude among the agreeing entries: 3, 2, 4, 3.
    # In the last column the sign election matters: 3 + 2 > 4 elects +, so the merge keeps 3, not -4
    assert sign_elected_merge(thetas).tolist() == [3.0, -2.0, -4.0, 3.0]


def test_sign_max_parents_are_the_sign_elected_merge_of_their_leaves():
    thetas = torch.tensor([[3.0, -1.0, 0.5], [2.0, -1.5, 0.25], [-4.0, 2.0, -0.6]])
    units = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]], dtype=torch.float64), dim=1)
    root = build_tree([Node(thetas[i], units[i], [i]) for i in range(3)], thetas, rule="sign_max")
    pair = next(n for n in root.nodes() if n.created == 0)
    assert sorted(pair.leaves) == [0, 1] and pair.theta.tolist() == [3.0, -1.5, 0.5]
    # the root over all three: + (3 + 2 > 4), - (-1 - 1.5 + 2 < 0), + (0.5 + 0.25 > 0.6); the plain
    # largest magnitudes would be -4, 2, -0.6
    assert root.theta.tolist() == [3.0, -1.5, 0.5]


def _mock_tree():
    """A 4-leaf tree whose node entropies are set by hand; each node's q is one-hot on its own id."""
    leaves, thetas = _leaves([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [0.1, 0.99]])
    root = build_tree(leaves, thetas)
    nodes = root.nodes()
    entropy = {id(root): 2.0}
    left, right = root.children
    entropy[id(left)], entropy[id(right)] = 1.5, 0.7
    for child, h in zip(right.children, (0.9, 0.2)):
        entropy[id(child)] = h
    for child, h in zip(left.children, (0.1, 0.3)):
        entropy[id(child)] = h
    calls = []

    def evaluate(node, index):
        calls.append((node, len(index)))
        q = F.one_hot(torch.full((len(index),), nodes.index(node)), len(nodes)).float()
        return q, torch.full((len(index),), entropy[id(node)])

    return root, nodes, evaluate, calls


def test_descent_follows_the_lower_entropy_child_and_exits_early():
    root, nodes, evaluate, calls = _mock_tree()
    q, h, count = descend(root, 3, evaluate, exit_entropy=10.0)  # above every entropy: the root only
    assert count.tolist() == [1, 1, 1] and [c[0] for c in calls] == [root] and torch.all(q.argmax(1) == nodes.index(root))
    root, nodes, evaluate, calls = _mock_tree()
    q, h, count = descend(root, 3, evaluate, exit_entropy=0.0)  # never confident: down to a leaf
    right = root.children[1]
    expected = right.children[1]  # 0.7 < 1.5, then 0.2 < 0.9
    assert torch.all(q.argmax(1) == nodes.index(expected)) and expected.is_leaf and torch.all(h == 0.2)
    assert count.tolist() == [1 + 2 * 2] * 3  # per sample: the root, then both children at each of 2 levels
    root, nodes, evaluate, calls = _mock_tree()
    q, h, count = descend(root, 3, evaluate, exit_entropy=1.0)  # stops at the right child (0.7 < 1.0)
    assert torch.all(q.argmax(1) == nodes.index(root.children[1])) and count.tolist() == [3, 3, 3]


def test_trees_are_combined_by_softmax_of_minus_entropy():
    q1, q2 = torch.tensor([[0.7, 0.2, 0.1]]), torch.tensor([[0.1, 0.1, 0.8]])
    h1, h2 = torch.tensor([0.8]), torch.tensor([0.3])
    w1, w2 = math.exp(-0.8) / (math.exp(-0.8) + math.exp(-0.3)), math.exp(-0.3) / (math.exp(-0.8) + math.exp(-0.3))
    assert torch.allclose(combine([q1, q2], [h1, h2]), w1 * q1 + w2 * q2)
    assert torch.allclose(combine([q1], [h1]), q1)  # a single tree: its expert's prediction


def test_clusters_split_orthogonal_groups_and_keep_identical_ones_together():
    groups = torch.tensor([[1.0, 0.0], [0.95, 0.05], [0.0, 1.0], [0.05, 0.95]])
    assert cluster_tasks(groups, 0.5) == [[0, 1], [2, 3]]
    assert cluster_tasks(torch.ones(4, 2), 0.5) == [[0, 1, 2, 3]]


class _TrainedAdapters(pl.Callback):
    def __init__(self):
        self.thetas = []

    def on_fit_end(self, trainer, pl_module):
        if pl_module.phase.name == "train":
            from torch.nn.utils import parameters_to_vector

            self.thetas.append(parameters_to_vector(pl_module.adapter.parameters()).detach().clone())


def test_a_run_keeps_the_backbone_and_every_leaf_as_trained(tmp_path, fast_config_for):
    trained, backbones = _TrainedAdapters(), []
    cfg = fast_config_for(tmp_path, backbone="clbench_vit_tiny", epochs=1, limit_train_batches=3)
    overrides = {"bottleneck": 4, "align_epochs": 1, "align_per_class": 8, "cluster_threshold": 0.999}
    keep = lambda i, result, s: backbones.append(({k: v.clone() for k, v in s.backbone.state_dict().items()}, s))  # noqa: E731
    result = run(RunSpec("saef", "digits32-5", run=cfg, seed=0, strategy_overrides=overrides), callbacks=[trained],
                 on_experience=keep)
    assert result.status == "completed", result.error
    first = backbones[0][0]
    assert all(torch.equal(state[k], first[k]) for state, _ in backbones[1:] for k in first)
    strategy = backbones[-1][1]
    assert len(trained.thetas) == 5
    for t, theta in enumerate(trained.thetas):  # leaves untouched by four forest rebuilds
        assert torch.equal(strategy.task_adapters[t], theta)
    leaves = sorted(i for tree in strategy.forest for i in tree.leaves)
    assert leaves == [0, 1, 2, 3, 4] and result.strategy_report["trees"]
    assert result.strategy_report["expert_forwards_per_sample"] >= len(strategy.forest)
    internal = [n for tree in strategy.forest for n in tree.nodes() if not n.is_leaf]
    assert internal  # the run's forest merges: every internal node is the mean of the adapters trained below it
    for node in internal:
        assert torch.allclose(node.theta, torch.stack([trained.thetas[i] for i in node.leaves]).mean(0), atol=1e-7)
    _predicts_by_descent_and_confidence_weights(strategy)


def _predicts_by_descent_and_confidence_weights(strategy):
    """The run's predictions against the inference rule written out per sample: in every tree, from
    the root, while the node is inner and its entropy >= tau_e, go to the child of lower entropy;
    then p = sum_k exp(-H_k) q_k / sum_j exp(-H_j) over the trees."""
    from clbench.engine.runner import create_scenario

    strategy.eval()
    x = torch.cat([t.x[:3] for t in create_scenario("digits32-5").test_sets[:3]])
    tau, expected = strategy.cfg.exit_entropy, []
    every = {id(n): strategy.expert_prediction(n.theta, x) for tree in strategy.forest for n in tree.nodes()}
    for i in range(len(x)):
        qs, hs = [], []
        for node in strategy.forest:
            q, h = (v[i] for v in every[id(node)])
            while not node.is_leaf and float(h) >= tau:
                (left, right), [(ql, hl), (qr, hr)] = node.children, [(v[i] for v in every[id(c)]) for c in node.children]
                node, q, h = (left, ql, hl) if float(hl) <= float(hr) else (right, qr, hr)
            qs.append(q), hs.append(float(h))
        weights = [math.exp(-h) / sum(math.exp(-g) for g in hs) for h in hs]
        expected.append(sum(w * q for w, q in zip(weights, qs)))
    assert torch.allclose(strategy.predict_logits(x).exp(), torch.stack(expected), atol=1e-5)


def test_a_sign_max_run_merges_each_parent_by_sign_election(tmp_path, fast_config_for, sign_elected_by_hand):
    """`merge="sign_max"`: every internal node of a run's tree is the sign-elected max-magnitude merge
    of the adapters trained for the tasks below it (merged here element by element)."""
    trained = _TrainedAdapters()
    cfg = fast_config_for(tmp_path, backbone="clbench_vit_tiny", epochs=1, limit_train_batches=2)
    overrides = {"bottleneck": 4, "align_epochs": 1, "align_per_class": 8, "cluster_threshold": -1.0, "merge": "sign_max"}
    held = []
    result = run(RunSpec("saef", "digits32-5", run=cfg, seed=0, strategy_overrides=overrides), callbacks=[trained],
                 on_experience=lambda i, r, s: held.append(s))
    assert result.status == "completed", result.error
    (root,) = held[-1].forest  # one cluster of the five tasks: four merged nodes over three levels
    assert sorted(root.leaves) == [0, 1, 2, 3, 4] and root.depth == 3
    assert len([n for n in root.nodes() if not n.is_leaf]) == 4
    for node in (n for n in root.nodes() if not n.is_leaf):
        below = torch.stack([trained.thetas[i] for i in node.leaves])
        assert torch.equal(node.theta, sign_elected_by_hand(below))
    below = torch.stack(trained.thetas)  # the root's adapters disagree in sign where sign election matters
    assert not torch.equal(below.gather(0, below.abs().argmax(0, keepdim=True))[0], root.theta)


def test_each_sample_counts_its_own_expert_forwards():
    root, nodes, evaluate, calls = _mock_tree()

    def per_sample(node, index):  # sample 0 is confident at the root already
        q, h = evaluate(node, index)
        return q, torch.where(index == 0, torch.tensor(0.5), h) if node is root else h

    q, h, count = descend(root, 3, per_sample, exit_entropy=1.0)
    assert count.tolist() == [1, 3, 3]


def test_inference_cost_is_recorded_as_a_distribution(tmp_path, fast_config_for):
    cfg = fast_config_for(tmp_path, backbone="clbench_vit_tiny", epochs=1, limit_train_batches=2)
    overrides = {"bottleneck": 4, "align_epochs": 1, "align_per_class": 8, "exit_entropy": 0.0}
    result = run(RunSpec("saef", "digits32-2", run=cfg, seed=0, strategy_overrides=overrides))
    assert result.status == "completed", result.error
    tests = result.scenario_info["test_sizes"]
    first, second = result.diagnostics
    # one tree of one leaf, then of two: every sample ends at a leaf (tau_e = 0): 1, then 1 + 2 forwards
    # over the seen test sets only: the first task's after task 0, both after task 1
    assert first["expert_forwards_histogram"] == {1: tests[0]}
    assert second["expert_forwards_histogram"] == {3: tests[0] + tests[1]}
    flops = second["inference_flops_per_sample"]
    assert flops["min"] == flops["max"] == 3 * second["flops_per_expert_forward"] > 0


@pytest.mark.parametrize("threshold, trees, parents", [(2.0, 2, 0), (-1.0, 1, 1)])
def test_the_profiler_counts_the_stored_leaf_and_parent_adapters(tmp_path, fast_config_for, threshold, trees, parents):
    """After 2 tasks: 2 leaves; one tree of both also holds their merged parent for inference."""
    counted, model, forests = [], [], []

    def keep(i, result, s):
        counted.append(sum(p.numel() for p in s.parameters()))
        model.append(sum(p.numel() for m in (s.backbone, s.head) for p in m.parameters()))
        forests.append(len(s.forest))

    cfg = fast_config_for(tmp_path, backbone="clbench_vit_tiny", epochs=1, limit_train_batches=1, flops="off")
    overrides = {"bottleneck": 4, "align_epochs": 1, "align_per_class": 8, "cluster_threshold": threshold}
    result = run(RunSpec("saef", "digits32-2", run=cfg, seed=0, strategy_overrides=overrides), on_experience=keep)
    assert result.status == "completed", result.error
    assert forests[-1] == trees
    # one adapter set from its shapes (clbench_vit_tiny: 4 blocks of width 64, bottleneck 4):
    # per block W_down 4 x 64, b_d 4, W_up 64 x 4, b_u 64
    one = 4 * (4 * 64 + 4 + 64 * 4 + 64)
    assert counted[-1] == model[-1] + 2 * one  # backbone, head, the adapter in training, the evaluation slot
    record = result.edge["per_experience"][-1]
    assert record["total_params"] == counted[-1] + (2 + parents) * one
    assert record["stored_state_bytes"] == (2 + parents) * one * 4
    assert result.edge["per_experience"][0]["total_params"] == counted[0] + one


# --------------------------------------------------------------------------- edges of the forest's rules
def test_clustering_merges_at_exactly_the_threshold_breaks_ties_by_task_order_and_accepts_minus_infinity():
    same = torch.tensor([[1.0, 0.0], [2.0, 0.0]])  # cosine exactly 1
    assert cluster_tasks(same, 1.0) == [[0, 1]]  # merged while the best average similarity is >= delta_c
    # sim(0, 1) = sim(1, 2) = 1/sqrt(2) exactly (the same normalised vector), sim(0, 2) = 0: the tie goes
    # to the earlier pair; {0, 1} and {2} then average 0.35 < 0.6
    chain = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    assert cluster_tasks(chain, 0.6) == [[0, 1], [2]]
    assert cluster_tasks(chain, float("-inf")) == [[0, 1, 2]]  # no threshold at all: one cluster
    assert cluster_tasks(chain[:1], 0.5) == [[0]]


def test_parents_are_numbered_in_the_order_they_are_created_level_by_level():
    angles = [0.0, 0.1, 0.9, 1.0, 2.0, 2.3]
    leaves, thetas = _leaves([[math.cos(a), math.sin(a)] for a in angles])
    root = build_tree(leaves, thetas)
    internal = [n for n in root.nodes() if not n.is_leaf]
    # six leaves: three parents on the first level (0, 1, 2), one on the second (3, beside the promoted
    # node), the root last (4)
    assert sorted(n.created for n in internal) == [0, 1, 2, 3, 4] and root.created == 4
    assert all(n.created == -1 for n in root.nodes() if n.is_leaf)
    first_level = [n for n in internal if n.created < 3]
    assert all(c.is_leaf for n in first_level for c in n.children)


def _tree_with(entropies_by_sample):
    """A 4-leaf tree and an evaluate() whose entropies are set per node and per sample by hand (a list
    per node, indexed by sample); q is one-hot on the node's position in root.nodes()."""
    leaves, thetas = _leaves([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [0.1, 0.99]])
    root = build_tree(leaves, thetas)
    nodes = root.nodes()
    left, right = root.children
    named = {"root": root, "L": left, "R": right, "LL": left.children[0], "LR": left.children[1],
             "RL": right.children[0], "RR": right.children[1]}
    table = {id(named[k]): torch.tensor(v) for k, v in entropies_by_sample.items()}

    def evaluate(node, index):
        q = F.one_hot(torch.full((len(index),), nodes.index(node)), len(nodes)).float()
        return q, table[id(node)][index]

    return named, nodes, evaluate


def test_descent_is_inclusive_at_the_exit_entropy_prefers_the_left_child_on_ties_and_follows_each_sample():
    # tau_e = 1.0. Sample 0: root 2.0 goes on, L (0.5 < 3.0) is confident, it stops there. Sample 1:
    # root and R sit exactly at tau_e (1.0 >= 1.0), so they go on; R's children tie (0.25): the left
    # one, RL. Sample 2: R (0.75 < 3.0) is confident, it stops there.
    named, nodes, evaluate = _tree_with({
        "root": [2.0, 1.0, 2.0], "L": [0.5, 3.0, 3.0], "R": [1.0, 1.0, 0.75],
        "LL": [0.75, 3.0, 3.0], "LR": [0.25, 3.0, 3.0], "RL": [3.0, 0.25, 3.0], "RR": [3.0, 0.25, 3.0]})
    q, h, count = descend(named["root"], 3, evaluate, exit_entropy=1.0)
    assert q.argmax(1).tolist() == [nodes.index(named["L"]), nodes.index(named["RL"]), nodes.index(named["R"])]
    assert h.tolist() == [0.5, 0.25, 0.75]
    assert count.tolist() == [3, 5, 3]
    # tau_e = 0: every sample down to a leaf, each along its own path, though the first branch popped
    # ends before the other is walked
    q, h, count = descend(named["root"], 3, evaluate, exit_entropy=0.0)
    assert q.argmax(1).tolist() == [nodes.index(named["LR"]), nodes.index(named["RL"]), nodes.index(named["RL"])]
    assert count.tolist() == [5, 5, 5]


def _saef(**overrides):
    from clbench.engine.runner import create_strategy, strategy_config
    from clbench.models.backbones import build_backbone

    torch.manual_seed(0)
    cfg = strategy_config("saef", {"bottleneck": 4, **overrides})
    return create_strategy("saef", build_backbone("clbench_vit_tiny", in_chans=3, img_size=32), 10, cfg, seed=0)


def test_the_merge_rule_is_checked_with_a_message_naming_it():
    from clbench.engine.runner import strategy_config
    from clbench.errors import UsageError

    with pytest.raises(UsageError, match=r"merge='max' is invalid; expected one of: mean, sign_max"):
        strategy_config("saef", {"merge": "max"})


def test_before_any_task_ends_there_is_no_forest_to_report_or_store():
    strategy = _saef()
    assert strategy.stored_state() == []  # the profiler may ask before the first task ends
    report = strategy.report()
    assert report["trees"] == [] and report["expert_forwards_per_sample"] is None


def test_the_leaf_prototypes_are_float64_rows_per_task_on_the_strategys_device():
    from clbench.engine.runner import create_scenario

    scenario = create_scenario("digits32-5")
    strategy = _saef()
    strategy.on_experience_start(scenario.info(0))
    assert strategy.leaf_prototypes.shape == (5, strategy.backbone.num_features)
    assert strategy.leaf_prototypes.dtype == torch.float64  # like the frozen-PTM class means they come from
    meta = _saef().to("meta")  # a module moved to another device keeps its new buffers there
    meta.on_experience_start(scenario.info(0))
    assert meta.leaf_prototypes.device.type == "meta"


def test_loading_a_resume_state_rebuilds_the_forest_from_the_loaded_leaves():
    """On --resume the module's buffers (stored adapters, leaf prototypes) are loaded and then
    `load_extra_state`; a forest built before from other leaves must not survive it."""
    from clbench.engine.runner import create_scenario

    strategy = _saef(cluster_threshold=2.0)  # every task its own tree
    strategy.on_experience_start(create_scenario("digits32-5").info(0))
    strategy.task_adapter_vectors[:2] = torch.randn(2, strategy.task_adapter_vectors.shape[1])
    strategy.task_adapter_count.fill_(2)
    strategy.leaf_prototypes[:2] = torch.eye(2, strategy.backbone.num_features, dtype=torch.float64)
    assert [tree.leaves for tree in strategy.forest] == [[0], [1]]
    strategy.task_adapter_count.fill_(3)  # what a checkpoint taken after task 2 holds
    strategy.leaf_prototypes[2] = torch.eye(3, strategy.backbone.num_features, dtype=torch.float64)[2]
    strategy.load_extra_state(strategy.extra_state())
    assert [tree.leaves for tree in strategy.forest] == [[0], [1], [2]]
    assert torch.equal(strategy.forest[2].theta, strategy.task_adapter_vectors[2])


def test_the_runs_seed_reaches_the_strategy():
    """create_strategy passes the seed as a keyword: the classifier alignment's Gaussian samples are
    drawn from a generator seeded with it (+ 29)."""
    from clbench.engine.runner import create_strategy, strategy_config
    from clbench.models.backbones import build_backbone

    strategy = create_strategy("saef", build_backbone("clbench_vit_tiny", in_chans=3, img_size=32), 10,
                               strategy_config("saef", {"bottleneck": 4}), seed=5)
    assert strategy.seed == 5
    assert torch.equal(strategy.alignment_generator.get_state(), torch.Generator().manual_seed(5 + 29).get_state())
