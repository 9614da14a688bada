"""DETR fine-tuning baseline: heads of a frozen base trained on each task's own labels; old rows
trained by default (the lower bound), fixed with freeze_old_rows."""

from __future__ import annotations

import copy

import pytest
import pytorch_lightning as pl
import torch
from clbench.scenarios.shapes import generate_shapes
from clbench.strategies.detr_finetune import Config, DetrFinetune
from torch.utils.data import DataLoader

from clbench.datasets import detection_collate
from clbench.tasks.detection import standard_task_images
from clbench.types import ExperienceInfo

TASKS = [ExperienceInfo(0, (0, 1), (0, 1), 2, 4), ExperienceInfo(1, (2, 3), (0, 1, 2, 3), 2, 4)]


@pytest.fixture(scope="module")
def task2_data():
    pool = generate_shapes(24, size=64, num_classes=4, seed=2)
    rows, targets = standard_task_images(pool.targets, TASKS[1].classes)
    return pool.subset(rows[:8], targets[:8])


def _step_in_task2(freeze_old_rows: bool, data):
    torch.manual_seed(0)
    strategy = DetrFinetune(None, 4, Config(base="random", freeze_old_rows=freeze_old_rows), seed=0)
    strategy.on_experience_start(TASKS[0])
    strategy.on_experience_end(TASKS[0], data)
    strategy.on_experience_start(TASKS[1])
    before = copy.deepcopy(strategy.state_dict())
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(strategy, DataLoader(data, batch_size=8, collate_fn=detection_collate))
    return strategy, before, strategy.state_dict()


@pytest.mark.parametrize("freeze_old_rows", [False, True])
def test_only_heads_train_and_old_rows_move_unless_frozen(task2_data, freeze_old_rows):
    strategy, before, after = _step_in_task2(freeze_old_rows, task2_data)
    assert {n for n, p in strategy.named_parameters() if p.requires_grad} == {
        f"detector.{h}.{n}" for h in ("class_head", "box_head") for n, _ in getattr(strategy.detector, h).named_parameters()}
    for name, value in before.items():
        if not name.startswith(("detector.class_head.", "detector.box_head.")):
            assert torch.equal(value, after[name]), name
    w0, w1 = before["detector.class_head.weight"], after["detector.class_head.weight"]
    assert not torch.equal(w0[2:], w1[2:])  # current rows
    assert torch.equal(w0[:2], w1[:2]) == freeze_old_rows  # old rows: trained only in plain fine-tuning
    assert not torch.equal(before["detector.box_head.4.weight"], after["detector.box_head.4.weight"])


def test_predictions_are_seen_classes_only(task2_data):
    strategy = DetrFinetune(None, 4, Config(base="random"), seed=0)
    strategy.on_experience_start(TASKS[0])
    preds = strategy.predict_detections(torch.rand(2, 3, 64, 64))
    assert all(set(p["labels"].tolist()) == {0, 1} and p["boxes"].shape == (24, 4) for p in preds)


def test_a_missing_base_file_is_a_usage_error_naming_it(tmp_path):
    from clbench.errors import UsageError

    with pytest.raises(UsageError, match="no_such_base.pt"):
        DetrFinetune(None, 4, Config(base=str(tmp_path / "no_such_base.pt")), seed=0)
