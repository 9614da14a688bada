"""The MS COCO 2017 loader on a ShapesIOD fixture written in COCO's exact on-disk layout.

The eight shapes stand in for eight real COCO categories spread over the class order, so
every task of the registered splits has images; all 80 categories are written with their
real ids and names.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from clbench.scenarios._iod_files import write_coco
from clbench.scenarios.coco import COCO_CATEGORIES, COCO_CLASSES, read_coco
from clbench.scenarios.shapes import generate_shapes

from clbench.config import RunConfig
from clbench.datasets import DetectionDataset, make_target
from clbench.engine.runner import create_scenario
from clbench.errors import DataNotFoundError, UsageError

# shape label -> position in the COCO class order: each task of every registered split gets one
STAND_INS = [0, 39, 40, 49, 50, 59, 60, 79]
COCO_IDS = [c for c, _ in COCO_CATEGORIES]


def _as_coco(n: int, seed: int) -> DetectionDataset:
    """Shapes relabelled to COCO positions; every fourth box is a crowd box."""
    shapes = generate_shapes(n, size=64, seed=seed)
    targets, k = [], 0
    for t in shapes.targets:
        crowd = torch.tensor([(k + j) % 4 == 3 for j in range(len(t["labels"]))])
        k += len(t["labels"])
        targets.append(make_target(t["boxes"], [STAND_INS[c] for c in t["labels"].tolist()], crowd))
    return DetectionDataset(shapes.images, targets)


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cocoroot")
    train, val = _as_coco(40, seed=0), _as_coco(10, seed=2)  # every stand-in has a non-crowd val box
    write_coco(train, root / "coco", "train2017", COCO_CLASSES, category_ids=COCO_IDS)
    write_coco(val, root / "coco", "val2017", COCO_CLASSES, category_ids=COCO_IDS, first_image_id=900)
    return root, train, val


def test_class_order_is_ascending_category_id_with_the_cards_boundaries():
    assert [c for c, _ in COCO_CATEGORIES] == sorted(c for c, _ in COCO_CATEGORIES) and len(COCO_CLASSES) == 80
    assert (COCO_CLASSES[39], COCO_CLASSES[40]) == ("bottle", "wine glass")
    assert (COCO_CLASSES[49], COCO_CLASSES[59], COCO_CLASSES[69], COCO_CLASSES[70]) == ("orange", "bed", "oven", "toaster")


def test_boxes_labels_crowd_and_pixels_round_trip(coco_root):
    root, train, _ = coco_root
    loaded = read_coco(root / "coco", "train2017", size=64)
    assert len(loaded) == len(train)
    for written, read in zip(train.targets, loaded.targets):
        assert torch.equal(read["boxes"], written["boxes"])
        assert torch.equal(read["labels"], written["labels"])
        assert torch.equal(read["ignore"], written["ignore"])  # iscrowd -> ignore
    assert any(t["ignore"].any() for t in loaded.targets)
    assert torch.equal(loaded.image(3), train.image(3))  # PNG, no resize at 64: the same pixels
    half = read_coco(root / "coco", "train2017", size=32)
    assert torch.allclose(half.targets[0]["boxes"], train.targets[0]["boxes"] / 2)
    assert half.image(0).shape == (3, 32, 32)


def test_json_holds_one_based_real_category_ids_and_xywh_boxes(coco_root):
    root, train, _ = coco_root
    data = json.loads((root / "coco" / "annotations" / "instances_train2017.json").read_text())
    assert [c["id"] for c in data["categories"]] == COCO_IDS
    first = data["annotations"][0]
    x0, y0, x1, y1 = train.targets[0]["boxes"][0].tolist()
    assert first["bbox"] == [x0, y0, x1 - x0, y1 - y0] and first["area"] == (x1 - x0) * (y1 - y0)
    assert first["category_id"] == COCO_IDS[int(train.targets[0]["labels"][0])]


def test_registered_scenarios_cut_tasks_from_the_pool(coco_root):
    root, _, val = coco_root
    run = RunConfig(data_root=str(root), image_size=64)
    s = create_scenario("coco-40+40", run)
    assert s.increments == [40, 40] and s.class_names == list(COCO_CLASSES) and s.convention.metric == "AP"
    assert len(s.test_set) == len(val)
    for t, task in enumerate(s.train_sets):
        assert all(set(x["labels"].tolist()) <= set(s.experience_classes(t)) for x in task.targets)
    pool = read_coco(root / "coco", "train2017", size=64)
    absent = create_scenario("coco-40+10+10+10+10-absent", run)
    assert absent.num_experiences == 5
    for t in range(1, 5):
        earlier = set(range(sum(absent.increments[:t])))
        assert all(not set(pool.targets[r]["labels"].tolist()) & earlier for r in absent.train_sets[t].rows)


def test_missing_data_and_a_foreign_category_list_are_clear_errors(tmp_path):
    with pytest.raises(DataNotFoundError) as e:
        create_scenario("coco-70+10", RunConfig(data_root=str(tmp_path)))
    assert str(tmp_path / "coco") in str(e.value) and "annotations/instances_train2017.json" in str(e.value)
    assert "cocodataset.org" in str(e.value)
    shapes = generate_shapes(4, seed=0)
    write_coco(shapes, tmp_path / "coco", "train2017", ["disk", "square", "triangle", "cross", "ring", "diamond", "frame", "x-mark"])
    with pytest.raises(UsageError, match="80 COCO 2017 categories"):
        read_coco(tmp_path / "coco", "train2017", size=64)
    with pytest.raises(UsageError, match="fixed class order"):
        create_scenario("coco-70+10", RunConfig(data_root=str(tmp_path), class_order="seed:1"))


def test_a_val_file_without_images_is_refused_before_training_naming_the_file(coco_root, tmp_path, capsys):
    import shutil

    from clbench.cli import main

    root, _, _ = coco_root
    shutil.copytree(root / "coco" / "annotations", tmp_path / "coco" / "annotations")
    (tmp_path / "coco" / "train2017").symlink_to(root / "coco" / "train2017")
    (tmp_path / "coco" / "val2017").mkdir()
    val = tmp_path / "coco" / "annotations" / "instances_val2017.json"
    data = json.loads(val.read_text())
    val.write_text(json.dumps({**data, "images": [], "annotations": []}))
    code = main(["run", "--strategy", "gfl_finetune", "--scenario", "coco-40+40", "--data-root", str(tmp_path),
                 "--set", "image_size=32", "epochs=1", "--accelerator", "cpu", "--quiet",
                 "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert str(val) in err[0] and "has no image" in err[0] and "5,000" in err[0]
    assert not list((tmp_path / "out").rglob("*.json"))


def test_the_coco_scenarios_report_cocoeval_ap_over_ten_iou_thresholds(coco_root):
    root, _, _ = coco_root
    s = create_scenario("coco-70+10", RunConfig(data_root=str(root), image_size=64))
    assert s.convention.name == "coco" and s.convention.ignored == "crowd"
    assert list(s.convention.iou_thresholds) == np.linspace(0.5, 0.95, 10).tolist()  # pycocotools' float64 grid
