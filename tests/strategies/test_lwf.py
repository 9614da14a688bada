"""LwF: a frozen teacher snapshot, no distillation in the first experience, KD as in the paper."""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from clbench.strategies.lwf import distillation

from clbench.engine.runner import RunSpec, run
from clbench.models.freeze import teacher_logits


class TeacherWatch(pl.Callback):
    """Teacher state when each training fit starts and ends, and the terms of each step."""

    def __init__(self):
        self.at_start, self.at_end = [], []

    @staticmethod
    def _state(module):
        if module.teacher is None:
            return None
        return {k: v.detach().clone() for k, v in module.teacher.state_dict().items()}

    def on_train_start(self, trainer, pl_module):
        self.at_start.append(self._state(pl_module))

    def on_train_end(self, trainer, pl_module):
        self.at_end.append(self._state(pl_module))


def test_teacher_is_the_frozen_previous_model_and_stays_unchanged(tmp_path, fast_config_for):
    watch, after_exp, students = TeacherWatch(), {}, []

    def record(i, result, strategy):
        after_exp[i] = strategy
        students.append({k: v.detach().clone() for k, v in strategy.backbone.state_dict().items()})

    run(RunSpec("lwf", "synthetic-2", run=fast_config_for(tmp_path), seed=0), callbacks=[watch], on_experience=record)
    assert watch.at_start[0] is None and watch.at_end[0] is None  # no teacher in the first experience
    start, end = watch.at_start[1], watch.at_end[1]
    assert start.keys() == end.keys()
    for k in start:
        assert torch.equal(start[k], end[k]), f"teacher changed during training: {k}"
    # the teacher is the model as it was after experience 0, with its 2-class head
    for k, v in students[0].items():
        assert torch.equal(start[f"backbone.{k}"], v)
    assert start["head.fc.weight"].shape[0] == 2
    # ...while the student moved on
    assert any(not torch.equal(students[0][k], students[1][k]) for k in students[0])
    teacher = after_exp[1].teacher
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_no_distillation_in_the_first_experience(strategy_factory, synthetic_scenario, batch_of):
    strategy = strategy_factory("lwf")
    strategy.on_experience_start(synthetic_scenario.info(0))
    assert strategy.teacher is None
    assert set(strategy.step_losses(batch_of(synthetic_scenario.train_sets[0]))) == {"ce"}


def test_distillation_against_a_hand_computation():
    student = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 3.0]])
    teacher = torch.tensor([[2.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    T = 2.0
    total = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        p = [math.exp(t / T) for t in t_row]
        p = [v / sum(p) for v in p]
        q = [math.exp(s / T) for s in s_row]
        log_q = [math.log(v / sum(q)) for v in q]
        total += -sum(pi * lqi for pi, lqi in zip(p, log_q))
    assert distillation(student, teacher, T).item() == pytest_approx(total / 2)


def pytest_approx(x):
    import pytest

    return pytest.approx(x, rel=1e-6)


def test_kd_term_uses_past_classes_of_the_teacher_and_alpha(strategy_factory, synthetic_scenario, batch_of):
    strategy = strategy_factory("lwf", alpha=3.0, temperature=2.0)
    strategy.on_experience_start(synthetic_scenario.info(0))
    with torch.no_grad():  # make the old model differ from a fresh init, so KD is informative
        for p in strategy.parameters():
            p.add_(0.1 * torch.randn_like(p))
    strategy.on_experience_start(synthetic_scenario.info(1))
    batch = batch_of(synthetic_scenario.train_sets[1], 12)
    terms = strategy.step_losses(batch)
    assert set(terms) == {"ce", "kd"}

    logits = strategy.head(strategy.backbone(batch.x))
    assert logits.shape[1] == 4
    old = teacher_logits(strategy.teacher, batch.x)
    assert old.shape[1] == 2
    assert torch.allclose(terms["ce"], F.cross_entropy(logits, batch.y))
    assert torch.allclose(terms["kd"], 3.0 * distillation(logits[:, :2], old, 2.0))
    # right after the snapshot the student's old-class outputs equal the teacher's: KD is at its
    # minimum over the student's logits, so its gradient there vanishes
    student_old = logits[:, :2].detach().requires_grad_(True)
    distillation(student_old, old, 2.0).backward()
    assert student_old.grad.abs().max() < 1e-6
