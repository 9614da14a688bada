"""The incremental-detection protocol: task filters and seen-class AP."""

from __future__ import annotations

import math

import pytest
import torch
from clbench.scenarios._detection import parse_split

from clbench.datasets import (
    DetectionDataset,
    detection_collate,
    make_target,
)
from clbench.errors import UsageError
from clbench.tasks.detection import (
    COCO_AP,
    CONVENTIONS,
    absent_task_images,
    breakdown,
    class_ap,
    standard_task_images,
)


def pred(boxes, scores, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "scores": torch.tensor(scores, dtype=torch.float32), "labels": torch.tensor(labels)}


# --------------------------------------------------------------------------- filters
POOL = [
    make_target([[0, 0, 10, 10]], [0]),                     # old only
    make_target([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 2]),  # old + current
    make_target([[0, 0, 10, 10], [20, 20, 30, 30]], [2, 3]),  # current + future
    make_target([[0, 0, 10, 10]], [3]),                     # future only
    make_target([[0, 0, 10, 10]], [2], ignore=[True]),      # a current-class box that is only ignored
    make_target([[0, 0, 10, 10], [5, 5, 9, 9]], [2, 1]),    # current + old
]


def test_standard_filter_keeps_every_image_with_a_current_object_and_only_its_current_boxes():
    rows, kept = standard_task_images(POOL, current=[2])
    assert rows == [1, 2, 5]  # the ignored-only image has nothing to learn from
    for t in kept:
        assert t["labels"].tolist() and set(t["labels"].tolist()) == {2}
    assert torch.equal(kept[0]["boxes"], torch.tensor([[20.0, 20, 30, 30]]))


def test_absent_filter_drops_images_holding_an_earlier_class_and_keeps_future_objects_in_the_pixels():
    rows, kept = absent_task_images(POOL, current=[2], earlier=[0, 1])
    assert rows == [2]  # 1 and 5 hold an old object in their original annotations; 2 holds a future one
    assert kept[0]["labels"].tolist() == [2]
    first_absent, first_standard = absent_task_images(POOL, [0, 1], earlier=[]), standard_task_images(POOL, [0, 1])
    assert first_absent[0] == first_standard[0] == [0, 1, 5]


def test_split_names_parse_into_increments():
    assert parse_split("10+10") == [10, 10]
    assert parse_split("10+5+5") == [10, 5, 5]
    assert parse_split("10+2x5") == [10, 2, 2, 2, 2, 2]
    assert parse_split("15+1x5") == [15, 1, 1, 1, 1, 1]
    for bad in ("10+0", "10+2x0", "10+x5", "ten"):
        with pytest.raises(UsageError, match=f"'{bad}'".replace("+", r"\+")):
            parse_split(bad)


def test_dataset_items_are_unit_range_images_with_their_targets_and_collate_into_a_batch():
    images = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    data = DetectionDataset(images, POOL[:3]).subset([2, 0])
    x, t = data[0]
    assert torch.allclose(x, images[2].float() / 255) and t is POOL[2]
    batch = detection_collate([data[0], data[1]])
    assert batch.x.shape == (2, 3, 8, 8) and len(batch) == 2 and batch.targets[1] is POOL[0]


# --------------------------------------------------------------------------- evaluation
def test_hand_built_case_gives_the_hand_computed_ap50():
    # class 0: one correct box -> AP 1; class 2: ground truth, no prediction -> AP 0;
    # class 1: a prediction without ground truth -> no AP (None, never 0); mean over classes = 0.5
    targets = [make_target([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 2])]
    preds = [pred([[0, 0, 10, 10], [40, 40, 50, 50]], [0.9, 0.8], [0, 1])]
    for convention in CONVENTIONS.values():
        ap = class_ap(preds, targets, seen=[0, 1, 2], convention=convention)
        assert ap == {0: pytest.approx(1.0), 1: None, 2: 0.0}
    assert breakdown(ap, old=[0, 1], new=[2]) == {"old": 1.0, "new": 0.0, "all": 0.5}


def test_unseen_class_predictions_and_ground_truth_leave_every_number_unchanged():
    targets = [make_target([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 1]), make_target([[5, 5, 25, 25]], [1])]
    preds = [pred([[0, 0, 10, 10], [21, 21, 30, 30]], [0.9, 0.4], [0, 1]), pred([[0, 0, 20, 20]], [0.7], [1])]
    base = class_ap(preds, targets, seen=[0, 1])
    polluted_targets = [make_target(torch.cat([t["boxes"], torch.tensor([[1.0, 1, 30, 30]])]),
                                    torch.cat([t["labels"], torch.tensor([3])])) for t in targets]
    polluted_preds = [pred(torch.cat([p["boxes"], torch.tensor([[0.0, 0, 10, 10]])]).tolist(),
                           p["scores"].tolist() + [0.99], p["labels"].tolist() + [2]) for p in preds]
    assert class_ap(polluted_preds, polluted_targets, seen=[0, 1]) == base
    assert 0 < base[1] < 1  # the case is not trivial: class 1 has a miss and a hit


def test_ignored_boxes_are_neither_true_nor_false_positives():
    targets = [make_target([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 0], ignore=[False, True])]
    with_hit_on_ignored = [pred([[0, 0, 10, 10], [20, 20, 30, 30]], [0.9, 0.95], [0, 0])]
    for convention in CONVENTIONS.values():
        assert class_ap(with_hit_on_ignored, targets, seen=[0], convention=convention) == {0: pytest.approx(1.0)}
    unmatched = [pred([[0, 0, 10, 10], [60, 60, 70, 70]], [0.9, 0.95], [0, 0])]
    assert class_ap(unmatched, targets, seen=[0])[0] < 1.0  # a real false positive does count


def test_all_is_the_class_count_weighted_mean_of_old_and_new():
    ap = {0: 0.9, 1: 0.6, 2: 0.3, 3: 0.2, 4: 0.5}
    b = breakdown(ap, old=[0, 1, 2], new=[3, 4])
    assert b["all"] == pytest.approx((3 * b["old"] + 2 * b["new"]) / 5)
    assert math.isnan(breakdown(ap, old=[], new=[3])["old"])  # no old class: no mean, not 0


def test_coco_convention_averages_over_iou_thresholds():
    targets = [make_target([[0, 0, 10, 10]], [0])]
    loose = [pred([[0, 0, 10, 12]], [0.9], [0])]  # IoU 10/12 = 0.83: a hit at .50-.80, a miss at .85-.95
    assert class_ap(loose, targets, seen=[0])[0] == pytest.approx(1.0)
    assert class_ap(loose, targets, seen=[0], convention=COCO_AP)[0] == pytest.approx(0.7)


# --------------------------------------------------------------------------- a run end to end
@pytest.fixture(scope="module")
def detection_run(tmp_path_factory):
    from clbench.cli import main

    out = tmp_path_factory.mktemp("det")
    code = main(["run", "--strategy", "gfl_finetune", "--scenario", "shapes-2+2", "--accelerator", "cpu", "--quiet",
                 "--set", "epochs=1", "limit_train_batches=2", "--output-dir", str(out)])
    assert code == 0
    (path,) = out.rglob("*.json")
    return out, path


def test_a_run_stores_per_task_ap_and_the_old_new_all_breakdown(detection_run):
    import json

    _, path = detection_run
    data = json.loads(path.read_text())
    det, matrix = data["detection"], data["accuracy_matrix"]
    assert data["scenario_info"]["task_type"] == "detection" and data["backbone"] == "tiny_gfl"
    assert det["metric"] == "AP50" and det["class_names"] == ["disk", "square", "triangle", "cross"]
    assert det["convention"] == "coco101" and det["engine"].startswith("faster-coco-eval")
    assert [t["task"] for t in det["per_task"]] == [0, 1]
    first, last = det["per_task"]
    assert set(first["ap_per_class"]) == {"0", "1"} and set(last["ap_per_class"]) == {"0", "1", "2", "3"}
    assert math.isnan(first["old"]) and first["all"] == pytest.approx(first["new"])
    ap = {int(c): v for c, v in last["ap_per_class"].items()}
    assert last["all"] == pytest.approx(sum(ap.values()) / 4)
    assert last["old"] == pytest.approx((ap[0] + ap[1]) / 2) and last["new"] == pytest.approx((ap[2] + ap[3]) / 2)
    # the matrix row of task i: mean AP over each trained task's classes, 0 for tasks not trained yet
    assert matrix[0] == [pytest.approx(first["all"]), 0.0]
    assert matrix[1] == [pytest.approx(last["old"]), pytest.approx(last["new"])]
    assert data["edge"]["totals"]["train_flops_total"] > 0


def test_the_leaderboard_shows_final_ap_columns_for_detection_runs(detection_run):
    import json

    from clbench.reporting import leaderboard, render

    out, path = detection_run
    last = json.loads(path.read_text())["detection"]["per_task"][-1]
    board = leaderboard.from_dir(out)
    (row,) = board.rows
    assert row.cells["final_ap_all"].mean == pytest.approx(last["all"])
    assert row.cells["final_ap_new"].mean == pytest.approx(last["new"])
    assert "Final AP all" in render.to_markdown(board) and "per-task mean AP" in render.to_markdown(board)


def test_a_backbone_is_refused_for_a_detection_strategy(tmp_path, capsys):
    from clbench.cli import main

    code = main(["run", "--strategy", "gfl_finetune", "--scenario", "shapes-2+2", "--backbone", "resnet18",
                 "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "'resnet18'" in err[0]
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.json"))
