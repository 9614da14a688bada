"""FDINet (reconstruction): the method's five defining checks."""

from __future__ import annotations

import pytest
import torch
from clbench.edge.flops import measure_flops
from clbench.strategies.fdinet import FrequencyBranches

from clbench.models.backbones import CifarResNet
from clbench.models.wavelets import haar_dwt, haar_idwt


def test_branches_receive_the_low_and_detail_bands():
    net = FrequencyBranches(nf=4)
    seen = {}
    net.low.register_forward_pre_hook(lambda m, a: seen.__setitem__("low", a[0]))
    net.high.register_forward_pre_hook(lambda m, a: seen.__setitem__("high", a[0]))
    x = torch.rand(2, 3, 32, 32)
    assert net(x).shape == (2, net.num_features) and net.num_features == 2 * 8 * 4
    ll, details = haar_dwt(x)
    assert seen["low"].shape == (2, 3, 16, 16) and torch.equal(seen["low"], ll)
    assert seen["high"].shape == (2, 9, 16, 16) and torch.equal(seen["high"], details)
    assert (haar_idwt(seen["low"], seen["high"]) - x).abs().max() < 1e-5


def test_backbone_parameters_are_a_fifth_of_resnet18():
    ratio = sum(p.numel() for p in FrequencyBranches(21).parameters()) / sum(p.numel() for p in CifarResNet(64).parameters())
    assert ratio == pytest.approx(0.22, abs=0.02)
    default = FrequencyBranches()  # the reconstruction's width is the default
    assert default.low.nf == 21 and default.high.nf == 21 and default.to_low is None


def test_no_parameter_is_shared_between_branches():
    net = FrequencyBranches(nf=4)
    assert not {id(p) for p in net.low.parameters()} & {id(p) for p in net.high.parameters()}
    ll, _ = haar_dwt(torch.rand(2, 3, 32, 32))
    net.low(ll).sum().backward()
    assert all(p.grad is None for p in net.high.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.low.parameters())


def test_mutual_integration_links_the_branches_after_every_stage():
    torch.manual_seed(0)
    late, mutual = FrequencyBranches(nf=4), FrequencyBranches(nf=4, mutual=True)
    extra = sum(p.numel() for p in mutual.parameters()) - sum(p.numel() for p in late.parameters())
    assert extra == 2 * sum((4 * 2**i) ** 2 for i in range(4))  # one bias-free 1x1 conv each way per stage
    mutual.load_state_dict(late.state_dict(), strict=False)
    x = torch.rand(2, 3, 32, 32)
    late.eval(), mutual.eval()
    for conv in [*mutual.to_low, *mutual.to_high]:
        torch.nn.init.zeros_(conv.weight)
    assert torch.allclose(mutual(x), late(x), atol=1e-6)  # zero links: exactly late fusion
    for conv in [*mutual.to_low, *mutual.to_high]:
        torch.nn.init.normal_(conv.weight, std=0.1)
    # the low branch's half of the features now depends on the high branch's parameters
    mutual(x)[:, : mutual.low.num_features].sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in mutual.high.parameters())


def test_fdinet_integration_is_checked(scenario, build_strategy):
    from clbench.errors import UsageError

    with pytest.raises(UsageError, match="integration='early' is invalid"):
        build_strategy("der_pp_fdinet", scenario, integration="early", nf=4)
    assert build_strategy("der_pp_fdinet", scenario, integration="mutual", nf=4).backbone.to_low is not None


def _step_flops(name, scenario, build_strategy, batch_of, backbone, **cfg):
    torch.manual_seed(0)
    s = build_strategy(name, scenario, backbone=backbone, buffer_size=8, replay_batch_size=2, **cfg)
    s.on_experience_start(scenario.info(0))
    warm = batch_of(scenario.train_sets[0], 8)
    with torch.no_grad():
        s.step_losses(warm)
    s.on_train_batch_end(None, warm, 0)
    batch = batch_of(scenario.train_sets[0], 2)
    return measure_flops(lambda: sum(s.step_losses(batch).values()).backward())


def test_fdinet_er_step_is_under_a_tenth_of_er_and_below_clfd_er(scenario, build_strategy, batch_of):
    er = _step_flops("er", scenario, build_strategy, batch_of, CifarResNet(64))
    clfd = _step_flops("er_clfd", scenario, build_strategy, batch_of, CifarResNet(64))
    fdi = _step_flops("fdinet", scenario, build_strategy, batch_of, CifarResNet(8), nf=21)
    assert fdi / er < 0.1
    assert fdi < clfd


def test_changing_the_base_changes_only_the_losses(scenario, build_strategy):
    a = build_strategy("fdinet", scenario, nf=4, buffer_size=10)
    b = build_strategy("der_pp_fdinet", scenario, nf=4, buffer_size=10)
    shapes = lambda s: {k: v.shape for k, v in s.state_dict().items()}  # noqa: E731
    assert shapes(a) == shapes(b)
    assert type(a.buffer) is type(b.buffer) and a.buffer.capacity == b.buffer.capacity
    assert isinstance(a.backbone, FrequencyBranches) and isinstance(b.backbone, FrequencyBranches)


def test_mutual_links_add_each_branch_to_the_other_from_the_stage_outputs(scenario, build_strategy, batch_of):
    """x_L <- x_L + P_s(x_H), x_H <- x_H + Q_s(x_L), both from stage s's outputs, written out by hand."""
    s = build_strategy("fdinet", scenario, integration="mutual", nf=4)
    net = s.backbone
    torch.manual_seed(1)
    for conv in [*net.to_low, *net.to_high]:
        torch.nn.init.normal_(conv.weight, std=0.3)
    s.eval()
    x = batch_of(scenario.train_sets[0], 4).x
    ll, details = haar_dwt(x)
    with torch.no_grad():
        low = torch.relu(net.low.bn1(net.low.conv1(ll)))
        high = torch.relu(net.high.bn1(net.high.conv1(details)))
        for i, name in enumerate(("layer1", "layer2", "layer3", "layer4")):
            out_low, out_high = getattr(net.low, name)(low), getattr(net.high, name)(high)
            low = out_low + torch.nn.functional.conv2d(out_high, net.to_low[i].weight)
            high = out_high + torch.nn.functional.conv2d(out_low, net.to_high[i].weight)
        expected = torch.cat([low.mean(dim=(2, 3)), high.mean(dim=(2, 3))], dim=1)
        features = s(x).features
    assert features.shape == expected.shape
    assert torch.allclose(features, expected, atol=1e-5)


def test_a_branch_width_below_one_is_refused(scenario, build_strategy):
    from clbench.errors import UsageError

    with pytest.raises(UsageError, match="nf=0 is invalid"):
        build_strategy("fdinet", scenario, nf=0)


def test_the_run_s_width_classes_and_seed_reach_the_strategy(scenario, build_strategy, batch_of):
    s = build_strategy("fdinet", scenario, nf=5, seed=7)
    assert s.backbone.low.nf == 5 and s.backbone.high.nf == 5 and s.backbone.num_features == 2 * 8 * 5
    assert s.num_classes == scenario.num_classes and s.seed == 7
    s.on_experience_start(scenario.info(0))
    assert s(batch_of(scenario.train_sets[0], 2).x).features.shape == (2, 80)


def test_without_a_config_the_defaults_are_used():
    from clbench.strategies.fdinet import FDINet

    s = FDINet(CifarResNet(4), 6)
    assert s.backbone.low.nf == 21 and s.backbone.to_low is None


def test_the_branches_read_as_many_channels_as_the_images_have(scenario, build_strategy):
    """The channel count comes from the run's backbone: its first convolution, else its in_chans."""
    grey = build_strategy("fdinet", scenario, backbone=CifarResNet(4, in_chans=1), nf=4)
    assert grey.backbone.low.conv1.in_channels == 1 and grey.backbone.high.conv1.in_channels == 3
    assert grey(torch.rand(2, 1, 32, 32)).logits.shape[0] == 2
    # a convolutional backbone without an in_chans attribute: its first convolution decides
    conv = build_strategy("fdinet", scenario, backbone=torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3)), nf=4)
    assert conv.backbone.low.conv1.in_channels == 1
    # no convolution at all (an MLP): its in_chans decides
    from clbench.models.backbones import build_backbone

    mlp = build_strategy("fdinet", scenario, backbone=build_backbone("clbench_mlp_tiny", in_chans=2, img_size=8), nf=4)
    assert mlp.backbone.low.conv1.in_channels == 2 and mlp.backbone.high.conv1.in_channels == 6
    # neither (a bare linear model): RGB
    linear = build_strategy("fdinet", scenario, backbone=torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4)), nf=4)
    assert linear.backbone.low.conv1.in_channels == 3 and linear.backbone.high.conv1.in_channels == 9
