"""DAF (Liu et al., arXiv 2601.21341, as reconstructed in the strategy's docstring): faithfulness checks
(closed-form fusion, its limits, the fused adapters of a run against curvatures measured independently,
robust initialisation, accumulated Fisher, one global adapter) and TUNA's classifier mechanics underneath."""

from __future__ import annotations

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from clbench.strategies.daf import DAF, fusion_coefficient

from clbench.engine.runner import RunSpec, create_scenario, run
from clbench.models.adapters import AdapterSet
from clbench.models.freeze import eval_mode
from clbench.types import Batch

T = torch.tensor


def _beta(prev, task, init, f_old, f_task, lam):
    return fusion_coefficient(T(prev), T(task), T(init), T(f_old), T(f_task), lam)["beta"]


def test_fusion_on_a_hand_built_example():
    prev, task, init = [1.0, 0.0, 2.0], [2.0, 1.0, 1.0], [0.0, 0.0, 0.0]
    f_old, f_task, lam = [1.0, 2.0, 0.0], [3.0, 0.0, 1.0], 0.5
    # d = (1, 1, -1): a_o = 1 + 2 = 3, a_n = 3 + 1 = 4, e = (1, 0, 2).d = -1, |d|^2 = 3
    terms = fusion_coefficient(T(prev), T(task), T(init), T(f_old), T(f_task), lam)
    assert (terms["a_old"], terms["a_new"], terms["e"]) == (3.0, 4.0, -1.0)
    assert terms["beta"] == pytest.approx((4 + 0.5) / (3 + 4 + 0.5 * 3))  # 9/17
    # old : new curvature 1 : 3 along d = (1, 0), no prior: beta = 3/4 (here a_o + a_n is exactly 1)
    assert _beta([0.0, 5.0], [1.0, 5.0], [0.0, 0.0], [0.25, 9.0], [0.75, 9.0], 0.0) == 0.75


def test_fusion_limits_and_clipping():
    prev, task, init = [0.5, -1.0, 2.0], [1.5, 0.0, 0.0], [0.0, 0.0, 0.0]
    f = [0.3, 2.0, 0.7]
    assert _beta(prev, task, init, f, f, 0.0) == pytest.approx(0.5)  # equal curvature: plain average
    assert _beta(prev, task, init, [0.0] * 3, f, 0.0) == 1.0  # nothing old to keep: theta_g = theta_t*
    assert _beta(prev, task, init, f, [0.0] * 3, 0.0) == 0.0  # nothing new: keep the old global adapter
    # a strong prior pulls beta to the point of the line nearest theta_0, -e / |d|^2: here
    # e = (prev - init).d = 0.5 - 1 - 4 = -4.5 and |d|^2 = 6, so 0.75 ...
    assert _beta(prev, task, init, f, f, 1e9) == pytest.approx(0.75)
    # ... past theta_t* (-e / |d|^2 = 2, clipped to 1) or behind theta_g^{t-1} (-1, clipped to 0)
    assert _beta([2.0, 0.0, 0.0], [1.0, 0.0, 0.0], init, f, f, 1e9) == 1.0
    assert _beta([1.0, 0.0, 0.0], [2.0, 0.0, 0.0], init, f, f, 1e9) == 0.0
    assert _beta(prev, prev, init, f, f, 1e-3) == 0.0  # d = 0: nothing to fuse


def test_beta_minimises_the_quadratic_objective_along_the_segment():
    rng = np.random.default_rng(3)
    for _ in range(5):
        prev, task, init = rng.normal(size=(3, 6))
        f_old, f_task = rng.uniform(0.1, 2.0, size=(2, 6))
        lam = float(rng.uniform(0, 0.5))
        d = task - prev
        grid = np.linspace(0, 1, 100_001)
        theta = prev[None] + grid[:, None] * d[None]
        j = 0.5 * ((theta - prev) ** 2 * f_old).sum(1) + 0.5 * ((theta - task) ** 2 * f_task).sum(1) \
            + 0.5 * lam * ((theta - init) ** 2).sum(1)
        beta = fusion_coefficient(*(torch.from_numpy(v) for v in (prev, task, init, f_old, f_task)), lam)["beta"]
        assert beta == pytest.approx(grid[np.argmin(j)], abs=1e-3)


FISHER_SAMPLES = 6


def _fisher_by_hand(strategy, t: int, scenario: str = "digits32-5", samples: int = FISHER_SAMPLES) -> torch.Tensor:
    """The diagonal empirical Fisher of task t's loss at the current adapter, recomputed here: the mean
    over the task's first `samples` training samples of the squared per-sample gradient of
    CE(20 x the cosines of the task's classes), adapters and ViT in eval mode (no dropout)."""
    data = create_scenario(scenario).train_sets[t]
    classes = list(create_scenario(scenario).info(t).classes)
    params = list(strategy.adapter.parameters())
    modes = [(m, m.training) for m in strategy.modules()]
    strategy.eval()
    total = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
    try:
        for i in range(samples):
            x, y = data.x[i:i + 1], data.y[i:i + 1]
            with torch.enable_grad():
                cosines = strategy.head(strategy.features(x))[:, classes]
                loss = torch.nn.functional.cross_entropy(20.0 * cosines, torch.tensor([classes.index(int(y))]))
                grads = torch.autograd.grad(loss, params)
            total += torch.cat([g.reshape(-1) for g in grads]).double() ** 2
    finally:
        for m, mode in modes:
            m.training = mode
    return total / samples


class _Tap(pl.Callback):
    """The adapter vector when each task's training starts and ends, and, before each Fisher pass's
    own end-of-fit work (the fusion, the F_old update), the adapter there and its Fisher by hand."""

    def __init__(self, scenario: str = "digits32-5", samples: int = FISHER_SAMPLES):
        self.scenario, self.samples = scenario, samples
        self.train_start, self.train_end = [], []
        self.task_optimum, self.fisher_task, self.fisher_fused = [], [], []

    def on_fit_start(self, trainer, pl_module):
        if pl_module.phase.name == "train":
            self.train_start.append(pl_module.theta().clone())

    def on_fit_end(self, trainer, pl_module):  # the callbacks' on_fit_end runs before the module's
        t = pl_module.experience.index
        if pl_module.phase.name == "train":
            self.train_end.append(pl_module.theta().clone())
        elif pl_module.phase.name == "fisher_task":  # theta_t*, not yet fused
            self.task_optimum.append(pl_module.theta().clone())
            self.fisher_task.append(_fisher_by_hand(pl_module, t, self.scenario, self.samples))
        elif pl_module.phase.name == "fisher_fused":  # theta_g^t
            self.fisher_fused.append(_fisher_by_hand(pl_module, t, self.scenario, self.samples))


@pytest.fixture(scope="module")
def daf_run(tmp_path_factory, fast_config_for):
    tap, fisher_added, after = _Tap(), [], []
    original = DAF.take_fisher

    def recording(self):
        fisher = original(self)
        if self.phase.name == "fisher_fused":
            fisher_added.append(fisher.clone())
        return fisher

    def keep(i, result, strategy):
        after.append({"theta": strategy.theta().clone(), "fisher_old": strategy.fisher_old.clone(),
                      "backbone": {k: v.clone() for k, v in strategy.backbone.state_dict().items()}, "strategy": strategy})

    DAF.take_fisher = recording
    try:
        cfg = fast_config_for(tmp_path_factory.mktemp("daf"), backbone="clbench_vit_tiny", epochs=1, limit_train_batches=None)
        overrides = {"bottleneck": 4, "fisher_samples": FISHER_SAMPLES, "align_epochs": 2, "align_per_class": 8,
                     "prior_strength": 1e-3}
        result = run(RunSpec("daf", "digits32-5", run=cfg, seed=0, strategy_overrides=overrides),
                     callbacks=[tap], on_experience=keep)
    finally:
        DAF.take_fisher = original
    assert result.status == "completed", result.error
    return result, tap, fisher_added, after


def test_robust_initialisation_and_the_fused_global_adapter(daf_run):
    result, tap, _, after = daf_run
    strategy = after[-1]["strategy"]
    assert torch.equal(tap.train_start[0], strategy.theta_init)  # theta_0 at the first task
    fusion = result.strategy_report["fusion"] if hasattr(result, "strategy_report") else strategy.fusion
    for t in range(5):
        prev = strategy.theta_init if t == 0 else after[t - 1]["theta"]
        if t > 0:  # each task's adapter starts as the previous global adapter, bit for bit
            assert torch.equal(tap.train_start[t], prev)
        beta = fusion[t]["beta"]
        assert 0.0 <= beta <= 1.0
        expected = (prev.double() + beta * (tap.train_end[t].double() - prev.double())).float()
        assert torch.allclose(after[t]["theta"], expected, atol=1e-7)  # nothing after the fusion moved it
    assert any(0.0 < f["beta"] < 1.0 for f in fusion)


def test_each_fused_adapter_is_the_closed_form_on_independently_measured_curvatures(daf_run):
    """theta_g^t recomputed from the method's definitions alone: F_t at theta_t*, F_old = the sum of the
    earlier tasks' Fishers at their fused adapters (all measured by hand), theta_0, theta_g^{t-1}, lambda."""
    result, tap, _, after = daf_run
    strategy, lam = after[-1]["strategy"], 1e-3
    assert result.strategy_report["prior_strength"] == lam
    assert "prior_selection" not in result.strategy_report  # lambda was configured, not selected
    init = strategy.theta_init.double()
    fisher_old = torch.zeros_like(init)
    sensitive = []
    for t in range(5):
        prev = init if t == 0 else after[t - 1]["theta"].double()
        optimum = tap.task_optimum[t].double()
        assert torch.equal(tap.task_optimum[t], tap.train_end[t])  # nothing between training and fusion moved it
        d = optimum - prev
        a_old, a_new = float((fisher_old * d * d).sum()), float((tap.fisher_task[t] * d * d).sum())
        e, d2 = float(((prev - init) * d).sum()), float((d * d).sum())
        beta = min(max((a_new - lam * e) / (a_old + a_new + lam * d2), 0.0), 1.0)
        reported = result.strategy_report["fusion"][t]
        assert reported["task"] == t  # each record names the task it fused
        assert reported["beta"] == pytest.approx(beta, rel=1e-4, abs=1e-9), t
        assert (reported["a_old"], reported["a_new"], reported["e"]) == pytest.approx((a_old, a_new, e), rel=1e-4, abs=1e-12)
        assert torch.allclose(after[t]["theta"].double(), prev + beta * d, atol=1e-6), t
        if a_old > 0:  # how far the fused adapter would be without the old tasks' curvature
            without_old = min(max((a_new - lam * e) / (a_new + lam * d2), 0.0), 1.0)
            sensitive.append(float(((without_old - beta) * d).abs().max()))
        fisher_old = fisher_old + tap.fisher_fused[t]
        assert torch.allclose(after[t]["fisher_old"], fisher_old, rtol=1e-4, atol=1e-12), t
    assert max(sensitive) > 1e-4  # this run tells the fusion with F_old from one without it


def test_fisher_old_is_the_sum_of_the_fused_adapters_fishers(daf_run):
    _, _, fisher_added, after = daf_run
    assert len(fisher_added) == 5
    running = torch.zeros_like(fisher_added[0])
    for t, fisher in enumerate(fisher_added):
        running = running + fisher
        assert torch.equal(after[t]["fisher_old"], running)
    # a task whose loss saturates on its Fisher samples (scale 20 on raw logits) has an exactly zero
    # Fisher in float32; on this tiny run some tasks do, the others must not
    assert any(f.sum() > 0 for f in fisher_added)


def test_one_global_adapter_one_adapter_forward_and_a_frozen_backbone(daf_run):
    _, _, _, after = daf_run
    strategy = after[-1]["strategy"]
    assert sum(isinstance(m, AdapterSet) for m in strategy.modules()) == 1
    for snapshot in after[1:]:
        assert all(torch.equal(snapshot["backbone"][k], after[0]["backbone"][k]) for k in after[0]["backbone"])
    calls = []
    handle = strategy.adapter[0].register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    x = create_scenario("digits32-5").test_sets[0].x[:7]
    strategy.eval()
    strategy.predict_logits(x)
    handle.remove()
    assert calls == [7]  # one batched adapter forward: each image went through one adapter once


def test_class_gaussians_are_the_features_under_the_global_adapter_of_their_task(daf_run):
    _, _, _, after = daf_run
    strategy = after[-1]["strategy"]
    assert bool(strategy.gaussians.measured.all())
    last = create_scenario("digits32-5").train_sets[-1]
    features = strategy.eval_features(last.x).double()  # the final adapter is the one of the last task
    for c in last.y.unique().tolist():
        f = features[last.y == c]
        cov = torch.cov(f.T) + 1e-4 * torch.eye(f.shape[1], dtype=f.dtype)
        assert torch.allclose(strategy.gaussians.mean[c].double(), f.mean(0), atol=1e-5)
        assert torch.allclose(strategy.gaussians.covariance[c].double(), cov, atol=1e-5)


def test_fisher_is_the_mean_of_per_sample_squared_gradients(fast_config_for):
    from clbench.engine.runner import create_strategy, strategy_config
    from clbench.models.backbones import build_backbone
    from clbench.types import Phase

    scenario = create_scenario("digits32-5")
    torch.manual_seed(0)
    strategy = create_strategy("daf", build_backbone("clbench_vit_tiny", in_chans=3, img_size=32), 10,
                               strategy_config("daf", {"bottleneck": 4}), seed=0)
    strategy.on_experience_start(scenario.info(0))
    with torch.no_grad():
        for p in strategy.adapter.parameters():
            p.normal_(0, 0.1)  # away from W_up = 0, where the down projection has no gradient
    strategy.phase = Phase("fisher_task", batch_size=1)
    x, y = scenario.train_sets[0].x[:3], scenario.train_sets[0].y[:3]
    for i in range(3):
        strategy.accumulate_fisher(Batch(x[i:i + 1], y[i:i + 1]))
    got = strategy.take_fisher()
    squares = []
    strategy.eval()
    for i in range(3):
        logits = strategy.head(strategy.features(x[i:i + 1]))
        loss = torch.nn.functional.cross_entropy(20.0 * logits[:, [0, 1]], y[i:i + 1])  # classes 0 and 1
        grads = torch.autograd.grad(loss, list(strategy.adapter.parameters()))
        squares.append(torch.cat([g.reshape(-1) for g in grads]).double() ** 2)
    assert torch.allclose(got, sum(squares) / 3, rtol=1e-5, atol=1e-12)
    # taking the Fisher starts the next one afresh: one sample's is its squared gradient, none's is 0
    strategy.accumulate_fisher(Batch(x[1:2], y[1:2]))
    assert torch.allclose(strategy.take_fisher(), squares[1], rtol=1e-5, atol=1e-12)
    nothing = strategy.take_fisher()
    assert torch.equal(nothing, torch.zeros_like(strategy.fisher_old)) and nothing.dtype == torch.float64
    assert strategy.adapter.training is False  # eval() above; accumulate_fisher gives modes back:
    strategy.train()
    modes = []  # the ViT's and the adapter's modes while the Fisher's loss is computed
    hooks = [m.register_forward_pre_hook(lambda m, i: modes.append(m.training))
             for m in (strategy.backbone, strategy.adapter[0])]
    strategy.accumulate_fisher(Batch(x[:1], y[:1]))
    for hook in hooks:
        hook.remove()
    assert modes and not any(modes)  # the loss itself: no dropout or other training-mode noise anywhere
    assert strategy.adapter.training and strategy.backbone.training


def test_vectorised_fisher_equals_the_per_sample_loop_through_accumulate_fisher():
    """A batch of 5 through the method's own hook, float64, with a CosFace margin: the torch.func
    per-sample gradients give the batch-1 autograd loop's sum to rounding; a network vmap cannot
    batch falls back to that loop with a warning, and the count is the batch's either way."""
    import inspect
    import warnings

    from clbench.engine.runner import create_strategy, strategy_config
    from clbench.models.backbones import build_backbone

    scenario = create_scenario("digits32-5")
    made = []
    for vectorised in (True, False):
        torch.manual_seed(0)
        s = create_strategy("daf", build_backbone("clbench_vit_tiny", in_chans=3, img_size=32), 10,
                            strategy_config("daf", {"bottleneck": 4, "margin": 0.2}), seed=0)
        s.on_experience_start(scenario.info(1))  # classes 2 and 3: labels mapped to positions
        with torch.no_grad():
            for p in s.adapter.parameters():
                p.normal_(0, 0.1)
        s.double().train()
        s.vectorised_fisher = vectorised
        train = scenario.train_sets[1]  # both classes in the batch: each sample's gradient uses its own label
        pick = torch.cat([(train.y == 2).nonzero()[:3, 0], (train.y == 3).nonzero()[:2, 0]])
        x, y = train.x[pick].double(), train.y[pick]
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            s.accumulate_fisher(Batch(x, y))
        assert s.adapter.training and s._fisher_count == 5
        made.append(s._fisher_sum)
    fast, slow = made
    assert fast.dtype == torch.float64 and float(slow.sum()) > 0
    assert torch.allclose(fast, slow, rtol=1e-10, atol=1e-20)

    s.vectorised_fisher = True
    s._fisher_sum, s._fisher_count = None, 0
    original = s.vectorised_squared_gradients
    s.vectorised_squared_gradients = lambda batch: (_ for _ in ()).throw(RuntimeError("vmap cannot run here"))
    stacks, looped = [], s.looped_squared_gradients

    def loop_seeing_the_stack(batch):  # the call stack below accumulate_fisher, innermost first
        stacks.append([(f.filename, f.lineno, f.function) for f in inspect.stack()])
        return looped(batch)

    s.looped_squared_gradients = loop_seeing_the_stack
    with pytest.warns(RuntimeWarning, match=r"^DAF: per-sample gradients cannot be vectorised on this network "
                      r"\(vmap cannot run here\); falling back to one autograd call per sample$") as record:
        s.accumulate_fisher(Batch(x, y))
    # the warning points at the line that called accumulate_fisher, not into DAF or further out
    at = next(i for i, frame in enumerate(stacks[0]) if "accumulate_fisher" in frame[2])
    assert (record[0].filename, record[0].lineno) == stacks[0][at + 1][:2]
    assert s.vectorised_fisher is False and s._fisher_count == 5
    assert torch.allclose(s._fisher_sum, slow, rtol=1e-10, atol=1e-20)
    with warnings.catch_warnings():  # vmap is not tried again on this network: no second warning
        warnings.simplefilter("error", RuntimeWarning)
        s.accumulate_fisher(Batch(x, y))
    assert s._fisher_count == 10 and torch.allclose(s._fisher_sum, 2 * slow, rtol=1e-10, atol=1e-20)
    del s.vectorised_squared_gradients, s.looped_squared_gradients
    assert s.vectorised_squared_gradients.__func__ is original.__func__


def test_phases_run_on_their_own_data_and_batch_sizes(daf_run):
    result, *_ = daf_run
    shapes = {s["phase"]: s for r in result.edge["per_experience"][1:2] for s in r["flops_step_shapes"]}
    assert set(shapes) == {"train", "fisher_task", "fisher_fused", "statistics", "align"}
    # the Fisher phases run real batches (the run's 16, here all of the 6 Fisher samples in one step)
    assert shapes["fisher_task"]["input_shape"] == [6, 3, 32, 32] and shapes["fisher_task"]["steps"] == 1
    assert shapes["align"]["input_shape"] == [8, 1]  # label placeholders; the step draws the features
    # experience 2 aligns on 4 seen classes x 8 samples = 4 steps per epoch, 2 epochs
    assert sum(s["steps"] for s in result.edge["per_experience"][1]["flops_step_shapes"] if s["phase"] == "align") == 8


def test_prior_selection_keeps_the_lambda_of_the_lowest_heldout_loss(tmp_path, fast_config_for):
    """select_prior: 20% of the first task is never trained on, each grid lambda's fused adapter is
    scored on it, and the winner is used for every later fusion."""
    from clbench.strategies.daf import PRIOR_GRID

    seen = {}
    original_split, original_loss = DAF.split_holdout, DAF.heldout_loss

    def split(self, data):
        kept = original_split(self, data)
        seen["train"], seen["held"], seen["n"] = set(kept.indices), set(self._holdout.indices), len(data)
        return kept

    def loss(self, theta):  # the held-out loss, recorded against the fused adapter it was measured with
        value = original_loss(self, theta)
        seen.setdefault("scored", []).append((theta.clone(), value))
        return value

    class Batches(pl.Callback):  # the images of each experience's training and Fisher passes
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            key = (pl_module.experience.index, pl_module.phase.name)
            if key[1] in ("train", "fisher_task", "fisher_fused"):
                seen.setdefault(key, []).extend(x.numpy().tobytes() for x in batch.x)

    DAF.split_holdout, DAF.heldout_loss = split, loss
    try:
        cfg = fast_config_for(tmp_path, backbone="clbench_vit_tiny", epochs=1, limit_train_batches=None)
        overrides = {"bottleneck": 4, "fisher_samples": 4, "align_epochs": 1, "align_per_class": 8, "select_prior": True}
        result = run(RunSpec("daf", "digits32-2", run=cfg, seed=0, strategy_overrides=overrides), callbacks=[Batches()],
                     on_experience=lambda i, r, s: seen.setdefault("global", []).append(s.theta().clone()))
    finally:
        DAF.split_holdout, DAF.heldout_loss = original_split, original_loss
    assert result.status == "completed", result.error
    assert not seen["train"] & seen["held"] and len(seen["train"]) + len(seen["held"]) == seen["n"]
    assert len(seen["held"]) == round(0.2 * seen["n"])
    # training and both Fisher passes of the first task see only the kept samples (the Fisher passes
    # the first 4 of them, in index order); the second task trains on all of its samples
    first, second = (create_scenario("digits32-2").train_sets[t] for t in (0, 1))
    images = [x.numpy().tobytes() for x in first.x]
    kept = sorted(seen["train"])
    assert sorted(seen[(0, "train")]) == sorted(images[i] for i in kept)
    for phase in ("fisher_task", "fisher_fused"):
        assert sorted(seen[(0, phase)]) == sorted(images[i] for i in kept[:4]), phase
    assert kept[:4] != [0, 1, 2, 3]  # (the first 4 of the whole task hold a held-out sample)
    assert len(seen[(1, "train")]) == len(second)
    selection = result.strategy_report["prior_selection"]
    assert selection["grid"] == list(PRIOR_GRID) and len(seen["scored"]) == len(PRIOR_GRID)
    assert selection["heldout_samples"] == len(seen["held"])
    assert selection["heldout_loss"] == [v for _, v in seen["scored"]]
    best = min(range(len(PRIOR_GRID)), key=selection["heldout_loss"].__getitem__)
    assert selection["chosen"] == PRIOR_GRID[best] == result.strategy_report["prior_strength"]
    # the first task's global adapter is the one fused with the chosen lambda
    assert torch.equal(seen["global"][0], seen["scored"][best][0])
    # the selection's fusions are training work outside a fit: the profiler meters them under its label
    assert result.edge["per_experience"][0]["outside_fit"]["prior_selection"]["steps"] == len(PRIOR_GRID)


def test_the_resume_state_carries_every_tasks_beta_and_the_chosen_prior_strength():
    """`extra_state` / `load_extra_state`, the pair --resume goes through: each finished task's beta
    (NaN where a task recorded none) and the prior strength (lambda, possibly selected after the first
    task) come back; a state saved before lambda was kept leaves the configured one."""
    import math

    from clbench.engine.runner import create_strategy, strategy_config
    from clbench.models.backbones import build_backbone

    def fresh():
        return create_strategy("daf", build_backbone("clbench_vit_tiny", in_chans=3, img_size=32), 10,
                               strategy_config("daf", {"bottleneck": 4, "prior_strength": 0.002}), seed=0)

    saved = fresh()
    # 0.1 has no exact float32 value: the betas come back to the last bit (float64)
    saved.fusion = [{"task": 0, "beta": 0.1, "a_old": 1.0}, {"task": 1}, {"task": 2, "beta": 1.0}]
    saved.prior_strength = 0.01  # as chosen by the selection
    state = saved.extra_state()
    resumed = fresh()
    resumed.load_extra_state(state)
    assert [f["task"] for f in resumed.fusion] == [0, 1, 2]
    assert resumed.fusion[0] == {"task": 0, "beta": 0.1} and resumed.fusion[2] == {"task": 2, "beta": 1.0}
    assert math.isnan(resumed.fusion[1]["beta"])
    assert resumed.prior_strength == 0.01 and resumed.report()["prior_strength"] == 0.01
    older = fresh()
    older.load_extra_state({k: v for k, v in state.items() if k != "prior_strength"})
    assert older.prior_strength == 0.002 and [f["beta"] for f in older.fusion][::2] == [0.1, 1.0]


def test_the_heldout_samples_are_a_permutation_drawn_from_the_runs_seed_and_at_least_one():
    """select_prior's split of the first task: the held-out samples are the first
    round(holdout_fraction x n) (at least 1) of a permutation drawn from a generator seeded with the
    run's seed (+ 71), whatever the global RNG holds; training keeps the rest, both in index order."""
    from clbench.engine.runner import create_strategy, strategy_config
    from clbench.models.backbones import build_backbone

    data = list(range(10))
    for fraction, held in ((0.2, 2), (0.01, 1)):
        order = torch.randperm(10, generator=torch.Generator().manual_seed(3 + 71)).tolist()
        for global_seed in (1, 2):
            s = create_strategy("daf", build_backbone("clbench_vit_tiny", in_chans=3, img_size=32), 10,
                                strategy_config("daf", {"bottleneck": 4, "holdout_fraction": fraction}), seed=3)
            torch.manual_seed(global_seed)
            kept = s.split_holdout(data)
            assert s._holdout.indices == sorted(order[:held])
            assert kept.indices == sorted(order[held:])


@pytest.fixture(scope="module")
def per_layer_run(tmp_path_factory, fast_config_for):
    """Two tasks with `per_layer`, two epochs of two batches of 16 per fit, and the first 4 samples of
    each task for the Fisher passes."""
    tap, after = _Tap("digits32-2", 4), []
    cfg = fast_config_for(tmp_path_factory.mktemp("daf_per_layer"), backbone="clbench_vit_tiny", epochs=2,
                          limit_train_batches=2)
    overrides = {"bottleneck": 4, "fisher_samples": 4, "align_epochs": 1, "align_per_class": 8,
                 "prior_strength": 1e-3, "per_layer": True}
    result = run(RunSpec("daf", "digits32-2", run=cfg, seed=0, strategy_overrides=overrides), callbacks=[tap],
                 on_experience=lambda i, r, s: after.append({"theta": s.theta().clone(), "strategy": s}))
    assert result.status == "completed", result.error
    return result, tap, after


def test_per_layer_fusion_fuses_each_block_by_its_own_closed_form_beta(per_layer_run):
    """`per_layer`: one beta per adapter block, each the closed form on that block's slice of theta_0,
    theta_g^{t-1}, theta_t*, F_old and F_t (the Fishers measured by hand), reported as `beta_per_block`."""
    result, tap, after = per_layer_run
    strategy, lam = after[-1]["strategy"], 1e-3
    sizes = [sum(p.numel() for p in block.parameters()) for block in strategy.adapter.adapters]
    assert len(sizes) > 1 and sum(sizes) == len(strategy.theta_init)
    bounds = np.cumsum([0, *sizes])
    init = strategy.theta_init.double()
    fisher_old = torch.zeros_like(init)
    betas = []
    for t in range(2):
        prev = init if t == 0 else after[t - 1]["theta"].double()
        optimum = tap.task_optimum[t].double()
        record = result.strategy_report["fusion"][t]
        assert set(record) == {"task", "beta_per_block"} and record["task"] == t
        assert len(record["beta_per_block"]) == len(sizes)
        expected = prev.clone()
        for b, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            d = optimum[lo:hi] - prev[lo:hi]
            a_old = float((fisher_old[lo:hi] * d * d).sum())
            a_new = float((tap.fisher_task[t][lo:hi] * d * d).sum())
            e, d2 = float(((prev[lo:hi] - init[lo:hi]) * d).sum()), float((d * d).sum())
            denominator = a_old + a_new + lam * d2
            beta = min(max((a_new - lam * e) / denominator, 0.0), 1.0) if denominator > 0 else 0.0
            assert record["beta_per_block"][b] == pytest.approx(beta, rel=1e-4, abs=1e-9), (t, b)
            expected[lo:hi] = prev[lo:hi] + record["beta_per_block"][b] * d
        assert torch.allclose(after[t]["theta"].double(), expected, atol=1e-6), t
        betas += record["beta_per_block"]
        fisher_old = fisher_old + tap.fisher_fused[t]
    assert len(set(betas)) > 1  # the blocks were not all fused alike


def test_the_fisher_passes_run_one_epoch_whatever_the_runs_epochs(per_layer_run):
    """The two Fisher passes are one epoch each (one step of the 4 Fisher samples) while training runs
    the run's two epochs of two batches."""
    result, *_ = per_layer_run
    for t, record in enumerate(result.edge["per_experience"]):
        steps = {}
        for shape in record["flops_step_shapes"]:
            steps[shape["phase"]] = steps.get(shape["phase"], 0) + shape["steps"]
        assert (steps["train"], steps["fisher_task"], steps["fisher_fused"]) == (4, 1, 1), t


def _fisher_ready_strategy():
    """A float64 DAF at the start of digits32-5's second task (classes 2 and 3), its adapter moved away
    from W_up = 0, and a batch of 5 samples of both classes."""
    from clbench.engine.runner import create_strategy, strategy_config
    from clbench.models.backbones import build_backbone

    scenario = create_scenario("digits32-5")
    torch.manual_seed(0)
    s = create_strategy("daf", build_backbone("clbench_vit_tiny", in_chans=3, img_size=32), 10,
                        strategy_config("daf", {"bottleneck": 4, "margin": 0.2}), seed=0)
    s.on_experience_start(scenario.info(1))
    with torch.no_grad():
        for p in s.adapter.parameters():
            p.normal_(0, 0.1)
    s.double().train()
    train = scenario.train_sets[1]
    pick = torch.cat([(train.y == 2).nonzero()[:3, 0], (train.y == 3).nonzero()[:2, 0]])
    return s, Batch(train.x[pick].double(), train.y[pick])


def test_vectorised_fisher_stacks_at_most_the_devices_element_budget_per_chunk(monkeypatch):
    """Per-sample gradients are stacked `FISHER_CHUNK_ELEMENTS[device] // adapter parameters` samples
    at a time (at least one; `FISHER_CHUNK_ELEMENTS_DEFAULT` on a device without an entry), and the
    chunks' sums add up to the batch-1 loop's sum."""
    import warnings

    import clbench.strategies.daf as daf

    s, batch = _fisher_ready_strategy()
    numel = len(s.theta())
    with eval_mode(s.backbone, s.adapter):  # no dropout, as in the Fisher passes
        expected = s.looped_squared_gradients(batch)
    sizes, vmap = [], daf.vmap

    def counting_vmap(fn, in_dims):  # the chunk sizes the stacked gradients are computed for
        inner = vmap(fn, in_dims=in_dims)
        return lambda p, x, t: (sizes.append(len(x)), inner(p, x, t))[1]

    monkeypatch.setattr(daf, "vmap", counting_vmap)
    budgets = [({"cpu": 2 * numel + 1}, 10 ** 9, [2, 2, 1]),  # 2 samples' gradients fit, 3 do not
               ({"cpu": numel - 1}, 10 ** 9, [1] * 5),  # not even one fits: one at a time
               ({}, 3 * numel, [3, 2])]  # no entry for this device: the default budget
    for elements, default, chunks in budgets:
        monkeypatch.setattr(daf, "FISHER_CHUNK_ELEMENTS", elements)
        monkeypatch.setattr(daf, "FISHER_CHUNK_ELEMENTS_DEFAULT", default)
        sizes.clear()
        s._fisher_sum, s._fisher_count = None, 0
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no fallback to the loop
            s.accumulate_fisher(batch)
        assert sizes == chunks, elements
        assert torch.allclose(s._fisher_sum, expected, rtol=1e-10, atol=1e-20), elements


def test_vectorised_fisher_silences_only_vmaps_performance_warnings():
    """CPU attention has no vmap batching rule: vmap's "There is a performance drop" UserWarnings are
    kept quiet, while the network's own warnings, of any category and text, still reach the caller, and
    the per-sample loss itself raises none."""
    import warnings

    s, batch = _fisher_ready_strategy()

    def warn(module, inputs, output):
        warnings.warn("the network's own warning", UserWarning)
        warnings.warn("There is a performance drop in the network's own code", RuntimeWarning)

    handle = s.head.register_forward_hook(warn)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            s.accumulate_fisher(batch)
    finally:
        handle.remove()
    assert s.vectorised_fisher and s._fisher_count == 5
    # the network runs once per chunk (one here): its two warnings, and nothing else, reach the caller
    assert sorted(((type(w.message).__name__, str(w.message)) for w in caught), key=str) == [
        ("RuntimeWarning", "There is a performance drop in the network's own code"),
        ("UserWarning", "the network's own warning")]


def test_the_config_refuses_a_negative_lambda_or_fisher_sample_count_and_a_holdout_fraction_outside_0_1():
    """prior_strength (lambda) and fisher_samples are >= 0 (0 samples: all of the task's), and the
    held-out fraction of select_prior is strictly between 0 and 1; each refusal names the bad value."""
    from clbench.errors import UsageError
    from clbench.strategies.daf import DAFConfig

    refused = {"prior_strength": -1e-3, "fisher_samples": -1, "holdout_fraction": (0.0, 1.0, 1.5, -0.2)}
    for name, values in refused.items():
        for value in values if isinstance(values, tuple) else (values,):
            with pytest.raises(UsageError, match=f"^{name}={value} is invalid"):
                DAFConfig(**{name: value})
    kept = DAFConfig(prior_strength=0.0, fisher_samples=0, holdout_fraction=0.999)
    assert (kept.prior_strength, kept.fisher_samples, kept.holdout_fraction) == (0.0, 0, 0.999)
