"""eTag (Huang et al., AAAI 2024; official code): faithfulness checks (nothing but model and generator
between tasks, rotation labels, parameter counts, frozen batch-norm statistics, the batch L2 term, the
tau^2- and K_old-scaled auxiliary distillation, the anchored generator), several of them through a real run."""

from __future__ import annotations

import copy
import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from clbench.strategies.etag import embedding_l2, rotations

from clbench.engine.runner import (
    RunSpec,
    create_scenario,
    create_strategy,
    run,
    strategy_config,
)
from clbench.models.backbones import build_backbone
from clbench.types import Batch

TINY = {"generator_epochs": 1, "latent": 8, "hidden": 16}


def _strategy(num_classes=6, backbone="resnet18_cifar_nf8", **overrides):
    torch.manual_seed(0)
    return create_strategy("etag", build_backbone(backbone, in_chans=3, img_size=32), num_classes,
                           strategy_config("etag", {**TINY, **overrides}), seed=0)


def test_between_tasks_only_model_and_generator_weights_remain(tmp_path, fast_config_for):
    held = []
    cfg = fast_config_for(tmp_path, backbone="resnet18_cifar_nf8", epochs=1, limit_train_batches=2)
    result = run(RunSpec("etag", "synthetic32-3", run=cfg, seed=0, strategy_overrides=TINY),
                 on_experience=lambda i, r, s: held.append(s))
    assert result.status == "completed", result.error
    strategy = held[-1]
    assert strategy.teacher is None and strategy.previous_generator is None
    loose = [k for k, v in vars(strategy).items() if isinstance(v, torch.Tensor)
             or (isinstance(v, (list, tuple, dict)) and any(isinstance(t, torch.Tensor) for t in (v.values() if isinstance(v, dict) else v)))]
    assert loose == []
    modules = {"backbone", "branches", "head", "generator", "aux"}
    assert {name.split(".")[0] for name, _ in strategy.state_dict().items()} <= modules
    assert all(name.endswith(("running_mean", "running_var", "num_batches_tracked")) for name, _ in strategy.named_buffers())
    assert result.edge["per_experience"][-1].get("buffer_bytes", 0) == 0


def test_auxiliary_heads_have_4c_outputs_and_rotation_labels_shift_with_the_image():
    strategy = _strategy()
    x, y = torch.randn(5, 3, 32, 32), torch.tensor([0, 3, 5, 1, 2])
    x_rot, joint = rotations(x, y)
    assert x_rot.shape[0] == 20 and joint.tolist()[:5] == (4 * y).tolist()
    stages = strategy.stage_outputs(x_rot)
    assert all(branch(stages[k]).shape == (20, 24) for k, branch in enumerate(strategy.branches))
    turned, turned_joint = rotations(torch.rot90(x, 1, dims=(2, 3)), y)
    for r in range(4):  # the image at rotation r of the turned batch is rotation r+1 of the original
        src = (r + 1) % 4
        assert torch.equal(turned[5 * r:5 * r + 5], x_rot[5 * src:5 * src + 5])
        assert joint[5 * src:5 * src + 5].tolist() == [4 * c + src for c in y.tolist()]
        assert turned_joint[5 * r:5 * r + 5].tolist() == [4 * c + r for c in y.tolist()]


def test_parameter_counts_for_cifar100():
    with torch.device("meta"):
        strategy = _strategy(num_classes=100, backbone="resnet18_cifar", latent=200, hidden=512)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    model = count(strategy.backbone) + count(strategy.head)
    assert model == pytest.approx(11.22e6, abs=0.01e6)
    total = model + sum(count(b) for b in strategy.branches[:3]) + count(strategy.generator)
    assert total == pytest.approx(43.20e6, abs=0.01e6)


def _incremental(strategy):
    scenario = create_scenario("synthetic32-3")
    strategy.on_experience_start(scenario.info(0))
    strategy.on_experience_end(scenario.info(0), scenario.train_sets[0])
    strategy.on_experience_start(scenario.info(1))
    return scenario


def test_incremental_tasks_keep_batch_norm_statistics_and_train_its_affine_parameters():
    strategy = _strategy()
    scenario = _incremental(strategy)
    strategy.phase = strategy.phases(scenario.info(1))[0]
    strategy.on_train_epoch_start()
    bn = strategy.backbone.layer2[0].bn1
    stats, weight = (bn.running_mean.clone(), bn.running_var.clone()), bn.weight.detach().clone()
    optimizer = strategy.configure_optimizers()["optimizer"]
    data = scenario.train_sets[1]
    loss = sum(strategy.step_losses(Batch(data.x[:8], data.y[:8])).values())
    loss.backward()
    optimizer.step()
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert not torch.equal(bn.weight, weight)


def test_the_embedding_term_is_one_unsquared_norm_over_the_batch():
    student = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    teacher = torch.tensor([[-2.0, 2.0], [3.0, 0.0]])  # difference [[3, 0], [0, 4]]: norm 5
    assert embedding_l2(student, teacher, k_old=2).item() == pytest.approx(10.0)


def test_k_old_counts_old_classes_in_units_of_a_new_task():
    from clbench.types import ExperienceInfo

    strategy = _strategy(num_classes=100)
    strategy.first_task_classes = 50  # B50: then 5 tasks of 10 classes
    for t, expected in ((1, 5), (2, 6), (5, 9)):
        seen = 50 + 10 * t
        exp = ExperienceInfo(t, tuple(range(seen - 10, seen)), tuple(range(seen)), 6, 100)
        assert strategy.k_old(exp) == expected == (seen - 10) // 10


def test_the_step_distils_the_embeddings_of_all_4b_rotated_images():
    strategy = _strategy()
    scenario = _incremental(strategy)
    strategy.phase = strategy.phases(scenario.info(1))[0]
    strategy.on_train_epoch_start()
    with torch.no_grad():  # the student has moved away from its teacher
        strategy.backbone.layer4[0].conv1.weight.mul_(1.5)
    data = scenario.train_sets[1]
    x, y = data.x[:6], data.y[:6]
    terms = strategy.step_losses(Batch(x, y))
    x_rot, _ = rotations(x, y)
    with torch.no_grad():
        student = strategy.stage_outputs(x_rot)[-1].mean(dim=(2, 3))
        teacher = strategy.stage_outputs(x_rot, strategy.teacher["backbone"])[-1].mean(dim=(2, 3))
    k_old = strategy.k_old(scenario.info(1))
    assert k_old == 1  # synthetic32-3: 2 classes in every task, one old task
    expected = strategy.cfg.distill_weight * k_old * torch.linalg.norm(student - teacher)
    assert terms["embedding_l2"].item() == pytest.approx(expected.item(), rel=1e-5)
    unrotated_only = strategy.cfg.distill_weight * k_old * torch.linalg.norm(student[:6] - teacher[:6])
    assert abs(terms["embedding_l2"].item() - unrotated_only.item()) > 1e-3 * expected.item()


def test_a_generator_step_keeps_the_previous_generator_and_learns_the_classifiers_old_classes():
    strategy = _strategy(generator_lr=1e-3)
    scenario = _incremental(strategy)
    strategy.phase = strategy.phases(scenario.info(1))[1]
    assert strategy.phase.name == "generator"
    strategy.__dict__["previous_generator"] = copy.deepcopy(strategy.generator).requires_grad_(False).eval()
    anchor = {k: v.clone() for k, v in strategy.previous_generator.state_dict().items()}
    strategy.on_train_epoch_start()
    with torch.no_grad():  # a classifier with a clear opinion, as after training (an untrained one is near uniform)
        strategy.head.weight.copy_(torch.randn(strategy.head.weight.shape, generator=torch.Generator().manual_seed(3)) * 3)
    g = torch.Generator().manual_seed(0)
    z, y_old = torch.randn(64, 8, generator=g), torch.tensor([0, 1] * 32)

    def old_class_ce():
        with torch.no_grad():
            return F.cross_entropy(strategy.head(strategy.generator.decode(z, y_old)), y_old).item()

    before = old_class_ce()
    # the step draws these latents and old labels, so the classifier's CE on them is in its loss
    strategy._latent, strategy._old_labels = (lambda n: z[:n]), (lambda n: y_old[:n])
    optimizer = strategy.configure_optimizers()
    data = scenario.train_sets[1]
    for _ in range(10):
        optimizer.zero_grad()
        sum(strategy.generator_losses(Batch(data.x[:16], data.y[:16])).values()).backward()
        optimizer.step()
    assert all(torch.equal(strategy.previous_generator.state_dict()[k], anchor[k]) for k in anchor)
    assert old_class_ce() < before


def test_model_learning_rate_decays_tenfold_every_30_epochs_and_the_generator_keeps_its_own():
    from clbench.types import Phase

    strategy = _strategy()
    strategy.phase = Phase("train")
    schedule = strategy.configure_optimizers()["lr_scheduler"]
    optimizer = schedule.optimizer
    rates = []
    for _ in range(61):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates[0] == rates[29] == 1e-3 and rates[30] == rates[59] == pytest.approx(1e-4) and rates[60] == pytest.approx(1e-5)
    strategy.phase = Phase("generator")
    assert isinstance(strategy.configure_optimizers(), torch.optim.Adam)


def test_paper_settings_are_the_appendix_values_on_etags_b50_splits():
    from clbench.engine.runner import paper_settings
    from clbench.registry import STRATEGIES

    cls = STRATEGIES.get("etag")
    for name, epochs in (("cifar100-b50-5", 100), ("cifar100-b50-10", 100), ("imagenet-subset-b50-5", 70),
                         ("imagenet-subset-b50-10", 70)):
        run_values, strategy_values = paper_settings(cls, name)
        assert run_values == {"class_order": "paper", "batch_size": 128, "global_batch_size": 128, "epochs": epochs}
        assert (strategy_values["optimizer"], strategy_values["lr"], strategy_values["weight_decay"]) == ("adam", 1e-3, 2e-4)
    cfg = cls.Config()  # the rest of the recipe is the default
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.lr_schedule, cfg.lr_step_epochs) == ("adam", 1e-3, 2e-4, "step", 30)


# ---- the live path: a whole run, watched by callbacks in the order the runner calls the hooks
class _GeneratorAnchor(pl.Callback):
    """What the generator phase sees once its module hook has run (`on_train_start` follows the
    module's `on_fit_start`): the previous generator, how it relates to the live one, its weights."""

    def __init__(self):
        self.seen = {}

    def on_train_start(self, trainer, pl_module):
        if pl_module.phase.name != "generator":
            return
        previous, live = pl_module.previous_generator, pl_module.generator
        record = {"exists": previous is not None}
        if previous is not None:
            live_storage = {p.data_ptr() for p in live.parameters()}
            record.update(
                is_live=previous is live,
                shares_storage=any(p.data_ptr() in live_storage for p in previous.parameters()),
                frozen=not any(p.requires_grad for p in previous.parameters()),
                eval_mode=not any(m.training for m in previous.modules()),
                weights={k: v.detach().clone() for k, v in previous.state_dict().items()})
        self.seen[pl_module.experience.index] = record

    def on_fit_end(self, trainer, pl_module):  # before the module's on_fit_end
        if pl_module.phase.name == "generator" and pl_module.previous_generator is not None:
            self.seen[pl_module.experience.index]["weights_at_end"] = {
                k: v.detach().clone() for k, v in pl_module.previous_generator.state_dict().items()}


TAU, LOG_23 = 3.0, math.log(23.0)  # student auxiliary logits (tau ln 23, 0, ..., 0): softmax(./tau) = (1/2, 1/46, ...)


class _HandSetAuxiliaryLogits(pl.Callback):
    """At the start of experience 2's feature-extractor fit, before its first step: every distilled
    auxiliary head of the student outputs the constant logits (tau ln 23, 0, ..., 0)."""

    def on_train_start(self, trainer, pl_module):
        if pl_module.experience.index == 2 and pl_module.phase.name == "train":
            with torch.no_grad():
                for branch in pl_module.branches[:3]:
                    branch.fc.weight.zero_()
                    branch.fc.bias.zero_()
                    branch.fc.bias[0] = TAU * LOG_23


@pytest.fixture(scope="module")
def etag_run(tmp_path_factory, fast_config_for, fit_snapshots):
    bn = lambda m: m.backbone.layer2[0].bn1  # noqa: E731
    snaps = fit_snapshots(lambda m: {"generator": m.generator.state_dict(), "bn_mean": bn(m).running_mean,
                                     "bn_var": bn(m).running_var, "bn_weight": bn(m).weight,
                                     "backbone": m.backbone.state_dict()}, by_phase=True)
    anchor, first_terms = _GeneratorAnchor(), {}

    def between(i, result, strategy):
        if i != 1:
            return
        # the teacher of experience 2 (made when it starts) gets auxiliary heads with all-zero logits
        with torch.no_grad():
            for branch in strategy.branches[:3]:
                branch.fc.weight.zero_()
                branch.fc.bias.zero_()
        original = strategy.step_losses

        def recording(batch):
            terms = original(batch)
            if strategy.phase.name == "train" and not first_terms:
                first_terms.update({k: v.detach().clone() for k, v in terms.items()})
            return terms

        strategy.step_losses = recording

    cfg = fast_config_for(tmp_path_factory.mktemp("etag"), backbone="resnet18_cifar_nf8", epochs=1, limit_train_batches=2)
    result = run(RunSpec("etag", "synthetic32-3", run=cfg, seed=0, strategy_overrides={**TINY, "generator_lr": 1e-2}),
                 callbacks=[snaps, anchor, _HandSetAuxiliaryLogits()], on_experience=between)
    assert result.status == "completed", result.error
    return snaps.at, anchor.seen, first_terms


def test_the_previous_generator_is_a_frozen_copy_of_the_last_tasks_generator(etag_run):
    at, seen, _ = etag_run
    assert seen[0] == {"exists": False}  # task 0 has no generator to anchor to
    record = seen[1]
    assert record["exists"] and not record["is_live"] and not record["shares_storage"]
    assert record["frozen"] and record["eval_mode"]
    end_of_task_0 = at[(0, "generator", "end")]["generator"]
    # G_{t-1}: the weights the generator had when task 0 ended (task 1's stage A does not train it) ...
    assert all(torch.equal(record["weights"][k], end_of_task_0[k]) for k in end_of_task_0)
    # ... kept through task 1's generator training, which did move the live generator
    assert all(torch.equal(record["weights_at_end"][k], end_of_task_0[k]) for k in end_of_task_0)
    trained = at[(1, "generator", "end")]["generator"]
    assert any(not torch.equal(trained[k], end_of_task_0[k]) for k in end_of_task_0)
    assert (2, "generator", "start") not in at  # no generator after the last task


def test_the_auxiliary_distillation_term_of_a_live_step_on_hand_set_logits(etag_run):
    _, _, terms = etag_run
    # experience 2 of synthetic32-3 (2 classes per task): K_old = 2 // 2 + 2 - 1 = 2; 4C = 24 joint labels.
    # Teacher: uniform q = 1/24. Student at temperature 3: p_0 = 23 / 46 = 1/2, p_i = 1/46 otherwise.
    kl = (1 / 24) * math.log((1 / 24) / (1 / 2)) + (23 / 24) * math.log((1 / 24) / (1 / 46))
    k_old, heads = 2, 3
    expected = k_old * heads * TAU**2 * kl  # the same for every one of the 4B rotated rows: batch mean = kl
    assert expected == pytest.approx(28.077, abs=1e-3)
    assert terms["embedding_kd"].item() == pytest.approx(expected, rel=1e-5)


def test_a_live_incremental_fit_keeps_batch_norm_statistics_and_the_first_one_updates_them(etag_run):
    at, _, _ = etag_run
    first = (at[(0, "train", "start")], at[(0, "train", "end")])
    assert not torch.equal(first[0]["bn_mean"], first[1]["bn_mean"])  # task 0 trains in train mode
    for t in (1, 2):
        start, end = at[(t, "train", "start")], at[(t, "train", "end")]
        assert torch.equal(start["bn_mean"], end["bn_mean"]) and torch.equal(start["bn_var"], end["bn_var"]), t
        assert not torch.equal(start["bn_weight"], end["bn_weight"]), t  # the affine parameters still learn
    for t in (0, 1):  # stage B: the model is frozen, statistics included
        start, end = at[(t, "generator", "start")]["backbone"], at[(t, "generator", "end")]["backbone"]
        assert all(torch.equal(start[k], end[k]) for k in start), t


# ---- the backbones eTag accepts: the pooled last stage the training reads is the inference embedding
@pytest.mark.parametrize("name, size", [("resnet18", 64), ("resnet18_cifar_nf8", 32), ("resnet10t", 64)])
def test_the_pooled_last_stage_is_the_embedding_inference_uses(name, size):
    strategy = _strategy(backbone=name).eval()
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        stages = strategy.stage_outputs(x)
        embedding = strategy.backbone(x)
        assert torch.allclose(stages[-1].mean(dim=(2, 3)), embedding, atol=1e-6)
        assert torch.allclose(strategy(x).features, embedding)
        if name == "resnet18":  # the ImageNet stem: stride-2 conv and max-pool, then 4 stages to a 2x2 map
            assert [tuple(s.shape[2:]) for s in stages] == [(16, 16), (8, 8), (4, 4), (2, 2)]
        teacher = strategy.frozen_copy()["backbone"]  # a teacher's stages take the same path
        assert torch.allclose(strategy.stage_outputs(x, teacher)[-1].mean(dim=(2, 3)), teacher(x), atol=1e-6)


def test_a_first_task_step_on_a_timm_resnet18():
    strategy = _strategy(backbone="resnet18")
    strategy.on_experience_start(create_scenario("synthetic32-3").info(0))
    strategy.phase = strategy.phases(strategy.experience)[0]
    strategy.on_train_epoch_start()
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([0, 1])
    terms = strategy.step_losses(Batch(x, y))
    assert set(terms) == {"ce", "rotation"} and all(torch.isfinite(v) for v in terms.values())


@pytest.mark.parametrize("name, called", [("resnet50", "resnet50"), ("clbench_convnet", "ConvNet"),
                                          ("clbench_vit_tiny", "VisionTransformer")])
def test_a_backbone_whose_stages_etag_cannot_read_is_refused_before_training(name, called):
    from clbench.errors import UsageError
    from clbench.registry import STRATEGIES

    with torch.device("meta"):
        backbone = build_backbone(name, in_chans=3, img_size=32)
    problem = STRATEGIES.get("etag").backbone_problem(backbone)
    assert problem is not None and "\n" not in problem
    assert "resnet18_cifar_nf8" in problem and "(resnet18, resnet34" in problem and problem.endswith(f"not {called}")
    with pytest.raises(UsageError, match="etag needs a CIFAR ResNet backbone"):
        _strategy(backbone=name)


# ---- evaluation: masked as clbench's protocol by default, all C classes scored with mask_unseen=False
@pytest.mark.parametrize("mask_unseen, row", [(True, [0.5, 0.0, 0.0]), (False, [0.0, 0.0, 0.5])])
def test_mask_unseen_decides_whether_a_class_not_seen_yet_may_win(mask_unseen, row):
    from clbench.datasets import make_loader
    from clbench.tasks.classification import evaluate

    strategy = _strategy(mask_unseen=mask_unseen)
    scenario = create_scenario("synthetic32-3")  # classes 0-1, 2-3, 4-5; 20 test images each
    strategy.on_experience_start(scenario.info(0))
    with torch.no_grad():  # seen class 0 beats seen class 1 everywhere; unseen class 5 beats them all
        strategy.head.weight.zero_()
        strategy.head.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 10.0]))
    loaders = [make_loader(d, 64, shuffle=False) for d in scenario.test_sets]
    assert all(torch.bincount(d.y).tolist() == c for d, c in zip(scenario.test_sets, ([20, 20], [0, 0, 20, 20], [0] * 4 + [20, 20])))
    assert evaluate(strategy, loaders, n_seen=len(scenario.info(0).seen_classes)) == row


# ---- the generator: reparameterised sampling, and each term of its loss on hand-set weights
def test_the_cvae_samples_z_as_mean_plus_noise_times_the_standard_deviation():
    from clbench.strategies.etag import FeatureCVAE

    cvae = FeatureCVAE(dim=8, num_classes=3, hidden=8, latent=8)
    with torch.no_grad():  # encoder: mean 50, log-variance ln 4 (std 2) everywhere; decoder: z itself
        for p in cvae.parameters():
            p.zero_()
        cvae.mean.bias.fill_(50.0)
        cvae.log_variance.bias.fill_(math.log(4.0))
        cvae.decoder[0].weight[:, :8].copy_(torch.eye(8))  # the one-hot columns stay 0
        cvae.decoder[2].weight.copy_(torch.eye(8))
        cvae.decoder[4].weight.copy_(torch.eye(8))
        f, y = torch.rand(4, 8), torch.tensor([0, 1, 2, 0])
        torch.manual_seed(7)
        out, mean, log_variance = cvae(f, y)
        torch.manual_seed(7)
        noise = torch.randn(4, 8)  # the same draw the forward made
    assert torch.equal(mean, torch.full((4, 8), 50.0)) and torch.allclose(log_variance, torch.full((4, 8), math.log(4.0)))
    assert torch.allclose(out, 50.0 + 2.0 * noise)  # all positive: the decoder's ReLUs pass z through


def _hand_set_generator(generator, mean, log_variance, output):
    """Encoder silent, the latent's mean and log-variance the constants given, the decoder's output
    the vector `output` whatever z and the label are."""
    with torch.no_grad():
        for p in generator.parameters():
            p.zero_()
        generator.mean.bias.fill_(mean)
        generator.log_variance.bias.fill_(log_variance)
        generator.decoder[4].bias.copy_(output)


def test_each_generator_loss_term_on_hand_set_weights_in_the_first_and_a_later_task():
    """Reconstruction SSE / B, the Gaussian KL / B, the classifier's CE on the reconstructions (and,
    later, on generated old-class features, weighted 1 : K_old) and 1e-3 K_old SSE to G_{t-1}."""
    from clbench.types import ExperienceInfo

    strategy = _strategy(num_classes=8)  # 4 tasks of 2 classes, so a task with K_old = 2 has a generator phase
    tasks = [ExperienceInfo(t, (2 * t, 2 * t + 1), tuple(range(2 * t + 2)), 4, 8) for t in range(4)]
    d, latent, n = strategy.backbone.num_features, strategy.cfg.latent, 5
    output = 1.0 + 0.05 * torch.arange(d, dtype=torch.float32)
    beta, gamma = 1.0, 2.0  # the classifier: constant logits, class 4 at beta, class 5 at gamma, the rest 0
    log_z = math.log(6 + math.exp(beta) + math.exp(gamma))
    # mean 0.5, variance 2: per latent dimension -(1 + ln 2 - 0.25 - 2) / 2
    kl = -0.5 * latent * (1 + math.log(2.0) - 0.25 - 2.0)
    x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))

    def generator_step(task, y):
        strategy.on_experience_start(task)
        strategy.phase = strategy.phases(task)[1]
        assert strategy.phase.name == "generator"
        strategy.on_train_epoch_start()
        _hand_set_generator(strategy.generator, 0.5, math.log(2.0), output)
        strategy.on_fit_start()
        with torch.no_grad():
            strategy.head.weight.zero_()
            strategy.head.bias.copy_(torch.tensor([0, 0, 0, 0, beta, gamma, 0, 0]))
            strategy.generator.decoder[4].bias.add_(0.5)  # G_t has moved 0.5 away from G_{t-1} in every dimension
            real = strategy.backbone(x)
            terms = strategy.generator_losses(Batch(x, torch.tensor(y)))
        strategy.on_experience_end(task, None)
        return real, terms

    real, terms = generator_step(tasks[0], [0, 1, 1, 0, 0])
    assert set(terms) == {"reconstruction", "kl", "ce"}
    assert terms["reconstruction"].item() == pytest.approx(((output + 0.5 - real) ** 2).sum().item() / n, rel=1e-5)
    assert terms["kl"].item() == pytest.approx(kl, rel=1e-5)
    assert terms["ce"].item() == pytest.approx(log_z, rel=1e-5)  # classes 0 and 1 both score 0

    strategy.on_experience_start(tasks[1])
    strategy.on_experience_end(tasks[1], None)
    real, terms = generator_step(tasks[2], [4, 4, 5, 5, 5])
    k_old = strategy.k_old(tasks[2])
    assert k_old == 2
    assert set(terms) == {"reconstruction", "kl", "ce", "consistency"}
    assert terms["reconstruction"].item() == pytest.approx(((output + 0.5 - real) ** 2).sum().item() / n, rel=1e-5)
    assert terms["kl"].item() == pytest.approx(kl, rel=1e-5)
    current = log_z - (2 * beta + 3 * gamma) / n  # old classes 0-3 all score 0: log Z each, whichever are drawn
    assert terms["ce"].item() == pytest.approx((current + k_old * log_z) / (k_old + 1), rel=1e-5)
    assert terms["consistency"].item() == pytest.approx(1e-3 * k_old * n * d * 0.5**2, rel=1e-5)


def test_k_old_rounds_down_when_the_first_task_is_no_whole_number_of_later_tasks():
    from clbench.types import ExperienceInfo

    strategy = _strategy(num_classes=9)
    strategy.first_task_classes = 5  # then tasks of 2: the 5 first classes count as 2 tasks
    exp = ExperienceInfo(1, (5, 6), tuple(range(7)), 3, 9)
    assert strategy.k_old(exp) == 2 and type(strategy.k_old(exp)) is int


def test_the_optimisers_take_the_configured_rates_weight_decay_and_parameters():
    from clbench.types import Phase

    strategy = _strategy(lr=5e-4, weight_decay=3e-4, generator_lr=2e-4)
    strategy.phase = Phase("train")
    model = strategy.configure_optimizers()["optimizer"]
    group = model.param_groups[0]
    # foreach: the multi-tensor update every clbench optimiser uses (on the CPU the same numbers; the
    # op trace the profiler counts is the one a GPU runs)
    assert (group["lr"], group["weight_decay"], group["foreach"]) == (5e-4, 3e-4, True)
    trained = [*strategy.backbone.parameters(), *strategy.branches.parameters(), *strategy.head.parameters()]
    assert [id(p) for g in model.param_groups for p in g["params"]] == [id(p) for p in trained]
    strategy.phase = Phase("generator")
    generator = strategy.configure_optimizers()
    assert generator.param_groups[0]["lr"] == 2e-4 and generator.param_groups[0]["weight_decay"] == 0
    assert [id(p) for g in generator.param_groups for p in g["params"]] == [id(p) for p in strategy.generator.parameters()]


def test_a_resumed_strategy_keeps_the_first_tasks_class_count_that_k_old_reads():
    from clbench.engine.checkpoint import load_strategy_state
    from clbench.types import ExperienceInfo

    saved = _strategy(num_classes=100)
    first = ExperienceInfo(0, tuple(range(50)), tuple(range(50)), 6, 100)
    saved.on_experience_start(first)
    saved.on_experience_end(first, None)
    resumed = _strategy(num_classes=100)
    assert resumed.first_task_classes == 0
    # what --resume loads: the state dict and the extra state, as the checkpoint stores them
    load_strategy_state(resumed, saved.state_dict(), {k: v.clone() for k, v in saved.extra_state().items()})
    assert resumed.first_task_classes == 50 and type(resumed.first_task_classes) is int
    assert resumed.k_old(ExperienceInfo(1, tuple(range(50, 60)), tuple(range(60)), 6, 100)) == 5


def test_the_runs_seed_and_add_ons_reach_the_strategy_and_see_every_task_end(task_ends_reach_add_ons):
    task_ends_reach_add_ons("etag", build_backbone("resnet18_cifar_nf8", in_chans=3, img_size=32), TINY)


def test_the_fourth_branch_runs_in_the_first_task_only():
    """It is trained in task 0 and never distilled: later steps do not spend its forward."""
    strategy = _strategy()
    calls = []
    strategy.branches[3].register_forward_hook(lambda module, args, out: calls.append(out.shape))
    scenario = create_scenario("synthetic32-3")
    data = scenario.train_sets[0]
    strategy.on_experience_start(scenario.info(0))
    strategy.phase = strategy.phases(scenario.info(0))[0]
    strategy.on_train_epoch_start()
    strategy.step_losses(Batch(data.x[:4], data.y[:4]))
    assert calls == [(16, 24)]  # the 4B rotated images, 4C joint labels
    strategy.on_experience_end(scenario.info(0), data)
    strategy.on_experience_start(scenario.info(1))
    # the teacher's copy is not run either
    strategy.teacher["branches"][3].register_forward_hook(lambda module, args, out: calls.append(out.shape))
    strategy.phase = strategy.phases(scenario.info(1))[0]
    strategy.on_train_epoch_start()
    data = scenario.train_sets[1]
    terms = strategy.step_losses(Batch(data.x[:4], data.y[:4]))
    assert set(terms) == {"cls", "embedding_kd", "embedding_l2"} and calls == [(16, 24)]


def test_steps_of_both_stages_emit_no_warning():
    import warnings

    strategy = _strategy()
    scenario = _incremental(strategy)
    data = scenario.train_sets[1]
    for phase in strategy.phases(scenario.info(1)):  # the distilling step, then the generator's
        strategy.phase = phase
        strategy.on_train_epoch_start()
        strategy.on_fit_start()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            strategy.step_losses(Batch(data.x[:4], data.y[:4]))
        assert [str(w.message) for w in caught] == [], phase.name


def test_an_incremental_steps_terms_on_hand_set_heads_with_two_old_tasks():
    """K_old sum over branches 1-3 of tau^2 KL(softmax(teacher/tau) || softmax(student/tau)) and
    K_old ||H^t - H^{t-1}|| (both times distill_weight), and the classifier's
    (CE on the batch + K_old CE on generated old-class features) / (K_old + 1)."""
    from clbench.types import ExperienceInfo

    strategy = _strategy(num_classes=8, distill_weight=0.5)
    tasks = [ExperienceInfo(t, (2 * t, 2 * t + 1), tuple(range(2 * t + 2)), 4, 8) for t in range(4)]
    for task in tasks[:2]:
        strategy.on_experience_start(task)
        strategy.on_experience_end(task, None)
    strategy.on_experience_start(tasks[2])
    k_old = strategy.k_old(tasks[2])
    assert k_old == 2
    strategy.phase = strategy.phases(tasks[2])[0]
    strategy.on_train_epoch_start()
    beta = 1.5
    with torch.no_grad():
        # 4C = 32 joint labels, constant logits: the student's softmax(./tau) is (1/2, 1/62, ...), the teacher's (5/36, 1/36, ...)
        for student, teacher in zip(strategy.branches[:3], strategy.teacher["branches"]):
            for fc, top in ((student.fc, TAU * math.log(31.0)), (teacher.fc, TAU * math.log(5.0))):
                fc.weight.zero_()
                fc.bias.zero_()
                fc.bias[0] = top
        strategy.head.weight.zero_()  # the classifier: constant logits, the new classes 4 and 5 at beta, the rest 0
        strategy.head.bias.copy_(torch.tensor([0, 0, 0, 0, beta, beta, 0, 0]))
        strategy.backbone.layer4[0].conv1.weight.mul_(1.5)  # the student has moved away from its teacher
    x, y = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2)), torch.tensor([4, 5, 5, 4])
    terms = strategy.step_losses(Batch(x, y))
    kl = (5 / 36) * math.log((5 / 36) / (1 / 2)) + (31 / 36) * math.log((1 / 36) / (1 / 62))
    assert terms["embedding_kd"].item() == pytest.approx(0.5 * k_old * 3 * TAU**2 * kl, rel=1e-5)
    x_rot = torch.cat([torch.rot90(x, r, dims=(2, 3)) for r in range(4)])
    with torch.no_grad():  # the inference embeddings of the 4B rotated images
        distance = torch.linalg.norm(strategy.backbone(x_rot) - strategy.teacher["backbone"](x_rot)).item()
    assert distance > 0 and terms["embedding_l2"].item() == pytest.approx(0.5 * k_old * distance, rel=1e-4)
    log_z = math.log(6 + 2 * math.exp(beta))  # the old classes 0-3 all score 0: CE log Z, whichever are drawn
    assert terms["cls"].item() == pytest.approx((log_z - beta + k_old * log_z) / (k_old + 1), rel=1e-5)


def test_steps_run_on_the_device_the_model_was_moved_to_with_its_draws_made_there():
    """As on an accelerator: the teacher is made on the CPU when the task starts, then the module
    moves ("meta" stands in for a GPU). Rotation labels, latents and old labels are made on the
    model's device, the teacher is brought there, and nothing is drawn from the CPU's generator."""
    strategy = _strategy()
    scenario = _incremental(strategy)
    assert next(strategy.teacher.parameters()).device.type == "cpu"
    strategy.to("meta")
    data = scenario.train_sets[1]
    x, y = data.x[:4].to("meta"), data.y[:4].to("meta")
    assert rotations(x, y)[1].device.type == "meta"
    cpu_generator = torch.get_rng_state()
    for phase in strategy.phases(scenario.info(1)):  # the distilling step, then the generator's
        strategy.phase = phase
        strategy.on_train_epoch_start()
        strategy.on_fit_start()
        terms = strategy.step_losses(Batch(x, y))
        assert {v.device.type for v in terms.values()} == {"meta"}, phase.name
    assert torch.equal(torch.get_rng_state(), cpu_generator)


def test_the_generator_trains_for_its_own_epochs_after_every_task_but_the_last():
    from clbench.types import Phase

    strategy = _strategy(generator_epochs=3)
    scenario = create_scenario("synthetic32-3")
    phases = [strategy.phases(scenario.info(t)) for t in range(3)]
    # the runner fits each phase for its own epochs, or the run's where it has none
    assert phases == [[Phase("train"), Phase("generator", epochs=3)]] * 2 + [[Phase("train")]]
    assert [p.epochs for p in phases[0]] == [None, 3]


def test_the_branches_own_freshly_initialised_copies_of_the_later_stages():
    torch.manual_seed(0)
    backbone = build_backbone("resnet18_cifar_nf8", in_chans=3, img_size=32)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    strategy = create_strategy("etag", backbone, 6, strategy_config("etag", TINY), seed=0)
    assert all(torch.equal(v, before[k]) for k, v in strategy.backbone.state_dict().items())  # building them leaves it alone
    backbone_storage = {p.data_ptr() for p in backbone.parameters()}
    stages = ("layer1", "layer2", "layer3", "layer4")
    for k, branch in enumerate(strategy.branches[:3]):
        assert not any(p.data_ptr() in backbone_storage for p in branch.parameters()), k
        assert len(branch.stages) == 3 - k
        for copy_of, original in zip(branch.stages, stages[k + 1:]):
            source = dict(getattr(backbone, original).named_parameters())
            mine = dict(copy_of.named_parameters())
            assert mine.keys() == source.keys()  # the same architecture ...
            convs = [name for name in mine if "conv" in name]
            # ... with weights of its own drawing
            assert convs and all(not torch.equal(mine[name], source[name]) for name in convs), (k, original)


def test_the_cvae_defaults_to_the_appendix_sizes():
    from clbench.strategies.etag import FeatureCVAE

    cvae = FeatureCVAE(dim=4, num_classes=3)
    assert (cvae.encoder[0].out_features, cvae.mean.out_features, cvae.log_variance.out_features) == (512, 200, 200)
    assert (cvae.decoder[0].in_features, cvae.decoder[4].in_features) == (203, 512)


def test_the_cvae_applies_a_relu_after_every_encoder_and_decoder_layer():
    from clbench.strategies.etag import FeatureCVAE

    cvae = FeatureCVAE(dim=4, num_classes=2, hidden=4, latent=4)
    encoder, decoder = ([m for m in part if isinstance(m, torch.nn.Linear)] for part in (cvae.encoder, cvae.decoder))
    with torch.no_grad():
        for p in cvae.parameters():
            p.zero_()
        for first, second in (encoder, decoder[:2]):
            first.bias.fill_(-1.0)  # a negative first layer: 0 after its ReLU
            second.weight.copy_(torch.eye(4))
            second.bias.copy_(torch.tensor([3.0, 3.0, -3.0, -3.0]))  # then (3, 3, 0, 0) after the second ReLU
        cvae.mean.weight.copy_(torch.eye(4))  # the latent mean reads the encoder's output
        decoder[2].weight.copy_(torch.diag(torch.tensor([1.0, 1.0, -1.0, 1.0])))
        decoder[2].bias.copy_(torch.tensor([0.0, -5.0, 1.0, 0.0]))  # (3, -2, 1, 0) before the last ReLU
        y = torch.tensor([0, 1, 1])
        _, mean, _ = cvae(torch.rand(3, 4), y)
        out = cvae.decode(torch.randn(3, 4), y)
    assert mean.tolist() == [[3.0, 3.0, 0.0, 0.0]] * 3
    assert out.tolist() == [[3.0, 0.0, 1.0, 0.0]] * 3


def test_zero_generator_epochs_means_no_generator_phase():
    from clbench.types import Phase

    strategy = _strategy(generator_epochs=0)
    scenario = create_scenario("synthetic32-3")
    # a phase of 0 epochs would be fitted for the run's epochs (the runner reads `phase.epochs or epochs`)
    assert [strategy.phases(scenario.info(t)) for t in range(3)] == [[Phase("train")]] * 3


def test_the_stem_kind_names_the_resnet_family_and_a_timm_resnet_without_its_pooling_is_refused():
    from clbench.registry import STRATEGIES
    from clbench.strategies.etag import _stem_kind

    with torch.device("meta"):
        cifar = build_backbone("resnet18_cifar_nf8", in_chans=3, img_size=32)
        timm = build_backbone("resnet18", in_chans=3, img_size=64)
    assert (_stem_kind(cifar), _stem_kind(timm)) == ("cifar", "timm")
    timm.global_pool = torch.nn.Identity()  # no average pooling: its pooled last stage need not be what it returns
    assert _stem_kind(timm) is None
    problem = STRATEGIES.get("etag").backbone_problem(timm)
    assert problem is not None and problem.endswith("not resnet18")


def test_a_timm_resnet_with_one_block_per_stage_gets_a_fourth_branch_of_its_last_width():
    with torch.device("meta"):
        strategy = _strategy(backbone="resnet10t")  # timm's ResNet-10-T: basic blocks, one per stage, deep stem
    b = strategy.backbone
    assert [len(stage) for stage in (b.layer1, b.layer2, b.layer3, b.layer4)] == [1, 1, 1, 1]
    fourth = strategy.branches[3]
    (extra,) = fourth.stages  # one more stage after stage 4: as many blocks, 512 wide, stride 1
    assert len(extra) == 1 and type(extra[0]) is type(b.layer4[0])
    assert (extra[0].conv1.in_channels, extra[0].conv2.out_channels, extra[0].conv1.stride) == (512, 512, (1, 1))
    assert fourth.fc.in_features == 512 and fourth.fc.out_features == 24


OUT_OF_RANGE = [("temperature", 0.0, "a positive number"), ("generator_lr", 0.0, "a positive number"),
                ("distill_weight", -0.5, "a number >= 0"), ("generator_consistency", -0.001, "a number >= 0"),
                ("generator_epochs", -1, "an integer >= 0"), ("latent", 0, "a positive integer"),
                ("hidden", 0, "a positive integer")]


@pytest.mark.parametrize("field, value, expected", [pytest.param(*case, id=case[0]) for case in OUT_OF_RANGE])
def test_a_setting_out_of_range_is_refused_with_a_message_naming_it(field, value, expected):
    from clbench.errors import UsageError

    with pytest.raises(UsageError, match=f"^{field}={value} is invalid; expected {expected}$"):
        strategy_config("etag", {field: value})


def test_the_boundary_settings_are_accepted():
    cfg = strategy_config("etag", {"distill_weight": 0.0, "generator_consistency": 0.0, "generator_epochs": 0,
                                   "latent": 1, "hidden": 1, "temperature": 1e-3, "generator_lr": 1e-6})
    assert (cfg.distill_weight, cfg.generator_consistency, cfg.generator_epochs, cfg.latent) == (0.0, 0.0, 0, 1)


def test_a_new_strategy_holds_no_teacher_no_previous_generator_and_no_first_task():
    strategy = _strategy()
    assert strategy.teacher is None and strategy.previous_generator is None
    assert strategy.first_task_classes == 0
    assert int(strategy.extra_state()["first_task_classes"]) == 0  # what a checkpoint taken before task 0 holds
