"""Teacher snapshots and mode helpers (clbench/models/freeze.py): a snapshot is an independent,
frozen, eval-mode copy that stays in eval when the strategy is put back in training; the mode
helpers give every module its own mode back."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from clbench.models.freeze import eval_mode, evaluating, frozen_snapshot, teacher_logits, teacher_outputs


def _backbone() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.ReLU())


def _modes(module: nn.Module) -> list[bool]:
    return [m.training for m in module.modules()]


def test_a_snapshot_is_an_independent_frozen_eval_copy_and_leaves_the_original_alone():
    backbone, head = _backbone(), nn.Linear(4, 2)
    teacher = frozen_snapshot({"backbone": backbone, "head": head})

    assert list(teacher.keys()) == ["backbone", "head"]
    assert teacher.frozen_snapshot is True
    assert _modes(teacher) == [False] * len(_modes(teacher))
    assert all(not p.requires_grad for p in teacher.parameters())
    # the original keeps its mode and its gradients
    assert _modes(backbone) == [True] * 5 and head.training
    assert all(p.requires_grad for p in [*backbone.parameters(), *head.parameters()])
    # same values, other storage: training the student afterwards leaves the teacher as it was
    for original, copied in zip([*backbone.parameters(), *head.parameters()], teacher.parameters()):
        assert torch.equal(original, copied)
        assert original.data_ptr() != copied.data_ptr()
    before = teacher["head"].weight.clone()
    with torch.no_grad():
        head.weight.add_(1.0)
    assert torch.equal(teacher["head"].weight, before)


def test_a_strategy_put_back_in_training_keeps_its_teacher_in_eval(strategy_factory):
    strategy = strategy_factory("lwf")
    teacher = strategy.frozen_copy(extra=nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)))
    strategy.teacher_for_test = teacher
    assert set(teacher.keys()) == {"backbone", "head", "extra"}

    strategy.train()
    assert strategy.training and strategy.backbone.training
    assert _modes(teacher) == [False] * len(_modes(teacher))
    strategy.eval()
    strategy.train(True)
    assert not any(_modes(teacher))


def test_teacher_outputs_are_the_snapshots_head_over_its_features_without_gradients():
    teacher = nn.ModuleDict({"backbone": nn.Linear(3, 4), "head": nn.Linear(4, 2)})  # gradients still on
    x = torch.randn(5, 3)
    out = teacher_outputs(teacher, x)
    features = x @ teacher["backbone"].weight.T + teacher["backbone"].bias
    logits = features @ teacher["head"].weight.T + teacher["head"].bias
    torch.testing.assert_close(out.features, features.detach())
    torch.testing.assert_close(out.logits, logits.detach())
    assert not out.logits.requires_grad and not out.features.requires_grad
    torch.testing.assert_close(teacher_logits(teacher, x), logits.detach())


class _Student(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = _backbone()
        self.teacher = frozen_snapshot({"backbone": self.backbone})


def test_evaluating_puts_everything_in_eval_then_gives_each_module_its_own_mode_back():
    student = _Student()
    student.train()
    student.teacher.eval()
    student.backbone[2].eval()  # a mixed state: one submodule already in eval
    before = _modes(student)
    assert any(before) and not all(before)

    with evaluating(student) as device:
        assert device == torch.device("cpu")
        assert not any(_modes(student))
    assert _modes(student) == before

    with pytest.raises(RuntimeError):
        with evaluating(student, torch.device("cpu")):
            raise RuntimeError("an evaluation that fails")
    assert _modes(student) == before


def test_eval_mode_freezes_batch_statistics_and_dropout_then_restores_each_module():
    first, second = _backbone(), nn.Sequential(nn.Dropout(0.9))
    first[2].eval()
    before = [_modes(first), _modes(second)]
    running = first[1].running_mean.clone()
    x = torch.randn(8, 3) * 5 + 3

    with eval_mode(first, second):
        assert not any(_modes(first)) and not any(_modes(second))
        torch.testing.assert_close(second(x), x)  # no dropout
        first(x)
    torch.testing.assert_close(first[1].running_mean, running)  # BatchNorm statistics untouched
    assert [_modes(first), _modes(second)] == before

    with pytest.raises(ValueError):
        with eval_mode(first):
            raise ValueError("a phase that fails")
    assert _modes(first) == before[0]
    first(x)  # back in training: the batch moves the running mean
    assert not torch.equal(first[1].running_mean, running)
