"""PrePrompt (Huang et al., arXiv 2505.08586; official code): faithfulness checks (frozen backbone,
prompt-free routing and slot choice, prompt bookkeeping, the in-forward momentum mix, statistics with the
true task's prompt, feature translation and its use as calibration data, what calibration and training may
change, masking)."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from clbench.strategies.preprompt import translated_features

from clbench.engine.runner import (
    RunSpec,
    create_scenario,
    create_strategy,
    run,
    strategy_config,
)
from clbench.models.backbones import build_backbone
from clbench.types import Batch

TINY = {"prompt_length": 2, "prompt_blocks": 2, "calibration_epochs": 2, "calibration_batch": 16}


@pytest.fixture(scope="module")
def preprompt_run(tmp_path_factory, fast_config_for, fit_snapshots):
    snaps = fit_snapshots(lambda m: {"prompts": m.prompts, "head": m.head.weight, "route": m.route_head.weight,
                                     "backbone": m.backbone.state_dict()}, by_phase=True)
    final = []
    cfg = fast_config_for(tmp_path_factory.mktemp("preprompt"), backbone="clbench_vit_tiny", epochs=1, limit_train_batches=3)
    result = run(RunSpec("preprompt", "digits32-5", run=cfg, seed=0, strategy_overrides=TINY), callbacks=[snaps],
                 on_experience=lambda i, r, s: final.append((s.prompts.detach().clone(), s)))
    assert result.status == "completed", result.error
    return snaps.at, final


def test_the_backbone_never_changes(preprompt_run):
    at, _ = preprompt_run
    before = at[(0, "train", "start")]["backbone"]
    for key in [(0, "train", "end"), (1, "train", "end"), (1, "calibrate", "end"), (4, "calibrate", "end")]:
        assert all(torch.equal(at[key]["backbone"][k], before[k]) for k in before), key


def test_prompt_bookkeeping_copy_mix_and_untouched_earlier_slots(preprompt_run):
    at, final = preprompt_run
    for t in range(1, 5):
        start, trained = at[(t, "train", "start")]["prompts"], at[(t, "train", "end")]["prompts"]
        assert torch.equal(start[:, :, t], start[:, :, t - 1])  # P_t <- P_{t-1}
        assert torch.equal(trained[:, :, :t], start[:, :, :t])  # earlier slots untouched by training task t
        written = final[t][0]
        expected = 0.99 * trained[:, :, t] + 0.01 * trained[:, :, :t].mean(2)
        assert torch.allclose(written[:, :, t], expected, atol=1e-6)  # the momentum write-back
    assert not torch.equal(at[(0, "train", "end")]["prompts"][:, :, 0], at[(0, "train", "start")]["prompts"][:, :, 0])


def test_calibration_changes_only_the_label_head_and_training_keeps_old_rows(preprompt_run):
    at, _ = preprompt_run
    for t in range(1, 5):
        before, after = at[(t, "calibrate", "start")], at[(t, "calibrate", "end")]
        assert torch.equal(before["prompts"], after["prompts"]) and torch.equal(before["route"], after["route"])
        assert not torch.equal(before["head"], after["head"])
        start, end = at[(t, "train", "start")], at[(t, "train", "end")]
        old = list(range(2 * t))  # two classes per task
        assert torch.equal(start["head"][old], end["head"][old]) and torch.equal(start["route"][old], end["route"][old])


def _strategy_after_two_tasks():
    torch.manual_seed(0)
    strategy = create_strategy("preprompt", build_backbone("clbench_vit_tiny", in_chans=3, img_size=32), 10,
                               strategy_config("preprompt", TINY), seed=0)
    scenario = create_scenario("digits32-5")
    strategy.on_experience_start(scenario.info(0))
    strategy.on_experience_start(scenario.info(1))
    return strategy, scenario


def test_routing_ignores_prompts_and_picks_the_predicted_classs_task_slot():
    strategy, scenario = _strategy_after_two_tasks()
    x = scenario.test_sets[0].x[:5]
    strategy.eval()
    route = strategy.route_head(strategy.unprompted(x))
    with torch.no_grad():
        strategy.prompts.add_(torch.randn_like(strategy.prompts))
    assert torch.equal(strategy.route_head(strategy.unprompted(x)), route)
    with torch.no_grad():  # a route head that always predicts class 3, a class of task 1
        strategy.route_head.weight.zero_()
        strategy.route_head.bias.copy_(torch.arange(10, dtype=torch.float32) == 3)
    used = []
    original = strategy.prefix
    strategy.prefix = lambda slots, mixed=False: used.append(slots.clone()) or original(slots, mixed)
    strategy.predict_logits(x)
    assert len(used) == 1 and used[0].tolist() == [1] * 5


def test_training_logits_are_masked_to_the_tasks_classes():
    strategy, scenario = _strategy_after_two_tasks()
    strategy.phase = strategy.phases(scenario.info(1))[0]
    data = scenario.train_sets[1]
    losses = strategy.step_losses(Batch(data.x[:8], data.y[:8]))
    (losses["route"] + losses["label"]).backward()
    outside = [c for c in range(10) if c not in (2, 3)]
    assert torch.all(strategy.head.weight.grad[outside] == 0) and torch.all(strategy.route_head.weight.grad[outside] == 0)
    assert strategy.head.weight.grad[[2, 3]].abs().sum() > 0 and strategy.route_head.weight.grad[[2, 3]].abs().sum() > 0
    assert strategy.prompts.grad[:, :, 1].abs().sum() > 0 and torch.all(strategy.prompts.grad[:, :, 0] == 0)


def test_feature_translation_on_a_hand_built_example():
    old_means = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    current_means = torch.tensor([[0.2, 1.0], [3.0, 0.1]])
    clouds = [torch.tensor([[0.0, 1.0], [0.4, 1.0]]), torch.tensor([[2.0, 0.0], [4.0, 0.2]])]
    shifted = translated_features(old_means, current_means, clouds)
    # old class 0 ~ (1, 0) is nearest (cosine) to current class 1; old class 1 ~ (0, 2) to current class 0
    assert torch.allclose(shifted[0], clouds[1] - current_means[1] + old_means[0])
    assert torch.allclose(shifted[1], clouds[0] - current_means[0] + old_means[1])
    # cosine, not the dot product: (1, 0) is at 5.7 degrees from (1, 0.1) and 45 degrees from (5, 5),
    # whose dot product with it is 5 times larger
    current_means = torch.tensor([[5.0, 5.0], [1.0, 0.1]])
    clouds = [torch.tensor([[4.0, 5.0], [6.0, 5.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.2]])]
    shifted = translated_features(torch.tensor([[1.0, 0.0]]), current_means, clouds)
    assert len(shifted) == 1 and torch.allclose(shifted[0], torch.tensor([[1.0, -0.1], [1.0, 0.1]]))


class _Rates(pl.Callback):
    """Learning rates (and SGD momenta) of every optimizer's groups at each training epoch's start, by phase."""

    def __init__(self):
        self.by_phase, self.momenta = {}, {}

    def on_train_epoch_start(self, trainer, pl_module):
        rates = [[g["lr"] for g in opt.param_groups] for opt in trainer.optimizers]
        self.by_phase.setdefault(pl_module.phase.name, []).append(rates)
        momenta = [[g.get("momentum") for g in opt.param_groups] for opt in trainer.optimizers]
        self.momenta.setdefault(pl_module.phase.name, []).append(momenta)


class _MetricNames(pl.loggers.Logger):
    """A Lightning logger that keeps the names of the metrics it receives."""

    def __init__(self):
        super().__init__()
        self.names = set()

    name = "metric-names"
    version = 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.names.update(metrics)


def test_the_step_schedule_decays_prompts_and_label_head_not_the_route_head(tmp_path, fast_config_for):
    rates, logged = _Rates(), _MetricNames()
    cfg = fast_config_for(tmp_path, backbone="clbench_vit_tiny", epochs=3, limit_train_batches=1)
    overrides = {**TINY, "calibration_epochs": 2, "calibration_lr": 0.2, "lr": 0.1, "head_lr_scale": 0.1,
                 "lr_step_epochs": 1, "lr_step_gamma": 0.25}
    result = run(RunSpec("preprompt", "digits32-2", run=cfg, strategy_overrides=overrides), callbacks=[rates],
                 loggers=[logged])
    assert result.status == "completed", result.error
    # the loss terms, logged per step by name: the route and label updates, then calibration
    assert {"train/route", "train/label", "train/calibration", "train/loss"} <= logged.names
    # the task-prediction diagnostic: after the first task every route prediction is task 0
    assert [d["experience"] for d in result.diagnostics] == [0, 1]
    assert result.diagnostics[0]["task_prediction_accuracy"] == [1.0]
    assert len(result.diagnostics[1]["task_prediction_accuracy"]) == 2
    # flattened per epoch: route head, then the label step's prompts and label head
    expected = [[0.01, 0.1 * 0.25**e, 0.01 * 0.25**e] for e in range(3)]
    train = [[lr for opt in epoch for lr in opt] for epoch in rates.by_phase["train"]]
    assert len(train) == 6  # two experiences, each fit starts the schedule afresh
    for epoch, got in enumerate(train):
        assert got == pytest.approx(expected[epoch % 3]), epoch
    # the statistics pass is one epoch whatever the run's epochs, with no optimiser
    statistics = rates.by_phase["statistics"]
    assert len(statistics) == 2 and not any(group for epoch in statistics for group in epoch)
    # calibration (task 1 only): its own 2 epochs (not the run's 3), the label head alone, SGD with momentum
    # 0.9, cosine from calibration_lr to 0 over those epochs: 0.2 (1 + cos(pi e / 2)) / 2
    assert rates.by_phase["calibrate"] == [[[pytest.approx(lr)]] for lr in (0.2, 0.1)]
    assert rates.momenta["calibrate"] == [[[0.9]]] * 2


def test_a_constant_schedule_keeps_every_training_rate(tmp_path, fast_config_for):
    rates = _Rates()
    cfg = fast_config_for(tmp_path, backbone="clbench_vit_tiny", epochs=2, limit_train_batches=1, limit_eval_samples=8,
                          profile=False)
    overrides = {**TINY, "calibration_epochs": 0, "lr": 0.1, "head_lr_scale": 0.1, "lr_schedule": "constant"}
    result = run(RunSpec("preprompt", "digits32-2", run=cfg, strategy_overrides=overrides), callbacks=[rates])
    assert result.status == "completed", result.error
    assert "calibrate" not in rates.by_phase  # calibration_epochs=0: none
    assert rates.by_phase["train"] == [[[pytest.approx(0.01)], [pytest.approx(0.1), pytest.approx(0.01)]]] * 4

def test_task_prediction_accuracy_on_hand_set_predictions():
    scenario = create_scenario("digits32-2")
    torch.manual_seed(0)
    strategy = create_strategy("preprompt", build_backbone("clbench_vit_tiny", in_chans=3, img_size=32), 10,
                               strategy_config("preprompt", TINY), seed=0)
    for i in range(2):
        strategy.on_experience_start(scenario.info(i))
    strategy.on_experience_end(scenario.info(1), scenario.train_sets[1])
    from clbench.datasets import InMemoryDataset
    from clbench.datasets import make_loader

    classes = [scenario.info(i).classes for i in range(2)]
    x = torch.zeros(4, 3, 32, 32)
    first = make_loader(InMemoryDataset(x, torch.tensor([classes[0][0], classes[0][1], classes[0][0], classes[0][1]])),
                        4, shuffle=False)
    second = make_loader(InMemoryDataset(x[:2], torch.tensor([classes[1][0], classes[1][1]])), 4, shuffle=False)
    predicted = iter([torch.tensor([0, 0, 1, 0]), torch.tensor([1, 0])])
    strategy.predicted_task = lambda inputs: next(predicted)
    strategy.eval()
    with torch.no_grad():  # the evaluation's forwards note each sample's predicted task
        for loader in (first, second):
            for batch in loader:
                strategy(batch.x)
    record = strategy.diagnose(scenario.info(1), [first, second], torch.device("cpu"))
    assert record == {"task_prediction_accuracy": [0.75, 0.5]}


def test_cubs_published_setting_trains_the_label_head_at_the_prompts_rate():
    from clbench.errors import UsageError
    from clbench.types import Phase

    cfg = strategy_config("preprompt", TINY, paper_settings_for="cub-10")
    assert cfg.label_head_lr_scale == 1.0
    torch.manual_seed(0)
    strategy = create_strategy("preprompt", build_backbone("clbench_vit_tiny", in_chans=3, img_size=32), 10, cfg, seed=0)
    strategy.on_experience_start(create_scenario("digits32-2").info(0))
    strategy.phase = Phase("train")
    (route, label), _ = strategy.configure_optimizers()
    assert route.param_groups[0]["lr"] == pytest.approx(cfg.lr * 0.1)  # the route head keeps a tenth
    assert [g["lr"] for g in label.param_groups] == pytest.approx([cfg.lr, cfg.lr])
    default = strategy_config("preprompt", TINY, paper_settings_for="cifar100-10")
    assert default.label_head_lr_scale is None  # the head_lr_scale then applies to both heads
    with pytest.raises(UsageError, match="label_head_lr_scale=0.0 is invalid; expected a positive number"):
        strategy_config("preprompt", {"label_head_lr_scale": 0.0})


def test_a_resumed_run_ends_like_an_uninterrupted_one(tmp_path, resume_pair, fast_config_for):
    def spec(out, resume):
        cfg = fast_config_for(out, backbone="clbench_vit_tiny", epochs=1, limit_train_batches=2)
        return RunSpec("preprompt", "digits32-2", run=cfg, seed=0, resume=resume,
                       strategy_overrides={**TINY, "calibration_epochs": 1})

    whole, resumed = resume_pair(spec, tmp_path, stop_after=0)
    assert resumed.status == "completed", resumed.error
    assert resumed.accuracy_matrix == whole.accuracy_matrix


# ---- the live path: calibration data and the in-forward momentum mix, watched during a real run
class _PromptsSeenByAttention(pl.Callback):
    """Task 1, before its first step: slot 0 set to l + 1 at prompt position l and slot 1 to 2 (hand
    values); the prefixes the first prompted block's attention receives during that first step are recorded."""

    def __init__(self):
        self.prefixes, self._handle = [], None

    def on_train_start(self, trainer, pl_module):
        if pl_module.phase.name != "train" or pl_module.experience.index != 1:
            return
        with torch.no_grad():
            length = pl_module.prompts.shape[3]
            pl_module.prompts[:, :, 0] = torch.arange(1.0, length + 1).view(length, 1, 1)
            pl_module.prompts[:, :, 1] = 2.0
        attention = pl_module.backbone.blocks[0].attn
        self._handle = attention.register_forward_pre_hook(
            lambda m, args: self.prefixes.append(None if pl_module.router.prefix is None
                                                 else pl_module.router.prefix.detach().clone()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


class _CalibrationData(pl.Callback):
    """The calibration phase's data as its fit starts: the feature set D and the per-epoch loader; and
    per step, the positions its batch holds and the features the label head receives."""

    def __init__(self):
        self.seen, self._handle = {}, None

    def on_train_start(self, trainer, pl_module):
        if pl_module.phase.name == "calibrate":
            x, y = pl_module._calibration_set
            loader = trainer.train_dataloader
            record = {"x": x.clone(), "y": y.clone(), "positions": len(loader.dataset), "batch": loader.batch_size,
                      "steps": []}
            self.seen[pl_module.experience.index] = record
            self._handle = pl_module.head.register_forward_pre_hook(
                lambda m, args: record["steps"][-1]["head_inputs"].append(args[0].detach().clone()))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._handle is not None:
            self.seen[pl_module.experience.index]["steps"].append({"positions": batch.x[:, 0].long().clone(),
                                                                   "head_inputs": []})

    def on_train_end(self, trainer, pl_module):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


class _Augmentation(pl.Callback):
    """A training augmentation as an image scenario has one (CIFAR's pad-crop-flip): here the identity,
    noting the phase and the shape of every batch it is applied to."""

    def __init__(self):
        self.calls = []

    def setup(self, trainer, pl_module, stage):
        def augment(x):
            self.calls.append((pl_module.phase.name, tuple(x.shape)))
            return x

        pl_module.augment = augment


@pytest.fixture(scope="module")
def calibration_run(tmp_path_factory, fast_config_for):
    """synthetic32-3 (3 tasks x 2 classes of 120 images); one batch holds a whole task, so the
    statistics see every image. The training batches pass an (identity) augmentation."""
    prompts, calibration, augmentation, final = _PromptsSeenByAttention(), _CalibrationData(), _Augmentation(), []

    def keep(i, result, strategy):
        final.append((strategy.prompts.detach().clone(), strategy.class_means.clone(), strategy.class_variances.clone(),
                      strategy))

    cfg = fast_config_for(tmp_path_factory.mktemp("preprompt-calibration"), backbone="clbench_vit_tiny", epochs=1,
                          batch_size=256, limit_train_batches=1)
    result = run(RunSpec("preprompt", "synthetic32-3", run=cfg, seed=0,
                         strategy_overrides={**TINY, "calibration_epochs": 1, "calibration_batch": 16}),
                 callbacks=[prompts, calibration, augmentation], on_experience=keep)
    assert result.status == "completed", result.error
    return prompts.prefixes, calibration.seen, final, augmentation.calls


def _features_with_slot(strategy, prompts, x, slot):
    """The ViT's [CLS] feature with task `slot`'s prompt as a prefix of every sample (eval mode)."""
    prefix = prompts[:, :, [slot] * len(x)]
    was_training = strategy.training
    strategy.eval()
    try:
        with torch.no_grad(), strategy.router.using(prefix):
            return strategy.backbone(x)
    finally:
        strategy.train(was_training)


def _same_rows(got, expected):
    """Equal as multisets of rows (up to float noise)."""
    if got.shape != expected.shape:
        return False
    distances = torch.cdist(got.double(), expected.double())
    return bool(distances.min(0).values.max() < 1e-4) and bool(distances.min(1).values.max() < 1e-4)


@pytest.mark.parametrize("task", [1, 2])
def test_calibration_trains_on_translated_old_class_features_and_the_current_clouds(calibration_run, task):
    _, seen, final, _ = calibration_run
    scenario = create_scenario("synthetic32-3")
    strategy = final[-1][3]
    # every class's features, recomputed here: its task's training images through the frozen ViT with the
    # prompt slot of its task as it was when that task ended (later tasks leave earlier slots alone)
    clouds = {}
    for t in range(task + 1):
        data, prompts = scenario.train_sets[t], final[t][0]
        for c in scenario.info(t).classes:
            clouds[c] = _features_with_slot(strategy, prompts, data.x[data.y == c], t)
    mu = {c: cloud.mean(0) for c, cloud in clouds.items()}
    old, current = list(scenario.info(task).past_classes), list(scenario.info(task).classes)
    # statistics: the true task's prompt, every image of the class, mean and (biased) diagonal variance
    means, variances = final[task][1], final[task][2]
    for c in current:
        assert torch.allclose(means[c], mu[c], atol=1e-5), c
        assert torch.allclose(variances[c], clouds[c].var(0, unbiased=False), atol=1e-5), c

    data = seen[task]
    assert sorted(data["y"].unique().tolist()) == old + current
    for j in current:  # the current classes' own features
        assert _same_rows(data["x"][data["y"] == j], clouds[j]), j
    for c in old:  # each old class: its cosine-nearest current cloud, moved onto its mean, labelled c
        cosine = {j: float(torch.dot(mu[c], mu[j]) / (mu[c].norm() * mu[j].norm())) for j in current}
        nearest = max(current, key=cosine.__getitem__)
        assert _same_rows(data["x"][data["y"] == c], clouds[nearest] - mu[nearest] + mu[c]), c
    # each epoch runs n_old minibatches of min(B_ca, |D| / n_old) = 16
    assert (data["positions"], data["batch"]) == (len(old) * 16, 16)


def test_the_training_forward_mixes_the_current_slot_with_the_earlier_slots_mean(calibration_run):
    prefixes, _, _, _ = calibration_run
    # first step of task 1: the route pass runs without prompts, the label pass with
    # P~_1 = 0.99 P_1 + 0.01 mean(P_0) for every sample: 0.99 * 2 + 0.01 * (l + 1) at prompt position l
    assert len(prefixes) == 2 and prefixes[0] is None
    used = prefixes[1]
    assert used.shape[:4] == (TINY["prompt_blocks"], 2, 120, TINY["prompt_length"])
    assert torch.allclose(used[:, :, :, 0], torch.full_like(used[:, :, :, 0], 1.99), atol=1e-6)
    assert torch.allclose(used[:, :, :, 1], torch.full_like(used[:, :, :, 1], 2.0), atol=1e-6)


# ---- a global batch: the gradients of k batches, each loss divided by k, summed into one step
class _FirstStepGradients(pl.Callback):
    """The gradients each optimiser steps on at the run's first training step (the route optimiser,
    then the prompt/label one), after clipping; the run is stopped there."""

    def __init__(self):
        self.grads = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append([p.grad.detach().clone() for g in optimizer.param_groups for p in g["params"]])
        if len(self.grads) == 2:
            raise KeyboardInterrupt


def _first_step_gradients(fast_config_for, out, **run_overrides):
    grads = _FirstStepGradients()
    cfg = fast_config_for(out, backbone="clbench_vit_tiny", epochs=1, limit_eval_samples=8, profile=False, **run_overrides)
    with pytest.raises(KeyboardInterrupt):  # a clip no gradient reaches: the summed gradients themselves
        run(RunSpec("preprompt", "synthetic32-3", run=cfg, seed=0, strategy_overrides={**TINY, "grad_clip": 1e9}),
            callbacks=[grads])
    return grads.grads


def test_a_global_batch_of_two_batches_steps_on_the_gradient_of_one_batch_twice_the_size(tmp_path, fast_config_for):
    # the loader's permutation does not depend on the batch size: two batches of 8 are the 16 samples of
    # one batch of 16, and the mean loss over 16 is the mean of the two 8-sample means
    whole = _first_step_gradients(fast_config_for, tmp_path / "whole", batch_size=16, limit_train_batches=1)
    accumulated = _first_step_gradients(fast_config_for, tmp_path / "accumulated", batch_size=8, global_batch_size=16,
                                        limit_train_batches=2)
    assert [len(g) for g in whole] == [2, 3]  # route head (weight, bias); prompts, label head (weight, bias)
    for got, expected in zip(accumulated, whole):
        for a, b in zip(got, expected):
            assert b.abs().sum() > 0
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_a_state_saved_before_the_first_experience_loads_into_a_fresh_strategy():
    # no prompts exist before the first experience starts: the resume loader creates none
    from clbench.engine.checkpoint import load_strategy_state

    def fresh():
        torch.manual_seed(0)
        return create_strategy("preprompt", build_backbone("clbench_vit_tiny", in_chans=3, img_size=32), 10,
                               strategy_config("preprompt", TINY), seed=0)

    saved, loaded = fresh(), fresh()
    assert "prompts" not in saved.state_dict()
    load_strategy_state(loaded, saved.state_dict(), saved.extra_state())
    assert loaded.prompts is None and loaded.state_dict().keys() == saved.state_dict().keys()


def test_the_calibration_steps_address_rows_of_d_past_float32s_whole_numbers():
    # a calibration step fetches the rows of D at its positions of the epoch's permutation; float32 holds
    # whole numbers exactly only up to 2**24, so position 2**24 + 1 must still reach row 2**24 + 1
    from clbench.strategies.preprompt import _CalibrationEpoch
    from clbench.types import Phase

    size = 2**24 + 2
    strategy, scenario = _strategy_after_two_tasks()
    strategy.phase = Phase("calibrate")
    rows = torch.arange(size)
    strategy._order = rows  # the identity permutation: the row fetched is the position itself
    strategy._calibration_set = (rows.unsqueeze(1), rows)
    epoch = _CalibrationEpoch(size, 2)
    positions = [size - 1, size - 2, 2**24 - 1]
    x, y = strategy._calibration_batch(Batch(*epoch.__getitems__(positions)))
    assert x[:, 0].tolist() == positions and y.tolist() == positions


@pytest.mark.parametrize("setting, expected", [
    ({"prompt_length": 0}, "prompt_length=0 is invalid; expected a positive integer"),
    ({"prompt_blocks": 0}, "prompt_blocks=0 is invalid; expected a positive integer"),
    ({"calibration_batch": 0}, "calibration_batch=0 is invalid; expected a positive integer"),
    ({"prompt_momentum": 1.5}, r"prompt_momentum=1.5 is invalid; expected a number in \[0, 1\]"),
    ({"prompt_momentum": -0.1}, r"prompt_momentum=-0.1 is invalid; expected a number in \[0, 1\]"),
    ({"grad_clip": 0.0}, "grad_clip=0.0 is invalid; expected a positive number"),
    ({"calibration_lr": 0.0}, "calibration_lr=0.0 is invalid; expected a positive number"),
    ({"calibration_epochs": -1}, "calibration_epochs=-1 is invalid; expected an integer >= 0"),
    ({"head_lr_scale": 0.0}, "head_lr_scale=0.0 is invalid; expected a positive number"),
    ({"head_lr_scale": 0.5, "label_head_lr_scale": -1.0}, "label_head_lr_scale=-1.0 is invalid; expected a positive number"),
])
def test_a_setting_out_of_range_is_refused_with_its_name(setting, expected):
    from clbench.errors import UsageError

    with pytest.raises(UsageError, match=f"^{expected}$"):
        strategy_config("preprompt", setting)


def test_the_edges_of_the_ranges_are_accepted():
    # m = 0 (no mix) and m = 1 (the earlier slots' mean alone), no calibration, and small positive scales
    for setting in ({"prompt_momentum": 0.0}, {"prompt_momentum": 1.0}, {"calibration_epochs": 0},
                    {"head_lr_scale": 0.5, "label_head_lr_scale": 0.5}, {"head_lr_scale": 1e-3, "label_head_lr_scale": None},
                    {"prompt_length": 1, "prompt_blocks": 1, "calibration_batch": 1, "grad_clip": 1e-3, "calibration_lr": 1e-6}):
        cfg = strategy_config("preprompt", setting)
        assert all(getattr(cfg, k) == v for k, v in setting.items()), setting


@pytest.mark.parametrize("calibration_batch", [1, 1000])
def test_a_calibration_epoch_runs_n_old_minibatches_of_the_batch_or_of_d_over_n_old_when_d_is_smaller(
        tmp_path, fast_config_for, calibration_batch):
    calibration = _CalibrationData()
    cfg = fast_config_for(tmp_path, backbone="clbench_vit_tiny", epochs=1, limit_train_batches=1, limit_eval_samples=8,
                          profile=False)
    result = run(RunSpec("preprompt", "digits32-2", run=cfg, seed=0,
                         strategy_overrides={**TINY, "calibration_epochs": 1, "calibration_batch": calibration_batch}),
                 callbacks=[calibration])
    assert result.status == "completed", result.error
    data = calibration.seen[1]
    n_old = len(create_scenario("digits32-2").info(1).past_classes)  # 5
    # the statistics saw one batch of 16 images: D is their features and the old classes' translated clouds,
    # far fewer than n_old x 1000 rows
    d = len(data["y"])
    expected = 1 if calibration_batch == 1 else d // n_old
    assert 1 < d // n_old < 1000
    assert (data["positions"], data["batch"]) == (n_old * expected, expected)


def test_each_calibration_epoch_reads_d_in_an_order_drawn_from_the_run_seeds_own_generator(calibration_run):
    # the shuffles of D come from a generator of the strategy's own, seeded with the run's seed (0 + 53) and
    # drawn once per calibration epoch in turn (task 1's, then task 2's), whatever the global RNG holds; a
    # step's batch holds positions p of that epoch's permutation, and the label head gets the rows perm[p] of D
    _, seen, _, _ = calibration_run
    generator = torch.Generator().manual_seed(0 + 53)
    for task in (1, 2):
        data = seen[task]
        perm = torch.randperm(len(data["x"]), generator=generator)
        assert len(data["steps"]) == 1  # one calibration epoch of one batch (limit_train_batches=1)
        for step in data["steps"]:
            assert len(step["head_inputs"]) == 1 and len(step["positions"]) == data["batch"]
            assert torch.equal(step["head_inputs"][0], data["x"][perm[step["positions"]]])


def test_only_the_training_images_are_augmented_not_the_statistics_pass_or_the_calibration_features(calibration_run):
    # the statistics take the features of the images as they are, and calibration's inputs are positions in D
    *_, calls = calibration_run
    assert calls == [("train", (120, 3, 32, 32))] * 3  # one training batch per task


def test_the_runs_seed_and_add_ons_reach_the_strategy_and_see_every_task_end(task_ends_reach_add_ons):
    torch.manual_seed(0)
    task_ends_reach_add_ons("preprompt", build_backbone("clbench_vit_tiny", in_chans=3, img_size=32), TINY)


def test_an_empty_test_set_scores_nan_in_the_task_prediction_diagnostic():
    # what the runner does after an experience: the evaluation's forwards note tau_hat, then the diagnostic;
    # a seen experience without test samples is NaN there, as in the accuracy row
    from types import SimpleNamespace

    from clbench.datasets import InMemoryDataset, make_loader
    from clbench.tasks.classification import ClassificationTask

    scenario = create_scenario("synthetic32-3")
    scenario.test_sets[1] = InMemoryDataset(torch.zeros(0, 3, 32, 32), torch.zeros(0, dtype=torch.long))
    torch.manual_seed(0)
    strategy = create_strategy("preprompt", build_backbone("clbench_vit_tiny", in_chans=3, img_size=32), 6,
                               strategy_config("preprompt", TINY), seed=0)
    for t in range(2):
        strategy.on_experience_start(scenario.info(t))
        strategy.on_experience_end(scenario.info(t), scenario.train_sets[t])
    with torch.no_grad():  # a route head that predicts class 0 (task 0) for every image
        strategy.route_head.weight.zero_()
        strategy.route_head.bias.copy_(torch.arange(6) == 0)
    loaders = [make_loader(d, 256, shuffle=False) for d in scenario.test_sets]
    result = SimpleNamespace(accuracy_matrix=[], diagnostics=[], aux_results={})
    ClassificationTask().after_experience(result, strategy, scenario.info(1), scenario, loaders, torch.device("cpu"))
    row = result.accuracy_matrix[0]
    assert len(row) == 3 and row[1] != row[1] and row[2] == 0.0  # NaN: no sample; 0: not seen yet
    assert [d["experience"] for d in result.diagnostics] == [1]
    shares = result.diagnostics[0]["task_prediction_accuracy"]
    assert len(shares) == 2 and shares[0] == 1.0 and shares[1] != shares[1]


def test_the_first_task_creates_one_prompt_slot_per_task_drawn_from_u_minus_one_one():
    torch.manual_seed(0)
    strategy = create_strategy("preprompt", build_backbone("clbench_vit_tiny", in_chans=3, img_size=32), 10,
                               strategy_config("preprompt", TINY), seed=0)
    assert strategy.prompts is None
    strategy.on_experience_start(create_scenario("digits32-5").info(0))
    # (blocks, key/value, task slot, length, heads, head_dim): the tiny ViT has 4 heads of 16 dims
    assert strategy.prompts.shape == (2, 2, 5, 2, 4, 16) and strategy.prompts.requires_grad
    values = strategy.prompts.detach()
    # 640 draws of U(-1, 1): all inside, both ends reached within 0.1 (each misses with probability 0.95**640)
    assert values.min() >= -1 and values.max() <= 1 and values.min() < -0.9 and values.max() > 0.9


def test_prompts_may_cover_every_block_of_the_vit_but_not_more():
    from clbench.errors import UsageError

    backbone = build_backbone("clbench_vit_tiny", in_chans=3, img_size=32)  # 4 blocks
    strategy = create_strategy("preprompt", backbone, 10, strategy_config("preprompt", {**TINY, "prompt_blocks": 4}), seed=0)
    strategy.on_experience_start(create_scenario("digits32-5").info(0))
    assert strategy.prompts.shape[0] == 4
    with pytest.raises(UsageError, match=r"^prompt_blocks=5 is invalid for this backbone: it is more than the ViT's "
                                         r"depth \(4\); expected 1\.\.4, e\.g\. --set prompt_blocks=4$"):
        create_strategy("preprompt", backbone, 10, strategy_config("preprompt", {**TINY, "prompt_blocks": 5}), seed=0)


def test_inference_routes_and_labels_among_the_seen_classes_only():
    strategy, scenario = _strategy_after_two_tasks()  # seen: classes 0-3 of tasks 0 and 1
    x = scenario.test_sets[0].x[:5]
    strategy.eval()
    with torch.no_grad():  # the route head's top class is 9 (task 4, unseen), then 3 (task 1)
        strategy.route_head.weight.zero_()
        strategy.route_head.bias.copy_(10.0 * (torch.arange(10) == 9) + (torch.arange(10) == 3))
    used = []
    handle = strategy.backbone.blocks[0].attn.register_forward_pre_hook(
        lambda m, args: used.append(None if strategy.router.prefix is None else strategy.router.prefix.clone()))
    with torch.no_grad():
        logits = strategy.predict_logits(x)
    handle.remove()
    # the route pass without prompts, then slot 1's prompt (as it is: no momentum mix at inference)
    assert len(used) == 2 and used[0] is None and torch.equal(used[1], strategy.prompts[:, :, [1] * 5])
    assert torch.isfinite(logits[:, :4]).all() and torch.all(logits[:, 4:] == float("-inf"))
    # the output carries the prompted feature the label head reads (what feature add-ons distil)
    with torch.no_grad():
        out = strategy(x)
    features = _features_with_slot(strategy, strategy.prompts, x, 1)
    assert torch.allclose(out.features, features, atol=1e-6)
    assert torch.allclose(out.logits[:, :4], strategy.head(features)[:, :4], atol=1e-6)


def test_a_loaded_strategy_with_no_experience_set_routes_and_labels_over_the_classes_it_has_learnt():
    # load_strategy_state without on_resume (inference from a checkpoint): no experience tells the seen
    # classes, so routing and the label head's logits run over the classes of the tasks it has learnt (0-3)
    from clbench.engine.checkpoint import load_strategy_state

    trained, scenario = _strategy_after_two_tasks()
    with torch.no_grad():  # a route head whose top class is 9 (never learnt), then 3 (task 1)
        trained.route_head.weight.zero_()
        trained.route_head.bias.copy_(10.0 * (torch.arange(10) == 9) + (torch.arange(10) == 3))
    torch.manual_seed(1)
    loaded = create_strategy("preprompt", build_backbone("clbench_vit_tiny", in_chans=3, img_size=32), 10,
                             strategy_config("preprompt", TINY), seed=0)
    load_strategy_state(loaded, trained.state_dict(), trained.extra_state())
    assert loaded.experience is None
    x = scenario.test_sets[0].x[:3]
    loaded.eval()
    with torch.no_grad():
        out = loaded(x)
    assert torch.allclose(out.features, _features_with_slot(loaded, trained.prompts.detach(), x, 1), atol=1e-6)
    assert torch.isfinite(out.logits[:, :4]).all() and torch.all(out.logits[:, 4:] == float("-inf"))


def test_the_frozen_vit_gets_no_gradient_from_a_training_step():
    strategy, scenario = _strategy_after_two_tasks()
    strategy.phase = strategy.phases(scenario.info(1))[0]
    data = scenario.train_sets[1]
    losses = strategy.step_losses(Batch(data.x[:8], data.y[:8]))
    (losses["route"] + losses["label"]).backward()
    assert all(not p.requires_grad and p.grad is None for p in strategy.backbone.parameters())
    assert strategy.prompts.grad is not None and strategy.head.weight.grad is not None
