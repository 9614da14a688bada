"""eTag: the card's faithfulness checks (nothing but model and generator between tasks, rotation
labels, parameter counts, frozen batch-norm statistics, the batch L2 term, the anchored generator)."""

from __future__ import annotations

import copy

import pytest
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
        assert run_values == {"batch_size": 128, "epochs": epochs} and strategy_values == {}
    cfg = cls.Config()  # the rest of the recipe is the default
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.lr_schedule, cfg.lr_step_epochs) == ("adam", 1e-3, 2e-4, "step", 30)
