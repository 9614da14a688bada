"""CL-DETR: pseudo-label selection on hand-built teacher outputs, the distribution-preserving
memory on hand-counted label sets, the teacher and calibration schedule per task, and a short
end-to-end run on shapes-2+2."""

from __future__ import annotations

import copy
import json
import math

import pytest
import pytorch_lightning as pl
import torch
from clbench.scenarios.shapes import generate_shapes
from clbench.strategies.cl_detr import (
    CLDETR,
    Config,
    distribution_preserving_selection,
    label_counts,
)
from torch.utils.data import DataLoader

from clbench.datasets import (
    DetectionDataset,
    detection_collate,
    make_target,
)
from clbench.models.detection.detr import DetrOutput
from clbench.tasks.detection import standard_task_images
from clbench.types import ExperienceInfo

T = torch.tensor
TASKS = [ExperienceInfo(0, (0, 1), (0, 1), 2, 4), ExperienceInfo(1, (2, 3), (0, 1, 2, 3), 2, 4)]

pytestmark = pytest.mark.usefixtures("one_thread")


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _cxcywh(x0, y0, x1, y1, size=64.0):
    return [(x0 + x1) / 2 / size, (y0 + y1) / 2 / size, (x1 - x0) / size, (y1 - y0) / size]


BOXES = [[8, 8, 24, 24], [12, 8, 28, 24], [40, 40, 56, 56], [40, 4, 56, 20], [4, 40, 20, 56]]  # per query, pixels
GT_BOX = [8.0, 8.0, 24.0, 24.0]  # query 0's box (IoU 1); query 1's has IoU 16*12 / (2*256 - 192) = .6 with it


def _teacher_output():
    """One 64x64 image, 5 queries, 4 classes (0, 1 old; 2, 3 new). Old-class (query, class)
    scores, best first: (0,0) .95, (1,1) .90, (2,0) .80, (3,1) .60, (4,0) .25, (0,1) .05, (1,0) .04,
    (2,1) .03, (3,0) .02, (4,1) .01. Every new-class score is .99: the teacher must never rank
    classes it was not trained on."""
    scores = torch.full((5, 4), 0.99)
    for (q, c), p in {(0, 0): .95, (1, 1): .90, (2, 0): .80, (3, 1): .60, (4, 0): .25,
                      (0, 1): .05, (1, 0): .04, (2, 1): .03, (3, 0): .02, (4, 1): .01}.items():
        scores[q, c] = p
    logits = torch.log(scores / (1 - scores))
    boxes = T([_cxcywh(*b) for b in BOXES])
    return DetrOutput(logits.view(1, 1, 5, 4), boxes.view(1, 1, 5, 4), torch.zeros(1, 1, 5, 8))


def _strategy_in_task2(**cfg):
    strategy = CLDETR(None, 4, Config(base="random", **cfg), seed=0)
    strategy.on_experience_start(TASKS[0])
    strategy.on_experience_end(TASKS[0], _single_box_dataset([0] * 4))
    strategy.on_experience_start(TASKS[1])
    return strategy


@pytest.mark.parametrize("cfg, kept", [
    # the release: top 10, no score threshold, IoU >= .7 with a GT box drops; query 0 overlaps
    ({"pseudo_threshold": 0.0}, [(1, 1), (2, 0), (3, 1), (4, 0), (1, 0), (2, 1), (3, 0), (4, 1)]),
    ({}, [(1, 1), (2, 0), (3, 1)]),  # the tiny default threshold .3
    ({"pseudo_top_k": 3, "pseudo_threshold": 0.0}, [(1, 1), (2, 0)]),  # top 3: (0,0), (1,1), (2,0); (0,0) overlaps
    ({"pseudo_threshold": 0.85}, [(1, 1)]),
    ({"pseudo_threshold": 0.1, "pseudo_max_iou": 0.5}, [(2, 0), (3, 1), (4, 0)]),  # query 1's IoU .6 now overlaps
])
def test_pseudo_labels_are_the_teachers_top_old_class_boxes_above_threshold_off_the_ground_truth(cfg, kept):
    strategy = _strategy_in_task2(**cfg)
    gt = make_target([GT_BOX], [2])
    original = copy.deepcopy(gt)
    found = strategy.old_model_detections(_teacher_output(), (64, 64))
    assert set(found[0]["labels"].tolist()) <= {0, 1}  # old classes only, despite the .99 new-class scores
    (merged,) = strategy.with_pseudo_labels([gt], found)
    assert all(torch.equal(gt[k], original[k]) for k in gt)  # the real ground truth is not altered
    assert merged["labels"][0] == 2 and merged["boxes"][0].tolist() == GT_BOX  # and comes first
    assert merged["labels"][1:].tolist() == [c for _, c in kept]
    assert torch.allclose(merged["boxes"][1:], T([BOXES[q] for q, _ in kept], dtype=torch.float32), atol=1e-4)
    assert not merged["ignore"].any()


# --------------------------------------------------------------------------- the memory
def _single_box_dataset(labels):
    """Images of one box each, with the given labels (pixels do not matter for the selection)."""
    targets = [make_target([[4.0, 4.0, 20.0, 20.0]], [c]) for c in labels]
    return DetectionDataset(torch.zeros(len(labels), 3, 8, 8, dtype=torch.uint8), targets)


def test_buffer_keeps_the_training_label_distribution_6_3_1():
    # 100 images of one box: 60 of class 2, 30 of class 3, 10 of class 0 (a class of the task's
    # own labels, e.g. after a class-order permutation); 10% memory -> 10 images in 6:3:1
    labels = [2] * 60 + [3] * 30 + [0] * 10
    data = _single_box_dataset([labels[i] for i in torch.randperm(100, generator=torch.Generator().manual_seed(3))])
    strategy = CLDETR(None, 4, Config(base="random"), seed=0)
    task = ExperienceInfo(0, (2, 3, 0), (2, 3, 0), 1, 4)
    strategy.on_experience_start(task)
    strategy.on_experience_end(task, data)
    (rows,) = strategy.memory_rows
    kept = [data.targets[i]["labels"].item() for i in rows.tolist()]
    assert len(kept) == 10 and (kept.count(2), kept.count(3), kept.count(0)) == (6, 3, 1)
    assert torch.equal(strategy.memory_sets[0].targets[0]["labels"], data.targets[int(rows[0])]["labels"])


def test_greedy_selection_on_a_hand_computed_multi_box_case():
    # images: [A, A, A], [B], [A, B], [B, B] -> p_D = (1/2, 1/2)
    targets = [make_target([[0, 0, 1, 1]] * len(ls), ls) for ls in ([0, 0, 0], [1], [0, 1], [1, 1])]
    counts = label_counts(targets, (0, 1))
    assert counts.tolist() == [[3, 0], [0, 1], [1, 1], [0, 2]]
    # step 1: [A, B] alone has p = p_D (KL 0); step 2, KL(p_M || p_D) of the candidates:
    # + [A,A,A] -> (4,1)/5: .8 ln 1.6 + .2 ln .4 = .193; + [B] -> (1,2)/3: .057; + [B,B] -> (1,3)/4: .131
    assert distribution_preserving_selection(counts, 2).tolist() == [2, 1]
    # ties (the two single-class images give the same KL at step 1 of another set) go to `order`
    tie = label_counts([make_target([[0, 0, 1, 1]], [c]) for c in (0, 1)], (0, 1))
    assert distribution_preserving_selection(tie, 1, order=T([1, 0])).tolist() == [1]
    assert distribution_preserving_selection(tie, 1).tolist() == [0]


# --------------------------------------------------------------------------- two tasks, step by step
def _task_data(classes, seed, n=8):
    pool = generate_shapes(3 * n, size=64, num_classes=4, seed=seed)
    rows, targets = standard_task_images(pool.targets, classes)
    return pool.subset(rows[:n], targets[:n])


def _fit(strategy, phase, data):
    strategy.phase = phase
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(strategy, DataLoader(strategy.phase_data(phase, data), batch_size=8, collate_fn=detection_collate))
    return trainer


@pytest.fixture(scope="module")
def two_tasks():
    torch.manual_seed(0)
    strategy = CLDETR(None, 4, Config(base="random", memory_fraction=0.25, calibration_epochs=3), seed=0)
    data = [_task_data(TASKS[0].classes, 1), _task_data(TASKS[1].classes, 2)]
    calls = []
    original = strategy.with_pseudo_labels
    strategy.with_pseudo_labels = lambda targets, found: calls.append(strategy.phase.name) or original(targets, found)
    record = {"strategy": strategy, "data": data, "calls": calls}
    strategy.on_experience_start(TASKS[0])
    record["phases1"] = strategy.phases(TASKS[0])
    record["teacher1"] = strategy.teacher
    _fit(strategy, record["phases1"][0], data[0])
    record["calls1"] = list(calls)
    strategy.on_experience_end(TASKS[0], data[0])
    record["after_task1"] = copy.deepcopy(strategy.detector.state_dict())
    strategy.on_experience_start(TASKS[1])
    record["phases2"] = strategy.phases(TASKS[1])
    record["before_step"] = copy.deepcopy(strategy.state_dict())
    _fit(strategy, record["phases2"][0], data[1])
    record["after_step"] = copy.deepcopy(strategy.state_dict())
    record["calls2"] = list(calls)
    trainer = _fit(strategy, record["phases2"][1], data[1])
    record["calibration_scheduler"] = trainer.lr_scheduler_configs[0].scheduler
    record["calls_calibration"] = calls[len(record["calls2"]):]
    strategy.on_experience_end(TASKS[1], data[1])
    return record


def test_first_task_has_no_teacher_no_pseudo_labels_and_no_calibration(two_tasks):
    assert two_tasks["teacher1"] is None
    assert two_tasks["calls1"] == []
    assert [p.name for p in two_tasks["phases1"]] == ["train"]


def test_teacher_is_the_frozen_eval_mode_model_after_the_previous_task(two_tasks):
    strategy = two_tasks["strategy"]
    teacher = strategy.teacher["detector"]
    assert all(not p.requires_grad for p in strategy.teacher.parameters())
    strategy.train()  # Lightning's fit puts the strategy in train mode: the teacher stays in eval
    assert not any(m.training for m in strategy.teacher.modules())
    for name, value in two_tasks["after_task1"].items():  # the snapshot, untouched by two fits
        assert torch.equal(teacher.state_dict()[name], value), name
    before, after = two_tasks["before_step"], two_tasks["after_step"]
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("teacher."))
    assert two_tasks["calls2"] == ["train"]  # pseudo labels in the main phase of task 2


def test_the_whole_detector_trains_except_frozen_batchnorm(two_tasks):
    before, after = two_tasks["before_step"], two_tasks["after_step"]
    for name in ("detector.backbone.0.0.weight", "detector.encoder.layers.0.linear1.weight",
                 "detector.decoder.2.self_attn.in_proj_weight", "detector.query_embed.weight", "detector.box_head.4.weight"):
        assert not torch.equal(before[name], after[name]), name
    for name in ("detector.backbone.0.1.weight", "detector.backbone.0.1.running_mean"):
        assert torch.equal(before[name], after[name]), name
    w0, w1 = before["detector.class_head.weight"], after["detector.class_head.weight"]
    assert not torch.equal(w0[:2], w1[:2]) and not torch.equal(w0[2:], w1[2:])  # old rows learn too
    strategy = two_tasks["strategy"]
    rate = {id(p): g["lr"] for g in strategy.optimizer_params() for p in g["params"]}
    detector, cfg = strategy.detector, strategy.cfg
    assert len(rate) == sum(1 for p in detector.parameters() if p.requires_grad)  # each in one group
    batchnorm = {id(p) for m in detector.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()}
    assert len(batchnorm) == 8
    for name, p in detector.named_parameters():
        expected = None if id(p) in batchnorm else {"backbone": cfg.backbone_lr, "box_head": cfg.box_lr}.get(
            name.split(".")[0], cfg.lr)
        assert rate.get(id(p)) == expected, name
    assert cfg.backbone_lr == cfg.lr / 10  # the release's ratio


def test_calibration_fine_tunes_on_every_tasks_exemplars_without_the_teacher(two_tasks):
    strategy, data = two_tasks["strategy"], two_tasks["data"]
    calibrate = two_tasks["phases2"][1]
    assert calibrate.name == "calibrate" and calibrate.epochs == 3
    assert two_tasks["calls_calibration"] == []  # plain set loss: no pseudo labels
    assert [len(r) for r in strategy.memory_rows] == [2, 2]  # 25% of 8 images per task
    for task, (rows, subset) in enumerate(zip(strategy.memory_rows, strategy.memory_sets)):
        assert [t["labels"].tolist() for t in subset.targets] == [data[task].targets[i]["labels"].tolist() for i in rows.tolist()]
        assert set(torch.cat([t["labels"] for t in subset.targets]).tolist()) <= set(TASKS[task].classes)
    scheduler = two_tasks["calibration_scheduler"]
    assert isinstance(scheduler, torch.optim.lr_scheduler.StepLR) and scheduler.step_size == 10
    # resume: the memory is row indices, rebuilt from the tasks' training sets
    fresh = CLDETR(None, 4, Config(base="random"), seed=0)
    fresh.load_extra_state(strategy.extra_state())
    fresh.on_resume(TASKS[1], data)
    assert [s.targets for s in fresh.memory_sets] == [s.targets for s in strategy.memory_sets]


def test_kd_term_only_when_weighted():
    data = _task_data(TASKS[1].classes, 2)
    batch = detection_collate([data[i] for i in range(4)])
    for weight, names in ((0.0, {"focal", "l1", "giou"}), (1.0, {"focal", "l1", "giou", "kd"})):
        strategy = _strategy_in_task2(kd_weight=weight)
        strategy.phase = strategy.phases(TASKS[1])[0]
        losses = strategy.step_losses(batch)
        assert set(losses) == names and all(torch.isfinite(v) for v in losses.values())


# --------------------------------------------------------------------------- end to end
def test_cli_run_on_shapes_stores_a_detection_record(tmp_path):
    from clbench.cli import main

    code = main(["run", "--strategy", "cl_detr", "--scenario", "shapes-2+2", "--accelerator", "cpu", "--quiet",
                 "--set", "epochs=1", "limit_train_batches=2", "batch_size=4", "base=random", "calibration_epochs=1",
                 "--output-dir", str(tmp_path)])
    assert code == 0
    (path,) = tmp_path.rglob("*.json")
    data = json.loads(path.read_text())
    assert data["status"] == "completed" and data["strategy"] == "cl_detr" and data["backbone"] == "tiny_detr"
    assert data["strategy_config"]["pseudo_top_k"] == 10 and data["strategy_config"]["pseudo_max_iou"] == 0.7
    assert len(data["detection"]["per_task"]) == 2 and "old" in data["detection"]["per_task"][1]
    assert all(n >= 1 for n in data["strategy_report"]["memory_images"])


def test_a_resumed_run_ends_like_an_uninterrupted_one(tmp_path, fast_config_for, resume_pair):
    """Stopped after task 1, the memory comes back as row indices into task 1's training set and
    task 2's calibration replays the same exemplars."""
    from clbench.engine.runner import RunSpec

    def spec(out, resume):
        return RunSpec("cl_detr", "shapes-2+2", run=fast_config_for(out, batch_size=4), seed=0, resume=resume,
                       strategy_overrides={"base": "random", "calibration_epochs": 1})

    whole, resumed = resume_pair(spec, tmp_path, stop_after=0)
    assert resumed.status == "completed" and resumed.accuracy_matrix == whole.accuracy_matrix
    # through JSON: task 1's "old" is NaN (no old classes), which never equals itself
    assert json.dumps(resumed.detection["per_task"]) == json.dumps(whole.detection["per_task"])
    assert resumed.strategy_report == whole.strategy_report
