"""LoRD: the card's six faithfulness checks, on the card's tiny configuration (5 tasks, 32x32, reduced widths)."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from clbench.edge.flops import Counter
from clbench.scenarios.base import class_incremental_from_tensors
from clbench.strategies.lord import (
    Arch,
    arch_params,
    elastic_features,
    reorder_inner_channels,
    student_widths,
    teacher_forward,
)

from clbench.config import RunConfig
from clbench.engine.data import make_loader
from clbench.engine.runner import make_trainer
from clbench.models.backbones import CifarResNet
from clbench.types import Phase


@pytest.fixture(scope="module")
def five_tasks():
    """S-CIFAR-10-like: 5 tasks x 2 classes of smooth 3x32x32 patterns, 24 train / 8 test per class."""
    g = torch.Generator().manual_seed(0)
    means = torch.nn.functional.interpolate(torch.randn(10, 3, 4, 4, generator=g), size=(32, 32), mode="bilinear") * 2

    def draw(n):
        y = torch.arange(10).repeat_interleave(n)
        return means[y] + 0.8 * torch.randn((len(y), 3, 32, 32), generator=g), y

    return class_incremental_from_tensors("five", draw(24), draw(8), increments=[2] * 5, class_order=list(range(10)),
                                          default_backbone="resnet18_cifar_nf8")


def lord(scenario, build_strategy, nf=8, **cfg):
    torch.manual_seed(0)
    cfg = {"buffer_size": 20, "replay_batch_size": 8, "search_samples": 20, "search_noise": 4, **cfg}
    return build_strategy("lord", scenario, backbone=CifarResNet(nf), **cfg)


class _StepFlops(pl.Callback):
    def __init__(self):
        self.total = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.counter = Counter().start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.counter.stop()
        self.total += self.counter.total


def train_stream(strategy, scenario, batches=2):
    """The runner's experience loop with a FLOP count per experience (one epoch, `batches` batches each)."""
    run = RunConfig(epochs=1, batch_size=8, accelerator="cpu", limit_train_batches=batches, progress=False)
    per_task = []
    for i in range(scenario.num_experiences):
        info = scenario.info(i)
        strategy.on_experience_start(info)
        flops = _StepFlops()
        loader = make_loader(strategy.training_data(info, scenario.train_sets[i]), run.batch_size, shuffle=True, seed=i)
        make_trainer(run, 1, [flops]).fit(strategy, train_dataloaders=loader)
        strategy.phase = Phase()
        strategy.on_experience_end(info, scenario.train_sets[i])
        per_task.append(flops.total)
    return per_task


# ---------------------------------------------------------------- check 1
def test_width_schedule_and_task_zero_size():
    assert student_widths(5) == [0.4, 0.7, 0.9, 1.0, 1.0]
    assert student_widths(10) == [0.2, 0.35, 0.5, 0.65, 0.75, 0.8, 0.85, 0.9, 1.0, 1.0]
    net = CifarResNet(64)
    fraction = arch_params(net, Arch.uniform(net, 0.4, 0.4), 10) / sum(p.numel() for p in CifarResNet(64, num_classes=10).parameters())
    assert fraction == pytest.approx(0.066, abs=0.01)


# ---------------------------------------------------------------- check 2
def test_task_zero_gradient_is_zero_outside_the_active_prefix(five_tasks, build_strategy, batch_of):
    s = lord(five_tasks, build_strategy, nf=16)
    s.on_experience_start(five_tasks.info(0))
    arch = s.student_arch()
    assert arch.stages == (8, 16, 24, 48)  # make8 of 6.4, 12.8, 25.6, 51.2: nearest multiple of 8, at least 8
    sum(s.step_losses(batch_of(five_tasks.train_sets[0], 8)).values()).backward()
    from clbench.strategies.lord import _active

    for module, cout, cin in _active(s.backbone, arch):
        grad = module.weight.grad
        inside = grad[:cout, :cin] if cin is not None else grad[:cout]
        outside = grad.clone()
        if cin is not None:
            outside[:cout, :cin] = 0
        else:
            outside[:cout] = 0
        assert torch.equal(outside, torch.zeros_like(outside)), module
        assert inside.abs().sum() > 0
    assert s.head.fc.weight.grad[:, arch.stages[-1]:].abs().sum() == 0


# ---------------------------------------------------------------- check 3
def test_reordering_keeps_the_full_network_and_changes_narrow_ones():
    torch.manual_seed(0)
    net = CifarResNet(16)
    for m in net.modules():  # non-trivial BN statistics, so the permutation of running stats matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0), m.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(4, 3, 32, 32)
    full, narrow = Arch.full(net), Arch.uniform(net, 0.5, 0.5)
    with torch.no_grad():
        before_full, before_narrow = elastic_features(net, full, x, "eval"), elastic_features(net, narrow, x, "eval")
        reorder_inner_channels(net)
        after_full, after_narrow = elastic_features(net, full, x, "eval"), elastic_features(net, narrow, x, "eval")
    assert (before_full - after_full).abs().max() < 1e-5
    assert (before_narrow - after_narrow).abs().max() > 1e-4


# ---------------------------------------------------------------- checks 4 and 6 (one stream)
@pytest.fixture(scope="module")
def streams(five_tasks, build_strategy):
    # nf=16 (the card's base widths / 4): at nf=8 rounding to multiples of 8 keeps early students almost full width
    s = lord(five_tasks, build_strategy, nf=16, search_samples=10, search_noise=2)
    teachers = []
    original = type(s).choose_teacher

    def recording(self, exp):
        student = arch_params(self.backbone, self.student_arch(), self.head.out_features)
        original(self, exp)
        teachers.append((student, self.kappa, self.teacher))

    type(s).choose_teacher = recording
    try:
        lord_flops = train_stream(s, five_tasks, batches=4)
    finally:
        type(s).choose_teacher = original
    torch.manual_seed(0)
    d = build_strategy("der_pp", five_tasks, backbone=CifarResNet(16), buffer_size=20, replay_batch_size=8)
    der_flops = train_stream(d, five_tasks, batches=4)
    return {"lord": s, "lord_flops": lord_flops, "der_flops": der_flops, "teachers": teachers}


def test_teacher_is_small_frozen_and_never_wider_than_the_previous_student(streams, five_tasks, batch_of):
    s = streams["lord"]
    full = arch_params(s.backbone, Arch.full(s.backbone), s.head.out_features)
    assert len(streams["teachers"]) == 4
    for student_params, kappa, teacher in streams["teachers"]:
        assert kappa is not None
        params = sum(p.numel() for p in teacher.parameters())
        assert params == arch_params(s.backbone, kappa, s.head.out_features)
        assert params < 0.95 * full and params <= student_params
    x = batch_of(five_tasks.train_sets[4], 8).x
    before = teacher_forward(s.teacher, x)
    opt = torch.optim.SGD(s.parameters(), lr=0.1)
    sum(s.step_losses(batch_of(five_tasks.train_sets[4], 8)).values()).backward()
    opt.step()
    assert torch.equal(teacher_forward(s.teacher, x), before)
    assert not any(p.requires_grad for p in s.teacher.parameters())


def test_total_training_flops_below_der_pp_and_growing_per_task(streams):
    lord_flops, der_flops = streams["lord_flops"], streams["der_flops"]
    total = sum(lord_flops) + sum(streams["lord"].search_flops)
    assert total < sum(der_flops)
    assert all(a <= b for a, b in zip(lord_flops, lord_flops[1:])), lord_flops


# ---------------------------------------------------------------- check 5
def test_insertion_rate_is_exp_minus_075_rho(five_tasks, build_strategy):
    s = lord(five_tasks, build_strategy)
    s.teacher_rho = 0.5
    rate = sum(s.should_store() for _ in range(10_000)) / 10_000
    assert rate == pytest.approx(math.exp(-0.375), abs=0.02)
