"""TUNA-family mechanics: CosFace-form loss, class Gaussians, alignment labels, eval_mode, cosine head."""

import math
import warnings

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


# --------------------------------------------------------------------------- growable heads (clbench.models.heads)
def _linear_head(bias: bool = True):
    from clbench.models.heads import IncrementalLinear

    head = IncrementalLinear(3, 2, bias=bias)
    with torch.no_grad():
        head.fc.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 1.0]]))
        if bias:
            head.fc.bias.copy_(torch.tensor([0.5, -1.0]))
    return head


def test_linear_head_computes_wx_plus_b():
    head = _linear_head()
    x = torch.tensor([[1.0, 0.0, 2.0]])
    # row 0: 1 + 0 + 6 + 0.5 = 7.5; row 1: 0 + 0 + 2 - 1 = 1
    assert torch.allclose(head(x), torch.tensor([[7.5, 1.0]]))
    assert head.in_features == 3 and head.out_features == 2 and head.bias is True


def test_linear_head_starts_empty_without_warning_and_clamps_negative_widths():
    from clbench.models.heads import IncrementalLinear

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        empty = IncrementalLinear(3)
        negative = IncrementalLinear(3, -2)
    assert not [w for w in caught if issubclass(w.category, UserWarning)], [str(w.message) for w in caught]
    assert empty.out_features == 0 and negative.out_features == 0
    assert empty.fc.weight.shape == (0, 3) and empty.fc.bias.shape == (0,)
    assert IncrementalLinear(3, 2, bias=False).fc.bias is None


def test_linear_head_grows_keeping_old_rows_and_adding_new_ones():
    head = _linear_head()
    old_weight, old_bias = head.fc.weight.detach().clone(), head.fc.bias.detach().clone()
    assert head.grow(4) is True
    assert head.out_features == 4 and head.fc.weight.shape == (4, 3) and head.fc.bias.shape == (4,)
    assert torch.equal(head.fc.weight[:2].detach(), old_weight) and torch.equal(head.fc.bias[:2].detach(), old_bias)
    x = torch.tensor([[1.0, 0.0, 2.0]])
    assert torch.allclose(head(x)[:, :2], torch.tensor([[7.5, 1.0]]))
    # the new rows are nn.Linear's fresh initialisation, not zeros or copies
    assert head.fc.weight[2:].abs().sum() > 0 and not torch.equal(head.fc.weight[2], head.fc.weight[3])


def test_linear_head_does_not_grow_to_the_same_or_a_smaller_width():
    head = _linear_head()
    fc = head.fc
    assert head.grow(2) is False and head.fc is fc
    assert head.grow(1) is False and head.fc is fc and head.out_features == 2


def test_linear_head_grows_without_bias_and_keeps_dtype_and_device():
    head = _linear_head(bias=False)
    assert head.grow(5) is True
    assert head.fc.bias is None and [n for n, _ in head.named_parameters()] == ["fc.weight"]
    assert torch.equal(head.fc.weight[:2].detach(), torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 1.0]]))
    double = _linear_head().double()
    double.grow(3)
    assert double.fc.weight.dtype == torch.float64 and double.fc.bias.dtype == torch.float64
    meta = _linear_head().to("meta")
    meta.grow(3)
    assert meta.fc.weight.device.type == "meta" and meta.fc.bias.device.type == "meta"


def test_linear_head_resizes_to_exactly_the_width_asked():
    head = _linear_head().double()
    fc = head.fc
    head.resize(2)
    assert head.fc is fc  # same width: the parameters are kept
    head.resize(5)
    assert head.fc is not fc and head.out_features == 5
    assert head.fc.weight.shape == (5, 3) and head.fc.bias.shape == (5,) and head.fc.weight.dtype == torch.float64
    saved = {"fc.weight": torch.ones(1, 3, dtype=torch.float64), "fc.bias": torch.zeros(1, dtype=torch.float64)}
    head.resize(1)  # narrower too: e.g. to receive a saved state of that width
    head.load_state_dict(saved)
    assert torch.allclose(head(torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)), torch.tensor([[6.0]], dtype=torch.float64))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        head.resize(0)
    assert head.out_features == 0 and not [w for w in caught if issubclass(w.category, UserWarning)]
    unbiased = _linear_head(bias=False)
    unbiased.resize(4)
    assert unbiased.fc.bias is None and unbiased.fc.weight.shape == (4, 3)
    meta = _linear_head().to("meta")
    meta.resize(3)
    assert meta.fc.weight.device.type == "meta"


def test_cosine_head_scales_the_cosines_by_a_learnable_scale():
    head = CosineLinear(3, 2, scale=2.5)
    with torch.no_grad():
        head.fc.weight.copy_(torch.tensor([[2.0, 0.0, 0.0], [1.0, 1.0, 0.0]]))
    # neither the features nor the weights are unit vectors, and each row is normalised on its own
    x = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.5, 0.0]])
    out = head(x)
    # cosines: row 0 (1, 1/sqrt 2), row 1 (0, 1/sqrt 2); times the scale 2.5
    assert torch.allclose(out, torch.tensor([[2.5, 2.5 / math.sqrt(2)], [0.0, 2.5 / math.sqrt(2)]]))
    out.sum().backward()  # d(sum)/d(scale) = the sum of the cosines = 1 + 2/sqrt 2
    assert head.scale.grad is not None and head.scale.grad.item() == pytest.approx(1 + math.sqrt(2), rel=1e-6)
    assert head.fc.weight.grad is not None


def test_cosine_head_defaults():
    head = CosineLinear(4)
    assert head.out_features == 0 and head.fc.bias is None and head.bias is False
    assert isinstance(head.scale, nn.Parameter) and head.scale.item() == 16.0 and head.scale.dtype == torch.float32
    assert {n for n, _ in head.named_parameters()} == {"fc.weight", "scale"}
    assert CosineLinear(4, 3, scale=4).scale.item() == 4.0  # an int scale becomes a float parameter
    head.grow(2)
    assert head.fc.bias is None and head(torch.ones(1, 4)).shape == (1, 2)
