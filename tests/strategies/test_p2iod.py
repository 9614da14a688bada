"""P²IOD: six faithfulness checks on a random frozen TinyDETR base (the method's checks allow
it for mechanics), plus resume state."""

from __future__ import annotations

import copy
import math

import clbench.models.detection.detr as detr
import clbench.strategies._detr as detr_family
import pytest
import pytorch_lightning as pl
import torch
from clbench.scenarios.shapes import generate_shapes
from clbench.strategies.p2iod import P2IOD, Config, fuse_task_vectors, prompt_weights
from torch.utils.data import DataLoader

from clbench.datasets import detection_collate
from clbench.tasks.detection import standard_task_images
from clbench.types import ExperienceInfo

T = torch.tensor
TASKS = [ExperienceInfo(0, (0, 1), (0, 1), 2, 4), ExperienceInfo(1, (2, 3), (0, 1, 2, 3), 2, 4)]


def _task_data(classes, seed):
    """8 images of a task in the standard setting (only current-class boxes labelled)."""
    pool = generate_shapes(24, size=64, num_classes=4, seed=seed)
    rows, targets = standard_task_images(pool.targets, classes)
    return pool.subset(rows[:8], targets[:8])


def _fit_one_batch(strategy, data):
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(strategy, DataLoader(data, batch_size=8, collate_fn=detection_collate))


@pytest.fixture(scope="module")
def run():
    """A strategy through task 1 (one step) and one step of task 2, with snapshots between."""
    torch.manual_seed(0)
    strategy = P2IOD(None, 4, Config(base="random", weight_decay=0.1), seed=0)
    untouched = copy.deepcopy(strategy.detector)
    initial_prompts = prompt_weights(strategy.prompts)
    data = [_task_data(TASKS[0].classes, 1), _task_data(TASKS[1].classes, 2)]
    strategy.on_experience_start(TASKS[0])
    _fit_one_batch(strategy, data[0])
    after_task1_step = copy.deepcopy(strategy.state_dict())
    strategy.on_experience_end(TASKS[0], data[0])
    strategy.on_experience_start(TASKS[1])
    # a high bias on old class 0 makes the prompt-free pass propose old-class pseudo-labels
    with torch.no_grad():
        strategy.detector.class_head.bias[0] = 3.0
    before = copy.deepcopy(strategy.state_dict())
    _fit_one_batch(strategy, data[1])
    grad = strategy.detector.class_head.weight.grad.clone()  # the last step's gradient, as the optimiser saw it
    return {"grad": grad, "strategy": strategy, "untouched": untouched, "initial_prompts": initial_prompts, "data": data,
            "after_task1_step": after_task1_step, "before": before, "after": strategy.state_dict()}


# 1 ----------------------------------------------------------------------------------------
def test_check1_one_bias_free_two_layer_prompt_mlp_per_decoder_layer_feeding_self_attention_only(run):
    strategy = run["strategy"]
    L, d, B = strategy.cfg.prompt_length, strategy.detector.d_model, 3
    assert len(strategy.prompts) == strategy.detector.decoder_layers == 3
    assert len({id(g) for g in strategy.prompts}) == 3
    for g in strategy.prompts:
        linears = [m for m in g.modules() if isinstance(m, torch.nn.Linear)]
        assert len(linears) == 2 and all(m.bias is None for m in linears)
        assert [n for n, _ in g.named_parameters()] == ["w1.weight", "w2.weight"]
        keys, values = g(torch.randn(B, d))
        assert keys.shape == values.shape == (B, L // 2, d)
    seen = []
    hooks = [layer.self_attn.register_forward_pre_hook(lambda m, a: seen.append(("self", a[1].shape[1])))
             for layer in strategy.detector.decoder]
    hooks += [layer.cross_attn.register_forward_pre_hook(lambda m, a: seen.append(("cross", a[1].shape[1])))
              for layer in strategy.detector.decoder]
    strategy.predict_detections(torch.rand(B, 3, 64, 64))
    for h in hooks:
        h.remove()
    Q = strategy.detector.num_queries
    # prompt-free pass, then the prompted pass: Q keys, then Q + L/2; cross-attention always 64 tokens
    assert [k for kind, k in seen if kind == "self"] == [Q] * 3 + [Q + L // 2] * 3
    assert [k for kind, k in seen if kind == "cross"] == [64] * 6


# 2 ----------------------------------------------------------------------------------------
def test_check2_prompt_free_pass_is_the_untouched_base_and_q_is_its_last_layer_query_mean(run, monkeypatch):
    strategy, untouched = run["strategy"], run["untouched"]
    batch = detection_collate([run["data"][1][i] for i in range(4)])
    captured = {}
    original = strategy.with_pseudo_labels

    def spy(targets, free, size):
        captured["free"] = free
        return original(targets, free, size)

    monkeypatch.setattr(strategy, "with_pseudo_labels", spy)
    hook = strategy.prompts[0].register_forward_pre_hook(lambda m, a: captured.setdefault("q", a[0]))
    strategy.train()
    losses = strategy.step_losses(batch)
    hook.remove()
    with torch.no_grad():
        base = untouched(batch.x)
    assert torch.equal(captured["free"].states, base.states)  # trained heads, same decoder states
    assert torch.equal(captured["q"], base.states[-1].mean(1))
    assert not captured["q"].requires_grad and not captured["free"].states.requires_grad
    strategy.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    frozen = [p for n, p in strategy.detector.named_parameters() if not n.startswith(("class_head.", "box_head."))]
    assert frozen and all(p.grad is None and not p.requires_grad for p in frozen)
    assert all(p.grad is not None for p in strategy.prompts.parameters())
    strategy.zero_grad(set_to_none=True)


# 3 ----------------------------------------------------------------------------------------
def test_check3_a_step_moves_prompts_and_current_rows_only(run):
    before, after, strategy = run["before"], run["after"], run["strategy"]
    for name, value in before.items():
        if name.startswith("detector.") and not name.startswith(("detector.class_head.", "detector.box_head.")):
            assert torch.equal(value, after[name]), name  # backbone (BN statistics too), encoder, decoder, queries
    old, current = list(TASKS[1].past_classes), list(TASKS[1].classes)
    for key in ("detector.class_head.weight", "detector.class_head.bias"):
        assert torch.equal(before[key][old], after[key][old]), key  # weight decay 0.1 did not touch them
        assert not torch.equal(before[key][current], after[key][current]), key
    grad = run["grad"]
    assert grad[old].abs().sum() == 0 and grad[current].abs().sum() > 0
    for name in before:
        if name.startswith("prompts."):
            assert not torch.equal(before[name], after[name]), name
    # in task 1 no row was old: both of its rows moved, future rows did not
    task1 = run["after_task1_step"]
    init_weight = run["before"]["detector.class_head.weight"]  # rows 2, 3 untouched until task 2
    assert torch.equal(task1["detector.class_head.weight"][2:], init_weight[2:])


# 4 ----------------------------------------------------------------------------------------
def test_check4_fusion_rule_on_hand_built_vectors():
    fused = fuse_task_vectors(T([0.0, 0, 0, 0]), T([4.0, 0, 1, -1]), T([4.0, 8, 3, 1]), 0.25, 0.25)
    # index 0 keeps theta_p (in M_p), 1 takes theta_c (in M_c only), 2 averages, 3 conflicts -> theta_p
    assert fused.tolist() == [4.0, 8.0, 2.0, -1.0]
    # with theta0 != 0 the task vectors, not the raw weights, decide
    shifted = fuse_task_vectors(T([1.0, 1, 1, 1]), T([5.0, 1, 2, 0]), T([5.0, 9, 4, 2]), 0.25, 0.25)
    assert shifted.tolist() == [5.0, 9.0, 3.0, 0.0]
    # index 0 in both masks keeps theta_p although signs agree (not the mean 5 or 9); index 1 has
    # tau_p = 0, a sign product of 0, so it averages (0 + 8) / 2
    zero0 = torch.zeros(4)
    assert fuse_task_vectors(zero0, T([4.0, 0, 1, -1]), T([14.0, 8, 3, 1]), 0.25, 0.25).tolist() == [4.0, 4.0, 2.0, -1.0]
    assert fuse_task_vectors(zero0, T([4.0, 0, 1, -1]), T([6.0, 8, 3, 1]), 0.25, 0.25).tolist() == [4.0, 8.0, 2.0, -1.0]


def test_check4_fusion_after_task_2_is_per_tensor_and_is_the_next_start(run):
    strategy = run["strategy"]
    # theta0 was stored before task 1 trained; theta_p is the (unfused) result of task 1
    assert all(torch.equal(strategy.theta0[k], v) for k, v in run["initial_prompts"].items())
    theta0, theta_prev = dict(strategy.theta0), dict(strategy.theta_prev)
    assert not all(torch.equal(theta0[k], theta_prev[k]) for k in theta0)
    current = prompt_weights(strategy.prompts)
    state = copy.deepcopy(strategy.state_dict())
    strategy.on_experience_end(TASKS[1], run["data"][1])
    try:
        for name, p in strategy.prompts.named_parameters():
            expected = fuse_task_vectors(theta0[name], theta_prev[name], current[name], 0.5, 0.5)
            assert torch.equal(p.detach(), expected), name
            assert torch.equal(strategy.theta_prev[name], expected)  # where the next task starts
        # per-tensor quantiles: fusing all tensors as one vector would give another result
        flat = lambda d: torch.cat([d[k].flatten() for k in sorted(d)])  # noqa: E731
        joint = fuse_task_vectors(flat(theta0), flat(theta_prev), flat(current), 0.5, 0.5)
        assert not torch.equal(joint, flat(prompt_weights(strategy.prompts)))
        # heads keep their trained values
        assert torch.equal(state["detector.class_head.weight"], strategy.detector.class_head.weight)
    finally:
        strategy.load_state_dict(state)
        strategy.theta_prev = theta_prev


# 5 ----------------------------------------------------------------------------------------
def test_check5_sparsity_is_lambda_times_l1_of_prompt_weights_and_is_optimised(run):
    strategy = run["strategy"]
    batch = detection_collate([run["data"][1][i] for i in range(4)])
    losses = strategy.step_losses(batch)
    by_hand = strategy.cfg.sparsity * sum(float(p.detach().abs().sum()) for p in strategy.prompts.parameters())
    assert losses["sparsity"].item() == pytest.approx(by_hand, rel=1e-6)
    weights = list(strategy.prompts.parameters())
    for w, g in zip(weights, torch.autograd.grad(losses["sparsity"], weights)):
        assert torch.equal(g, strategy.cfg.sparsity * w.detach().sign())
    # the optimised total (what training_step backpropagates) includes it
    total = strategy.total_loss(batch, 0)
    assert total.item() == pytest.approx(sum(v.item() for v in losses.values()), rel=1e-6)
    assert total.item() - sum(v.item() for k, v in losses.items() if k != "sparsity") == pytest.approx(by_hand, rel=1e-2)


# 6 ----------------------------------------------------------------------------------------
def _free_output(scores_per_query, boxes):
    """A fake prompt-free output of 1 image: the last layer's class probabilities given."""
    p = T(scores_per_query)
    logits = torch.log(p / (1 - p)).unsqueeze(0).unsqueeze(0)
    return detr.DetrOutput(logits.repeat(3, 1, 1, 1), T(boxes).unsqueeze(0).unsqueeze(0).repeat(3, 1, 1, 1),
                           torch.zeros(3, 1, len(scores_per_query), 8))


def test_check6_pseudo_labels_old_classes_above_threshold_at_most_five_gt_untouched():
    strategy = P2IOD(None, 5, Config(base="random"), seed=0)
    strategy.on_experience_start(ExperienceInfo(1, (2, 3), (0, 1, 2, 3), 3, 5))  # 2 old classes; class 4 unseen
    low = 0.01
    scores = [[0.95, low, low, low, low],  # old 0: kept
              [low, 0.9, low, low, low],  # old 1: kept
              [low, 0.8, low, low, low],  # kept
              [0.7, low, low, low, low],  # kept
              [low, low, 0.99, low, low],  # class 2 = n_old, the first new class: takes a slot, never kept
              [low, low, low, low, 0.999],  # unseen class 4: masked, takes no slot
              [0.66, low, low, low, low],  # above the threshold but sixth best seen score: dropped
              [0.655, low, low, low, low],  # seventh: dropped
              [low, 0.6, low, low, low]]  # below threshold
    boxes = [[0.1 * (q + 1), 0.5, 0.1, 0.1] for q in range(9)]
    gt = {"boxes": T([[1.0, 2.0, 30.0, 40.0]]), "labels": T([3]), "ignore": T([True])}
    kept_gt = {k: v.clone() for k, v in gt.items()}
    (out,) = strategy.with_pseudo_labels([gt], _free_output(scores, boxes), (64, 64))
    assert all(torch.equal(gt[k], kept_gt[k]) for k in gt)  # real GT never altered ...
    assert torch.equal(out["boxes"][:1], gt["boxes"]) and out["labels"][0] == 3 and bool(out["ignore"][0])  # ... and kept
    assert out["labels"][1:].tolist() == [0, 1, 1, 0]
    assert not out["ignore"][1:].any()
    expected_queries = [0, 1, 2, 3]
    for row, q in zip(out["boxes"][1:], expected_queries):
        cx = 0.1 * (q + 1) * 64
        assert torch.allclose(row, T([cx - 3.2, 28.8, cx + 3.2, 35.2]))
    # the threshold is the Config's; task 1 (no old class) gets none
    strategy.on_experience_start(ExperienceInfo(0, (0, 1), (0, 1), 3, 5))
    (first,) = strategy.with_pseudo_labels([gt], _free_output(scores, boxes), (64, 64))
    assert len(first["labels"]) == 1


def test_check6_limit_of_five_per_image_and_threshold_setting():
    strategy = P2IOD(None, 4, Config(base="random", pseudo_threshold=0.5), seed=0)
    strategy.on_experience_start(TASKS[1])
    scores = [[0.9 - 0.01 * q, 0.01, 0.01, 0.01] for q in range(8)]
    (out,) = strategy.with_pseudo_labels([{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
                                          "ignore": torch.zeros(0, dtype=torch.bool)}],
                                         _free_output(scores, [[0.5, 0.5, 0.2, 0.2]] * 8), (64, 64))
    assert out["labels"].tolist() == [0] * 5


def test_check6_unseen_logits_are_masked_in_loss_and_evaluation(run, monkeypatch):
    strategy = copy.deepcopy(run["strategy"])
    strategy.on_experience_start(TASKS[0])  # classes 2, 3 unseen
    with torch.no_grad():
        strategy.detector.class_head.bias[2:] = 20.0  # unmasked, they would win everywhere
    seen_by_loss = []
    real = detr.set_loss  # the family base calls it by the name it imported
    monkeypatch.setattr(detr_family, "set_loss", lambda out, t, w: seen_by_loss.append(out.logits) or real(out, t, w))
    strategy.step_losses(detection_collate([run["data"][0][i] for i in range(2)]))
    assert (seen_by_loss[0][..., 2:] == detr.MASKED_LOGIT).all() and (seen_by_loss[0][..., :2] > -1e3).all()
    preds = strategy.predict_detections(torch.rand(2, 3, 64, 64))
    assert all(set(p["labels"].tolist()) <= {0, 1} for p in preds)
    assert all(len(p["labels"]) == strategy.detector.num_queries * 2 for p in preds)


# resume -----------------------------------------------------------------------------------
def test_theta0_and_theta_prev_survive_a_resume(run):
    strategy = run["strategy"]
    other = P2IOD(None, 4, Config(base="random"), seed=1)
    other.load_state_dict(strategy.state_dict())
    other.load_extra_state({k: v.clone() for k, v in strategy.extra_state().items()})
    assert other.theta0.keys() == strategy.theta0.keys() and other.theta_prev.keys() == strategy.theta_prev.keys()
    assert all(torch.equal(other.theta0[k], strategy.theta0[k]) for k in strategy.theta0)
    assert all(torch.equal(other.theta_prev[k], strategy.theta_prev[k]) for k in strategy.theta_prev)


def test_voc_paper_setting_divides_the_rate_by_ten_once_at_epoch_80():
    import types

    from clbench.base import CLStrategy
    from clbench.engine.runner import strategy_config

    cfg = strategy_config("p2iod", paper_settings_for="voc-10+10")
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    schedule = CLStrategy.lr_schedule(types.SimpleNamespace(cfg=cfg), optimizer)
    rates = []
    for _ in range(100):  # the setting's 100 epochs
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates[:80] == [1e-4] * 80
    assert rates[80:] == pytest.approx([1e-5] * 20)


def test_prompt_length_and_fusion_fractions_are_validated():
    from clbench.engine.runner import strategy_config
    from clbench.errors import UsageError

    for length in (0, 1, 3, 5):  # keys and values take half each: an even number of at least 2
        with pytest.raises(UsageError, match=f"prompt_length={length} is invalid; expected an even number >= 2"):
            strategy_config("p2iod", {"prompt_length": length})
    for name in ("rho_prev", "rho_cur"):
        for bad in (-0.01, 1.01):
            with pytest.raises(UsageError, match=f"{name}={bad} is invalid; expected a fraction in"):
                strategy_config("p2iod", {name: bad})
    edges = strategy_config("p2iod", {"prompt_length": 2, "rho_prev": 0.0, "rho_cur": 1.0})
    assert (edges.prompt_length, edges.rho_prev, edges.rho_cur) == (2, 0.0, 1.0)
    assert strategy_config("p2iod", {"rho_prev": 1.0, "rho_cur": 0.0}).rho_prev == 1.0


def _quantile_by_hand(values: list[float], q: float) -> float:
    """Linear interpolation between the order statistics at position q (n - 1)."""
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _fused_by_hand(theta0, theta_p, theta_c, rho_p, rho_c):
    """The fusion rule written out element by element for one flattened tensor."""
    tau_p = [p - z for p, z in zip(theta_p, theta0)]
    delta = [c - p for c, p in zip(theta_c, theta_p)]
    tau_c = [c - z for c, z in zip(theta_c, theta0)]
    cut_p = _quantile_by_hand([abs(v) for v in tau_p], 1 - rho_p)
    cut_c = _quantile_by_hand([abs(v) for v in delta], 1 - rho_c)
    out = []
    for i in range(len(theta0)):
        in_p, in_c = abs(tau_p[i]) >= cut_p, abs(delta[i]) >= cut_c
        sign = lambda v: (v > 0) - (v < 0)  # noqa: E731
        if in_c and not in_p:
            out.append(theta_c[i])
        elif not in_c and not in_p and sign(tau_p[i]) * sign(tau_c[i]) >= 0:
            out.append((theta_p[i] + theta_c[i]) / 2)
        else:
            out.append(theta_p[i])
    return out


@pytest.mark.parametrize("rho_prev, rho_cur", [(0.3, 0.6), (0.0, 1.0), (1.0, 0.25)])
def test_the_task_end_fuses_every_prompt_tensor_by_the_rule_written_out_by_hand(rho_prev, rho_cur):
    """Through the task-end hook: integer-valued weights (ties at the quantiles, theta0 of both signs,
    zero task vectors), fused per tensor as the rule says, element by element."""
    strategy = P2IOD(None, 4, Config(base="random", rho_prev=rho_prev, rho_cur=rho_cur), seed=0)
    strategy.on_experience_start(TASKS[0])
    g = torch.Generator().manual_seed(3)
    draw = lambda p: torch.randint(-3, 4, p.shape, generator=g).float()  # noqa: E731
    strategy.theta0 = {n: draw(p) for n, p in strategy.prompts.named_parameters()}
    with torch.no_grad():
        for p in strategy.prompts.parameters():
            p.copy_(draw(p))
    strategy.on_experience_end(TASKS[0], None)  # after task 1: no fusion, theta_p is the trained weights
    theta_prev = {n: p.detach().clone() for n, p in strategy.prompts.named_parameters()}
    assert all(torch.equal(strategy.theta_prev[n], theta_prev[n]) for n in theta_prev)
    strategy.on_experience_start(TASKS[1])
    with torch.no_grad():
        for p in strategy.prompts.parameters():
            p.copy_(draw(p))
    current = {n: p.detach().clone() for n, p in strategy.prompts.named_parameters()}
    strategy.on_experience_end(TASKS[1], None)
    for name, p in strategy.prompts.named_parameters():
        expected = _fused_by_hand(strategy.theta0[name].flatten().tolist(), theta_prev[name].flatten().tolist(),
                                  current[name].flatten().tolist(), rho_prev, rho_cur)
        assert p.detach().flatten().tolist() == pytest.approx(expected), name
        assert torch.equal(strategy.theta_prev[name], p.detach())  # where the next task starts


def test_the_run_s_seed_and_add_ons_reach_the_strategy_and_see_every_task_end(task_end_recorder):
    recorder = task_end_recorder
    strategy = P2IOD(None, 4, Config(base="random"), aux=[recorder], seed=5)
    assert strategy.seed == 5 and list(strategy.aux) == [recorder]
    for task in TASKS:
        strategy.on_experience_start(task)
        if task.is_first:  # theta0: a copy of the prompt MLPs as the first task finds them
            assert strategy.theta0.keys() == dict(strategy.prompts.named_parameters()).keys()
            for name, p in strategy.prompts.named_parameters():
                assert torch.equal(strategy.theta0[name], p) and strategy.theta0[name].data_ptr() != p.data_ptr()
        strategy.on_experience_end(task, None)  # the second one fuses first
    assert recorder.ended == TASKS


def test_a_strategy_saved_before_its_first_task_has_empty_fusion_state():
    fresh = P2IOD(None, 4, Config(base="random"), seed=0)
    assert fresh.extra_state() == {}
    other = P2IOD(None, 4, Config(base="random"), seed=1)
    other.load_extra_state(fresh.extra_state())
    assert other.theta0 == {} and other.theta_prev == {}


def test_pseudo_labels_read_the_last_decoder_layer_and_also_come_with_a_single_old_class():
    """One old class (0), three decoder layers: only the last layer's scores and boxes count."""
    strategy = P2IOD(None, 4, Config(base="random"), seed=0)
    strategy.on_experience_start(ExperienceInfo(1, (1, 2, 3), (0, 1, 2, 3), 2, 4))
    low, logit = 0.01, lambda p: math.log(p / (1 - p))  # noqa: E731
    probs = torch.full((3, 1, 2, 4), low)
    probs[:2, 0, 1, 0] = 0.99  # earlier layers: query 1 is a confident old-class object
    probs[2, 0, 0, 0] = 0.9  # last layer: query 0 is
    boxes = torch.tensor([[0.25, 0.25, 0.125, 0.125], [0.75, 0.75, 0.25, 0.25]]).repeat(3, 1, 1, 1)
    boxes[:2, 0, 0] = torch.tensor([0.5, 0.5, 0.5, 0.5])  # earlier layers place query 0 elsewhere
    free = detr.DetrOutput(probs.apply_(logit), boxes, torch.zeros(3, 1, 2, 8))
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "ignore": torch.zeros(0, dtype=torch.bool)}
    (out,) = strategy.with_pseudo_labels([empty], free, (64, 64))
    assert out["labels"].tolist() == [0]
    assert torch.allclose(out["boxes"], T([[12.0, 12.0, 20.0, 20.0]]))  # cx, cy = 16, w = h = 8 pixels


def test_a_score_exactly_at_the_threshold_makes_a_pseudo_label():
    strategy = P2IOD(None, 4, Config(base="random", pseudo_threshold=0.5), seed=0)
    strategy.on_experience_start(TASKS[1])
    logits = torch.full((3, 1, 2, 4), -5.0)
    logits[:, 0, 0, 1] = 0.0  # sigmoid(0) = 0.5 exactly: old class 1 at the threshold
    logits[:, 0, 1, 0] = -0.01  # just below it
    boxes = torch.tensor([0.5, 0.5, 0.25, 0.25]).repeat(3, 1, 2, 1)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "ignore": torch.zeros(0, dtype=torch.bool)}
    (out,) = strategy.with_pseudo_labels([empty], detr.DetrOutput(logits, boxes, torch.zeros(3, 1, 2, 8)), (64, 64))
    assert out["labels"].tolist() == [1]
