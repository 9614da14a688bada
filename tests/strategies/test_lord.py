"""LoRD: six faithfulness checks, on a tiny configuration (5 tasks, 32x32, reduced widths)."""

from __future__ import annotations

import copy
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
from clbench.datasets import make_loader
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
    # nf=16 (the paper's base widths / 4): at nf=8 rounding to multiples of 8 keeps early students almost full width
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


# ---------------------------------------------------------------- a real run: re-ordering, search, distillation, insertion
def prefix_net(net: CifarResNet, arch: Arch) -> CifarResNet:
    """A copy of `net` cut to the first channels of `arch` (written here, independently of the method):
    the stem and each stage's outputs to arch.stages, each block's inner channels to arch.inner."""
    sub = copy.deepcopy(net)
    def cut(m, out, inp=None):
        m.weight = torch.nn.Parameter(m.weight[:out] if inp is None else m.weight[:out, :inp])

    def cut_bn(bn, c):
        cut(bn, c), setattr(bn, "bias", torch.nn.Parameter(bn.bias[:c]))
        bn.running_mean, bn.running_var = bn.running_mean[:c].clone(), bn.running_var[:c].clone()

    cut(sub.conv1, arch.stages[0]), cut_bn(sub.bn1, arch.stages[0])
    cin, k = arch.stages[0], 0
    for s, layer in enumerate([sub.layer1, sub.layer2, sub.layer3, sub.layer4]):
        for block in layer:
            mid, cout = arch.inner[k], arch.stages[s]
            cut(block.conv1, mid, cin), cut_bn(block.bn1, mid), cut(block.conv2, cout, mid), cut_bn(block.bn2, cout)
            if len(block.shortcut):
                cut(block.shortcut[0], cout, cin), cut_bn(block.shortcut[1], cout)
            cin, k = cout, k + 1
    return sub


def prefix_logits(net: CifarResNet, fc: torch.nn.Linear, arch: Arch, x: torch.Tensor) -> torch.Tensor:
    """Logits of the prefix sub-network with batch statistics in BatchNorm (as the search and the teacher use)."""
    sub = prefix_net(net, arch).train()
    with torch.no_grad():
        h = sub(x)
        return torch.nn.functional.linear(h, fc.weight[:, : h.shape[1]], fc.bias)


def sorted_by_importance(net: CifarResNet) -> bool:
    """Every block's inner channels in descending L1 norm of the conv2 weights that read them."""
    blocks = [b for layer in (net.layer1, net.layer2, net.layer3, net.layer4) for b in layer]
    return all(bool((b.conv2.weight.abs().sum(dim=(0, 2, 3)).diff() <= 0).all()) for b in blocks)


@pytest.fixture(scope="module")
def lord_run(tmp_path_factory):
    """synthetic32-3 through the runner: a CIFAR ResNet-18 at nf=16, widths 0.1..1.0 with r = 4, so the
    stages are 4, 6, 6 (student widths 0.4, 0.6, 0.6) and tasks 1 and 2 search a teacher. Spies on the
    strategy record what the search scores and what every step returns."""
    from clbench.engine.runner import run

    seen = {"after": {}, "start": {}, "steps": [], "searched": []}

    def spy(strategy):
        logits_at, step_losses = strategy.logits_at, strategy.step_losses

        def recording_logits_at(arch, x, bn):
            out = logits_at(arch, x, bn=bn)
            seen["searched"].append((arch, out.detach().clone()))
            return out

        def recording_step_losses(batch):
            losses = step_losses(batch)
            start = seen["start"].get(strategy.experience.index)
            if start is not None and start["kappa"] is not None:
                sub = prefix_logits(strategy.backbone, strategy.head.fc, start["kappa"], batch.x)
                target = prefix_logits(start["backbone"], start["fc"], start["kappa"], batch.x)
                expected = 0.05 * float(((sub - target) ** 2).mean())
                seen["steps"].append((strategy.experience.index, losses.get("distill"), expected))
            return losses

        strategy.logits_at, strategy.step_losses = recording_logits_at, recording_step_losses

    def after(i, result, strategy):
        seen["after"][i] = {"student": strategy.student_arch(), "width": strategy.report()["student_width"]}
        if i == 0:
            spy(strategy)
        seen["after"][i]["backbone"] = copy.deepcopy(strategy.backbone)  # as the next task's start finds it
        seen["after"][i]["state"] = snapshot(strategy)
        seen["searched"].clear()  # what follows, up to the next fit, is the next task's search
        seen["strategy"] = strategy

    class AtFitStart(pl.Callback):
        def on_fit_start(self, trainer, s):
            seen["start"][s.experience.index] = {
                "backbone": copy.deepcopy(s.backbone), "fc": copy.deepcopy(s.head.fc), "kappa": s.kappa,
                "kappa_index": s.kappa_index, "teacher": s.teacher, "rho": s.teacher_rho,
                "searched": list(seen["searched"])}

    result = run(run_spec(tmp_path_factory.mktemp("lord")), callbacks=[AtFitStart()], on_experience=after)
    assert result.status == "completed", result.error
    seen["result"] = result
    return seen


RUN_OVERRIDES = {"nf": 16, "widths": tuple(round(0.1 * i, 2) for i in range(1, 11)), "schedule_r": 4.0,
                 "buffer_size": 20, "replay_batch_size": 8, "search_samples": 12, "search_noise": 4}


def run_spec(out, resume=False, checkpoint=False):
    """The runs of this file: synthetic32-3, one epoch of two batches per task, `RUN_OVERRIDES`."""
    from clbench.engine.runner import RunSpec

    cfg = RunConfig(epochs=1, batch_size=16, eval_batch_size=256, accelerator="cpu", limit_train_batches=2, progress=False,
                    checkpoint=checkpoint, output_dir=str(out))
    return RunSpec("lord", "synthetic32-3", run=cfg, seed=0, resume=resume, strategy_overrides=RUN_OVERRIDES)


def snapshot(strategy) -> dict:
    """Copies of everything a LoRD strategy carries from one task to the next."""
    return {"model": {k: v.detach().clone() for k, v in strategy.state_dict().items()},
            "extra": {k: v.detach().clone() for k, v in strategy.extra_state().items()},
            "report": copy.deepcopy(strategy.report())}


def test_a_run_widens_the_student_on_the_schedule(lord_run):
    # r = 4, T = 3: increments round(2 (1 + cos(pi t / 2))) = 4, 2, 0 -> stages 4, 6, 6
    assert [lord_run["after"][i]["width"] for i in range(3)] == [0.4, 0.6, 0.6]


def test_channels_are_reordered_by_importance_before_the_teacher_search(lord_run, scenario):
    """Through the run: task 1's start sorts every block's inner channels by L1 importance,
    the full network computing the same function; the teacher is cut from the re-ordered network."""
    before, after = lord_run["after"][0]["backbone"], lord_run["start"][1]["backbone"]
    assert not sorted_by_importance(before) and sorted_by_importance(after)
    x = scenario.test_sets[0].x[:8]
    with torch.no_grad():
        assert (before.eval()(x) - after.eval()(x)).abs().max() < 1e-5
    start = lord_run["start"][1]
    expected = prefix_logits(after, start["fc"], start["kappa"], x)
    assert torch.allclose(teacher_forward(start["teacher"], x), expected, atol=1e-5)


def test_the_teacher_minimises_mse_times_exp_minus_rho_among_the_searched(lord_run):
    """Task 1's search: the first forward is the reference (the task-0 student, stage 4), then every
    sampled sub-network of the reached stage; the chosen teacher has the lowest MSE x exp(-rho), rho its
    share of the full network's parameters, among those under 0.95 of the full size (scored here)."""
    s, start = lord_run["strategy"], lord_run["start"][1]
    (reference_arch, reference), *candidates = start["searched"]
    student = lord_run["after"][0]["student"]
    assert reference_arch == student
    assert candidates and all(max(a.stages[i] - student.stages[i] for i in range(4)) <= 0
                              and max(e - f for e, f in zip(a.inner, student.inner)) <= 0 for a, _ in candidates)
    full = sum(p.numel() for p in s.backbone.parameters()) + sum(p.numel() for p in s.head.parameters())
    assert full == arch_params(s.backbone, Arch.full(s.backbone), s.head.out_features)

    def score(out, arch, sign):
        rho = arch_params(s.backbone, arch, s.head.out_features) / full
        return float(((out - reference) ** 2).mean()) * math.exp(sign * rho)

    best = min(candidates, key=lambda c: score(c[1], c[0], -1))[0]
    assert start["kappa"] == best
    assert start["rho"] == pytest.approx(sum(p.numel() for p in start["teacher"].parameters()) / full)


def test_among_equally_close_sub_networks_the_search_takes_the_largest(five_tasks, build_strategy, batch_of):
    """The size factor exp(-rho) on its own: with the network's outputs replaced so that every sampled
    sub-network is equally far (MSE 1) from the reference, task 1's start must pick the sampled one
    with the most parameters under the 0.95 cap (exp(+rho) would pick the fewest)."""
    s = lord(five_tasks, build_strategy, nf=16, search_samples=30)
    s.on_experience_start(five_tasks.info(0))
    sum(s.step_losses(batch_of(five_tasks.train_sets[0], 8)).values()).backward()  # a task-0 step
    s.on_experience_end(five_tasks.info(0), five_tasks.train_sets[0])
    calls = []

    def equally_far(arch, x, bn):
        calls.append(arch)
        return torch.zeros(len(x), s.head.out_features) + (len(calls) > 1)  # the reference, then 1 everywhere

    s.logits_at = equally_far
    s.on_experience_start(five_tasks.info(1))
    full = sum(p.numel() for p in s.backbone.parameters()) + sum(p.numel() for p in s.head.parameters())
    sizes = {a: arch_params(s.backbone, a, s.head.out_features) for a in calls[1:]}
    eligible = {a: n for a, n in sizes.items() if n < 0.95 * full}
    assert len(set(eligible.values())) > 1
    assert s.kappa == max(eligible, key=eligible.get)


def test_every_step_distils_the_teacher_shaped_sub_network_towards_the_teacher(lord_run):
    """0.05 x MSE(student's kappa-prefix(x), teacher(x)), recomputed here at each step of tasks 1 and 2
    from the network as the step found it and the teacher as cut at the task's start."""
    steps = lord_run["steps"]
    assert {t for t, _, _ in steps} == {1, 2}
    for _, distill, expected in steps:
        assert distill is not None
        assert float(distill) == pytest.approx(expected, rel=1e-4, abs=1e-9)
    assert max(expected for _, _, expected in steps) > 1e-6  # the student moves away from its teacher


def test_from_task_two_on_the_search_never_shrinks_the_teacher(lord_run):
    previous, start = lord_run["start"][1]["kappa"], lord_run["start"][2]
    assert start["kappa"] is not None and len(start["searched"]) > 1
    for arch, _ in start["searched"][1:]:
        assert all(a >= b for a, b in zip(arch.stages, previous.stages)) and all(a >= b for a, b in zip(arch.inner, previous.inner))


def test_the_insertion_hook_stores_a_batch_with_probability_exp_minus_075_rho(lord_run, scenario, batch_of):
    """Through the strategy's batch-end hook: with the run's teacher (rho of task 2), the
    fraction of batches the hook writes (the reservoir counts only those) is exp(-0.75 rho)."""
    s = lord_run["strategy"]
    rho = sum(p.numel() for p in s.teacher.parameters()) / (
        sum(p.numel() for p in s.backbone.parameters()) + sum(p.numel() for p in s.head.parameters()))
    assert rho > 0.05
    batch = batch_of(scenario.train_sets[2], 2)
    s.phase = Phase("train")
    with torch.no_grad():
        s.step_losses(batch)
    seen_before, calls = s.buffer.num_seen, 3000
    for i in range(calls):
        s.on_train_batch_end(None, batch, i)
    stored = (s.buffer.num_seen - seen_before) / len(batch)
    assert stored / calls == pytest.approx(math.exp(-0.75 * rho), abs=0.025)


# ---------------------------------------------------------------- --resume: the state a checkpoint carries between tasks
@pytest.fixture(scope="module")
def lord_resumed(tmp_path_factory):
    """`lord_run`'s run with checkpoints, stopped by Ctrl-C after task 1 (its strategy and the checkpoint on
    disk kept) and resumed with --resume; snapshots of the strategy after every task either run finished."""
    from clbench.engine import checkpoint
    from clbench.engine.runner import run

    out, seen = tmp_path_factory.mktemp("lord_resume"), {}

    def stop(i, result, strategy):
        seen[i] = snapshot(strategy)
        if i == 1:
            seen["cut"] = strategy
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(run_spec(out, checkpoint=True), on_experience=stop)
    [meta] = out.glob(".resume/**/checkpoint.json")
    seen["checkpoint"] = checkpoint.load(meta.parent)  # the resumed run deletes it once it completes

    def last(i, result, strategy):
        seen[i] = snapshot(strategy)

    seen["result"] = run(run_spec(out, resume=True, checkpoint=True), on_experience=last)
    return seen


def from_checkpoint(tensors, scenario, build_strategy, **extra_overrides):
    """A strategy built afresh and loaded as --resume loads it (state dict, extra state, `on_resume`)."""
    from clbench.engine.checkpoint import load_strategy_state

    fresh = build_strategy("lord", scenario, **RUN_OVERRIDES)
    model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    load_strategy_state(fresh, model, {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")})
    return fresh


def test_a_run_resumed_after_task_one_ends_like_the_uninterrupted_run(lord_run, lord_resumed):
    """Task 2 after --resume starts from the checkpoint's stage, input shape, teacher index bounds and
    insertion generator: its search, its teacher, its training and its buffer are the whole run's."""
    whole, resumed = lord_run["result"], lord_resumed["result"]
    assert resumed.status == "completed", resumed.error
    assert resumed.accuracy_matrix == whole.accuracy_matrix
    assert resumed.strategy_report == whole.strategy_report
    assert len(whole.strategy_report["search_flops"]) == 2  # tasks 1 and 2 searched a teacher
    final, expected = lord_resumed[2], lord_run["after"][2]["state"]
    assert "extra.kappa" not in final["extra"] and "kappa" in final["extra"]
    for part in ("model", "extra"):
        assert final[part].keys() == expected[part].keys()
        for k in expected[part]:
            assert torch.equal(final[part][k], expected[part][k]), k


def test_a_strategy_loaded_from_the_checkpoint_is_the_one_that_saved_it(lord_resumed, scenario, build_strategy, batch_of):
    """The checkpoint written after task 1 (on disk), loaded into a strategy built afresh: the same stage
    (6 of widths 0.1..1.0: width 0.6), teacher shape, width indices, teacher weights, insertion rate and
    generator, and the same losses on a step; its report is the saved strategy's."""
    cut, (meta, tensors) = lord_resumed["cut"], lord_resumed["checkpoint"]
    assert meta["completed_experiences"] == 2
    fresh = from_checkpoint(tensors, scenario, build_strategy)
    fresh.on_resume(scenario.info(1), scenario.train_sets[:2])
    assert cut.teacher is not None and cut.kappa != Arch.full(cut.backbone)
    assert (fresh.stage, fresh.widths, fresh.input_shape) == (6, RUN_OVERRIDES["widths"], (3, 32, 32))
    assert (fresh.kappa, fresh.kappa_index) == (cut.kappa, cut.kappa_index)
    saved, loaded = cut.extra_state(), fresh.extra_state()
    assert loaded.keys() == saved.keys()
    for k in saved:
        assert torch.equal(loaded[k], saved[k]), k
    # the report: student width, the teacher's share of the parameters (counted here), one search's FLOPs
    full = sum(p.numel() for p in cut.backbone.parameters()) + sum(p.numel() for p in cut.head.parameters())
    report, expected = fresh.report(), cut.report()
    rho = sum(p.numel() for p in cut.teacher.parameters()) / full
    assert report.pop("teacher_params_fraction") == pytest.approx(rho, rel=1e-6)  # exactly: the next test
    assert report == {k: v for k, v in expected.items() if k != "teacher_params_fraction"}
    assert report["student_width"] == 0.6
    assert len(report["search_flops"]) == 1 and report["search_flops"][0] > 0
    # the teacher, a step (the kappa-shaped sub-network distilled towards the teacher) and the insertion draws
    batch = batch_of(scenario.train_sets[1], 8)
    assert torch.equal(teacher_forward(fresh.teacher, batch.x), teacher_forward(cut.teacher, batch.x))
    cut.eval(), fresh.eval()
    losses = []
    for s in (cut, fresh):
        torch.manual_seed(1)
        with torch.no_grad():
            losses.append({k: float(v) for k, v in s.step_losses(batch).items()})
    assert losses[0] == losses[1] and losses[0]["distill"] > 0
    assert [fresh.should_store() for _ in range(64)] == [cut.should_store() for _ in range(64)]


def test_the_checkpoint_keeps_the_teachers_share_of_the_parameters_exactly(lord_resumed, scenario, build_strategy):
    """rho (insertion probability exp(-0.75 rho), `report()["teacher_params_fraction"]`) comes back as the
    float the saved strategy held, not rounded to float32."""
    cut = lord_resumed["cut"]
    fresh = from_checkpoint(lord_resumed["checkpoint"][1], scenario, build_strategy)
    full = sum(p.numel() for p in cut.backbone.parameters()) + sum(p.numel() for p in cut.head.parameters())
    rho = sum(p.numel() for p in cut.teacher.parameters()) / full
    assert cut.teacher_rho == rho
    assert fresh.teacher_rho == rho and fresh.report()["teacher_params_fraction"] == rho


def test_a_checkpoint_holds_a_copy_of_the_teacher(lord_resumed, scenario, build_strategy, batch_of):
    """The teacher's tensors in `extra_state` are copies: writing into a saved state leaves the live teacher."""
    s = from_checkpoint(lord_resumed["checkpoint"][1], scenario, build_strategy)
    x = batch_of(scenario.train_sets[1], 8).x
    before = teacher_forward(s.teacher, x)
    state = s.extra_state()
    assert any(k.startswith("teacher.") for k in state)
    for k, v in state.items():
        if k.startswith("teacher.") and v.is_floating_point():
            v.zero_()
    assert torch.equal(teacher_forward(s.teacher, x), before)


def test_loading_the_first_tasks_state_drops_a_later_teacher(lord_resumed, scenario, build_strategy, batch_of):
    """`load_extra_state` replaces all of LoRD's state, also in a strategy that holds a teacher (as a DDP rank
    taking rank 0's state does): task 0's state has no teacher, stage 4 (width 0.4) and no search yet."""
    from clbench.engine.checkpoint import load_strategy_state

    s = from_checkpoint(lord_resumed["checkpoint"][1], scenario, build_strategy)
    assert s.teacher is not None
    first = lord_resumed[0]
    load_strategy_state(s, first["model"], first["extra"])
    assert (s.teacher, s.kappa, s.kappa_index, s.stage, s.input_shape) == (None, None, None, 4, (3, 32, 32))
    assert s.report() == {**first["report"], "student_width": 0.4, "teacher_params_fraction": 0.0, "search_flops": []}
    s.eval()
    with torch.no_grad():
        assert "distill" not in s.step_losses(batch_of(scenario.train_sets[0], 8))


def test_a_strategy_that_has_not_trained_yet_reports_the_full_width_and_loads_back(scenario, build_strategy):
    """Before the first task the student is the full network (stage 0) and no input shape is known yet;
    its state loads back into a strategy built afresh."""
    from clbench.engine.checkpoint import load_strategy_state

    s = build_strategy("lord", scenario, **RUN_OVERRIDES)
    assert s.student_arch() == Arch.full(s.backbone)
    assert s.report() == {**s.report(), "student_width": 1.0, "teacher_params_fraction": 0.0, "search_flops": []}
    fresh = build_strategy("lord", scenario, seed=1, **RUN_OVERRIDES)
    fresh.input_shape = (3, 8, 8)
    load_strategy_state(fresh, s.state_dict(), s.extra_state())
    assert (fresh.stage, fresh.input_shape, fresh.teacher) == (0, None, None)
    assert [fresh.should_store() for _ in range(16)] == [s.should_store() for _ in range(16)]


@pytest.fixture(scope="module")
def gray_tasks():
    """2 tasks x 2 classes of 1x32x32 images (grey-level, MNIST-like), 8 train / 4 test per class."""
    g = torch.Generator().manual_seed(1)

    def draw(n):
        y = torch.arange(4).repeat_interleave(n)
        return y.view(-1, 1, 1, 1) + torch.randn((len(y), 1, 32, 32), generator=g), y

    return class_incremental_from_tensors("gray", draw(8), draw(4), increments=[2, 2], class_order=list(range(4)),
                                          default_backbone="resnet18_cifar_nf8")


def test_a_backbone_that_is_not_a_cifar_resnet_is_replaced_by_one_reading_the_images_channels(
        gray_tasks, five_tasks, build_strategy, batch_of):
    """LoRD trains a CIFAR ResNet-18 at width nf: another backbone gives it its input channels, read from its
    first convolution, else from its `in_chans`, else 3 (RGB); the built network takes a step on the images."""
    from clbench.models.backbones import build_backbone

    conv_net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten())  # no in_chans attribute
    mlp = build_backbone("clbench_mlp_tiny", in_chans=1, img_size=32)  # no convolution, in_chans = 1
    plain = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 8))  # neither
    assert not hasattr(conv_net, "in_chans") and not any(isinstance(m, torch.nn.Conv2d) for m in mlp.modules())
    for backbone, data, channels in ((conv_net, gray_tasks, 1), (mlp, gray_tasks, 1), (plain, five_tasks, 3)):
        s = build_strategy("lord", data, backbone=backbone, nf=8)
        assert isinstance(s.backbone, CifarResNet) and s.backbone.conv1.weight.shape == (8, channels, 3, 3), backbone
        s.on_experience_start(data.info(0))
        assert torch.isfinite(sum(s.step_losses(batch_of(data.train_sets[0], 4)).values()))


# ---------------------------------------------------------------- the search's and the insertion's random draws
def test_the_search_scores_seeded_noise_against_the_previous_students_batch_statistics_logits(
        five_tasks, build_strategy, batch_of):
    """Task 1's start in a run with seed 3: the noise z is torch.randn from the search's own generator
    (seeded 1000 x seed + task, so a search is reproducible whatever the training drew) and the sampled
    sub-networks come from it too: two such starts under different global random states search alike.
    The reference is the task-0 student's logits on z with batch statistics (and the modules' eps), before
    re-ordering (recomputed here); every sub-network is scored on the same z, with batch statistics."""

    def searched(global_seed):
        torch.manual_seed(0)
        s = build_strategy("lord", five_tasks, backbone=CifarResNet(16), seed=3, buffer_size=20, replay_batch_size=8,
                           search_samples=6, search_noise=4)
        for m in s.backbone.modules():  # a BatchNorm eps other than the default, which each forward must use
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eps = 0.01
        s.on_experience_start(five_tasks.info(0))
        sum(s.step_losses(batch_of(five_tasks.train_sets[0], 8)).values()).backward()  # a task-0 step
        s.on_experience_end(five_tasks.info(0), five_tasks.train_sets[0])
        before = {"student": s.student_arch(), "backbone": copy.deepcopy(s.backbone), "fc": copy.deepcopy(s.head.fc)}
        calls, logits_at = [], s.logits_at

        def recording(arch, x, bn):
            out = logits_at(arch, x, bn=bn)
            calls.append((arch, x.clone(), bn, out.clone()))
            return out

        s.logits_at = recording
        torch.manual_seed(global_seed)
        s.on_experience_start(five_tasks.info(1))
        return s, before, calls

    s, before, calls = searched(123)
    z = torch.randn((4, 3, 32, 32), generator=torch.Generator().manual_seed(3001))
    (arch, x, bn, reference), *candidates = calls
    assert arch == before["student"] and bn == "batch" and torch.equal(x, z)
    assert torch.allclose(reference, prefix_logits(before["backbone"], before["fc"], arch, z), atol=1e-5)
    assert candidates and all(torch.equal(c[1], z) and c[2] == "batch" for c in candidates)
    assert s.kappa is not None
    other = searched(7)[2]
    assert [c[0] for c in other] == [c[0] for c in calls] and len({c[0] for c in candidates}) > 1


def test_insertion_draws_come_from_the_strategys_own_generator(five_tasks, build_strategy):
    """Two strategies with the same seed decide the same insertions whatever the global random state,
    which the decisions neither read nor advance."""
    a, b = lord(five_tasks, build_strategy), lord(five_tasks, build_strategy)
    a.teacher_rho = b.teacher_rho = 0.9  # p = exp(-0.675), about 0.51
    torch.manual_seed(0)
    rng = torch.get_rng_state()
    first = [a.should_store() for _ in range(200)]
    assert torch.equal(torch.get_rng_state(), rng)
    torch.manual_seed(1)
    assert [b.should_store() for _ in range(200)] == first and 0 < sum(first) < 200
    g = torch.Generator().manual_seed(0 + 11)  # the documented seed: the run's seed + 11
    assert first == [float(torch.rand(1, generator=g)) < math.exp(-0.75 * 0.9) for _ in range(200)]


def test_a_draw_equal_to_the_insertion_probability_does_not_store(five_tasks, build_strategy):
    """A batch is stored when the uniform draw u is below p = exp(-0.75 rho) (probability p): with rho set so
    that p equals the next draw exactly, the batch is not stored; one float higher, it is."""
    s = lord(five_tasks, build_strategy)
    peek = torch.Generator()
    peek.set_state(s.insert_generator.get_state())
    u = float(torch.rand(1, generator=peek))
    rho = -math.log(u) / 0.75
    for _ in range(50):  # the float rho nearest -ln(u) / 0.75 with exp(-0.75 rho) == u exactly
        if math.exp(-0.75 * rho) == u:
            break
        rho = math.nextafter(rho, math.inf if math.exp(-0.75 * rho) > u else -math.inf)
    assert math.exp(-0.75 * rho) == u
    state = s.insert_generator.get_state()
    s.teacher_rho = rho
    assert not s.should_store()
    s.insert_generator.set_state(state)
    s.teacher_rho = math.nextafter(rho, -math.inf)  # p one step above u
    assert math.exp(-0.75 * s.teacher_rho) > u and s.should_store()


def test_without_widths_a_three_task_run_follows_the_19_ratio_list_at_r_1(scenario, build_strategy):
    """The released rule: for T other than 5 (and 10) the list is 0.05, 0.10, ..., 0.90, 1.0 and r = 1, so
    the increments are round(0.5 (1 + cos(pi t / 2))) = 1, round(0.5) = 0 -> at least 1, and 0 for the last
    task: stages 1, 2, 2, widths 0.05, 0.10, 0.10."""
    s = build_strategy("lord", scenario, buffer_size=20)
    widths = []
    for t in range(3):
        s.on_experience_start(scenario.info(t))
        widths.append(s.report()["student_width"])
    assert widths == [0.05, 0.1, 0.1] and len(s.widths) == 19


def test_a_one_channel_nf_1_network_has_no_sub_network_under_the_size_cap(gray_tasks, build_strategy, batch_of):
    """At nf = 1 every width rounds to the full channels (at least 8, capped by the network's), so each
    sampled sub-network is the whole network: none is under 0.95 of it and no teacher is chosen; the size
    the search compares is the network's parameter count (a one-channel stem included)."""
    s = build_strategy("lord", gray_tasks, backbone=torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3)), nf=1,
                       buffer_size=20, replay_batch_size=4, search_samples=5, search_noise=2)
    s.on_experience_start(gray_tasks.info(0))
    sum(s.step_losses(batch_of(gray_tasks.train_sets[0], 4)).values()).backward()
    s.on_experience_end(gray_tasks.info(0), gray_tasks.train_sets[0])
    s.on_experience_start(gray_tasks.info(1))
    full = sum(p.numel() for p in s.backbone.parameters()) + sum(p.numel() for p in s.head.parameters())
    assert s.backbone.conv1.weight.shape == (1, 1, 3, 3)
    assert arch_params(s.backbone, Arch.full(s.backbone), s.head.out_features) == full
    assert (s.teacher, s.kappa, s.kappa_index, s.teacher_rho) == (None, None, None, 0.0) and len(s.search_flops) == 1


def test_the_students_forward_normalises_with_batch_statistics_in_training_and_running_ones_in_evaluation(
        five_tasks, build_strategy, batch_of):
    """The task-0 student (stage 4: channels 8, 16, 24, 48 of nf = 16) against a network cut to those
    channels here: in training its BatchNorms use the batch's statistics and move the running statistics of
    the active channels only (momentum 0.1, as the cut network's modules do); in evaluation they use the
    running statistics and leave them, each BatchNorm with its own affine terms and eps. The features it
    returns are the ones its head reads, zero past 48."""
    s = lord(five_tasks, build_strategy, nf=16)
    s.on_experience_start(five_tasks.info(0))
    arch = s.student_arch()
    bns = [m for m in s.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for m in bns:  # running statistics unlike any batch's (the two modes differ), affine terms, a module's eps
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
            m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
            m.eps = 0.01
    before, x = copy.deepcopy(s.backbone), batch_of(five_tasks.train_sets[0], 8).x
    cut = prefix_net(before, arch).train()
    fc, w = s.head.fc, arch.stages[-1]

    def logits(h):
        return torch.nn.functional.linear(h, fc.weight[:, :w], fc.bias)

    s.train()
    with torch.no_grad():
        out, h = s(x), cut(x)
    assert out.features.shape == (8, 128) and torch.equal(out.features[:, w:], torch.zeros(8, 128 - w))
    assert torch.allclose(out.features[:, :w], h, atol=1e-5) and torch.allclose(out.logits, logits(h), atol=1e-5)
    cut_bns = [m for m in cut.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    old_bns = [m for m in before.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m, c, o in zip(bns, cut_bns, old_bns):
        n = len(c.running_mean)
        assert torch.allclose(m.running_mean[:n], c.running_mean, atol=1e-6) and torch.equal(m.running_mean[n:], o.running_mean[n:])
        assert torch.allclose(m.running_var[:n], c.running_var, atol=1e-6) and torch.equal(m.running_var[n:], o.running_var[n:])
    s.eval(), cut.eval()
    stats = [m.running_mean.clone() for m in bns]
    with torch.no_grad():
        out, h = s(x[:3]), cut(x[:3])
    assert torch.allclose(out.logits, logits(h), atol=1e-5)
    assert all(torch.equal(m.running_mean, r) for m, r in zip(bns, stats))


def test_a_two_task_run_reaches_the_cosines_end_at_its_last_task(gray_tasks, build_strategy):
    """T = 2, r = 4: increments round(2 (1 + cos(pi t / 1))) = 4, then round(2 (1 - 1)) = 0 for the last
    task, so the stage stays at 4: widths 0.20, 0.20 of the 19-ratio list."""
    s = build_strategy("lord", gray_tasks, backbone=torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3)), nf=8,
                       schedule_r=4.0, buffer_size=20)
    widths = []
    for t in range(2):
        s.on_experience_start(gray_tasks.info(t))
        widths.append(s.report()["student_width"])
    assert widths == [0.2, 0.2]


@pytest.mark.parametrize("bad", [{"distill_weight": -0.05}, {"insertion_decay": -0.75}, {"schedule_r": -1.0},
                                 {"search_samples": 0}, {"nf": 0}, {"search_noise": -1}, {"size_cap": 1.5}])
def test_invalid_options_are_usage_errors(bad):
    from clbench.engine.runner import strategy_config
    from clbench.errors import UsageError

    with pytest.raises(UsageError, match=next(iter(bad))):
        strategy_config("lord", bad)


def test_built_without_a_config_lord_takes_its_defaults():
    """`LoRD(backbone, num_classes)` (no Config, a backbone that is not a CIFAR ResNet): the defaults, so
    a ResNet-18 at nf = 64 reading the backbone's one channel."""
    from clbench.strategies.lord import LoRD

    s = LoRD(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3)), 4)
    assert s.cfg == LoRD.Config() and s.backbone.conv1.weight.shape == (64, 1, 3, 3)


def test_sub_network_widths_are_the_nearest_multiple_of_8_never_more_than_10_percent_below():
    net = CifarResNet(64)  # stage widths 64, 128, 256, 512, two blocks each
    arch = Arch.of(net, [5 / 36, 11.9 / 128, 0.4, 0.4], [1.0] * 8)
    # 64 * 5/36 = 8.89: nearest 8 is exactly 10% below (0.9 * 8.89 == 8.0 in floats), kept;
    # 11.9: nearest 8 is 33% below, so the next multiple, 16; 102.4 -> 104 (nearest, above); 204.8 -> 208
    assert arch.stages == (8, 16, 104, 208)
    assert arch.inner == (8, 8, 16, 16, 104, 104, 208, 208)


def test_a_cifar_resnet_with_one_block_per_stage_gives_one_width_per_stage_and_block():
    net = CifarResNet(16, blocks=(1, 1, 1, 1))
    assert Arch.full(net) == Arch((16, 32, 64, 128), (16, 32, 64, 128))
    assert Arch.of(net, [0.5] * 4, [1.0] * 4) == Arch((8, 16, 32, 64), (8, 16, 32, 64))
