"""TUNA-family mechanics: CosFace-form loss, class Gaussians, alignment labels, eval_mode, cosine head."""

import math

import pytest
import torch
from clbench.strategies._ptm import alignment_labels
from torch import nn

from clbench.models.freeze import eval_mode
from clbench.models.heads import CosineLinear
from clbench.models.prototypes import COVARIANCE_RIDGE, ClassGaussians, cosface_loss


def test_cosface_loss_uses_only_the_given_classes_and_subtracts_the_margin():
    logits = torch.tensor([[0.5, 0.2, 0.9], [0.1, 0.7, 0.3]])
    y = torch.tensor([2, 1])
    loss = cosface_loss(logits, y, classes=(1, 2), scale=20.0, margin=0.3)
    # sample 0: -log(e^{20(0.9-0.3)} / (e^{12} + e^{20*0.2})) = log(1 + e^{-8}); class 0 is left out
    # sample 1: -log(e^{20(0.7-0.3)} / (e^{8} + e^{20*0.3})) = log(1 + e^{-2})
    assert loss.item() == pytest.approx((math.log1p(math.exp(-8)) + math.log1p(math.exp(-2))) / 2, rel=1e-6)
    plain = cosface_loss(logits, y, classes=(0, 1, 2), scale=1.0)
    assert plain.item() == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item(), rel=1e-6)


def test_class_gaussians_measure_mean_and_unbiased_covariance_and_sample_them():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(50, 2, generator=g) @ torch.tensor([[2.0, 0.0], [1.0, 0.5]]) + torch.tensor([3.0, -1.0])
    b = torch.randn(30, 2, generator=g)
    gaussians = ClassGaussians(num_classes=4, dim=2)
    gaussians.add(torch.cat([a[:20], b[:10]]), torch.tensor([1] * 20 + [3] * 10))  # two batches, mixed
    gaussians.add(torch.cat([a[20:], b[10:]]), torch.tensor([1] * 30 + [3] * 20))
    gaussians.finish()
    assert gaussians.measured.tolist() == [False, True, False, True]
    for c, x in ((1, a), (3, b)):
        assert torch.allclose(gaussians.mean[c], x.mean(0), atol=1e-6)
        assert torch.allclose(gaussians.covariance[c], torch.cov(x.T) + COVARIANCE_RIDGE * torch.eye(2), atol=1e-5)
    gaussians.prepare_sampling()
    labels = torch.full((40_000,), 1)
    draws = gaussians.sample(labels, torch.Generator().manual_seed(1))
    assert torch.allclose(draws.mean(0), gaussians.mean[1], atol=0.05)
    assert torch.allclose(torch.cov(draws.T), gaussians.covariance[1], atol=0.06)
    again = gaussians.sample(labels, torch.Generator().manual_seed(1))
    assert torch.equal(again, draws)  # seeded


def test_alignment_labels_are_class_balanced():
    labels = alignment_labels((0, 1, 4), per_class=3)
    assert labels.y.tolist() == [0, 0, 0, 1, 1, 1, 4, 4, 4] and labels.x.shape == (9, 1)


def test_eval_mode_gives_every_submodule_its_mode_back():
    net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.Sequential(nn.Dropout(0.1)))
    net.train()
    net[2].eval()  # a mixed state, as Lightning keeps between fits
    with eval_mode(net):
        assert not any(m.training for m in net.modules())
    assert [m.training for m in net.modules()] == [True, True, True, False, False]


def test_cosine_head_without_scale_returns_cosines_and_grows():
    head = CosineLinear(3, 2, scale=None)
    x = torch.tensor([[1.0, 0.0, 0.0]])
    with torch.no_grad():
        head.fc.weight.copy_(torch.tensor([[2.0, 0.0, 0.0], [1.0, 1.0, 0.0]]))
    assert torch.allclose(head(x), torch.tensor([[1.0, 1 / math.sqrt(2)]]))
    assert head.scale is None and [n for n, _ in head.named_parameters()] == ["fc.weight"]
    head.grow(4)
    assert head(x).shape == (1, 4) and torch.allclose(head(x)[:, :2], torch.tensor([[1.0, 1 / math.sqrt(2)]]))


@pytest.mark.parametrize("name", ["tuna", "daf", "saef", "sgds"])
def test_tuna_family_paper_settings_follow_tunas_recipe(name):
    from clbench.engine.runner import strategy_config
    from clbench.registry import STRATEGIES

    settings = STRATEGIES.get(name).PAPER_SETTINGS
    assert set(settings) == {"cifar100-20", "imagenet-r-10"}
    for scenario, values in settings.items():
        assert values["align_per_class"] == 5 * values["batch_size"]  # TUNA: 5 x batch samples per class
        cfg = strategy_config(name, paper_settings_for=scenario)
        assert cfg.align_lr == 0.005 and cfg.lr == {"cifar100-20": 0.01, "imagenet-r-10": 0.02}[scenario]
