"""The PASCAL VOC 2007 loader on a ShapesIOD fixture written in VOC's exact on-disk layout.

The eight shapes stand in for eight real VOC classes (by name in the XML); images are padded
to 96x64 so the square resize scales x and y differently (and the aspect-preserving resize,
the scenarios' own, keeps their ratio).
"""

from __future__ import annotations

import pickle

import pytest
import torch
from clbench.scenarios._iod_files import write_voc
from clbench.scenarios.shapes import generate_shapes
from clbench.scenarios.voc import VOC_CLASSES, read_voc

from clbench.config import RunConfig
from clbench.datasets import DetectionDataset, make_target
from clbench.engine.runner import create_scenario
from clbench.errors import DataNotFoundError, UsageError

STAND_INS = ["aeroplane", "bus", "dog", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]  # shape label -> VOC class
WIDTH, HEIGHT = 96, 64


def _padded_with_difficult(n: int, seed: int) -> DetectionDataset:
    """Shapes on a 96x64 canvas (padded on the right); every third box is marked difficult."""
    shapes = generate_shapes(n, size=64, seed=seed)
    images = torch.full((n, 3, HEIGHT, WIDTH), 128, dtype=torch.uint8)
    images[..., :64] = shapes.images
    targets, k = [], 0
    for t in shapes.targets:
        ignore = torch.tensor([(k + j) % 3 == 2 for j in range(len(t["labels"]))])
        k += len(t["labels"])
        targets.append(make_target(t["boxes"], t["labels"], ignore))
    return DetectionDataset(images, targets)


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc")
    train, test = _padded_with_difficult(48, seed=0), _padded_with_difficult(12, seed=1)
    write_voc(train, root / "VOCdevkit", "trainval", STAND_INS)
    write_voc(test, root / "VOCdevkit", "test", STAND_INS, first_id=1000)
    return root, train, test


def test_boxes_labels_and_difficult_round_trip_through_the_xml(voc_root):
    root, train, _ = voc_root
    loaded = read_voc(root / "VOCdevkit" / "VOC2007", "trainval", size=48)
    assert len(loaded) == len(train)
    scale = torch.tensor([48 / WIDTH, 48 / HEIGHT, 48 / WIDTH, 48 / HEIGHT])
    for written, read in zip(train.targets, loaded.targets):
        assert torch.allclose(read["boxes"], written["boxes"] * scale)
        assert read["labels"].tolist() == [VOC_CLASSES.index(STAND_INS[c]) for c in written["labels"].tolist()]
        assert torch.equal(read["ignore"], written["ignore"])  # difficult -> ignore
    assert any(t["ignore"].any() for t in loaded.targets)
    image = loaded.image(0)
    assert image.shape == (3, 48, 48) and 0 <= image.min() and image.max() <= 1


def test_aspect_preserving_read_scales_boxes_by_the_images_own_factor(voc_root):
    root, train, _ = voc_root
    loaded = read_voc(root / "VOCdevkit" / "VOC2007", "trainval", size=32, long=40)
    # 96x64: min(32 / 64, 40 / 96) = 5/12 -> int(96 * 5/12 + .5) = 40 x int(64 * 5/12 + .5) = 27
    assert loaded.image(0).shape == (3, 27, 40)
    factor = torch.tensor([40 / 96, 27 / 64] * 2, dtype=torch.float64)
    for written, read in zip(train.targets, loaded.targets):
        assert torch.equal(read["boxes"], (written["boxes"].double() * factor).float())
    assert torch.equal(loaded.original_scales()[0], torch.tensor([40 / 96, 27 / 64], dtype=torch.float64))


def test_xml_uses_one_based_inclusive_pixel_coordinates(voc_root):
    import xml.etree.ElementTree as ET

    root, train, _ = voc_root
    obj = ET.parse(root / "VOCdevkit" / "VOC2007" / "Annotations" / "000001.xml").getroot().find("object")
    box = [int(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")]
    x0, y0, x1, y1 = (int(v) for v in train.targets[0]["boxes"][0])
    assert box == [x0 + 1, y0 + 1, x1, y1]


def test_registered_scenario_reads_trainval_and_test_in_alphabetical_order(voc_root):
    root, train, test = voc_root
    s = create_scenario("voc-10+10", RunConfig(data_root=str(root), image_size=48))
    assert s.class_names == list(VOC_CLASSES) and s.class_names[10] == "diningtable" and s.increments == [10, 10]
    # aspect-preserving: shorter side 48, longer at most round(48 * 1333 / 800) = 80
    assert s.input_shape == (3, 48, 80) and s.convention.metric == "AP50"
    assert s.test_set.image(0).shape == (3, 48, 72)  # 96x64 -> factor 0.75 -> 72x48
    assert torch.allclose(s.test_set.original_scales(), torch.tensor([[0.75, 0.75]], dtype=torch.float64))
    assert len(s.test_set) == len(test)  # the full test set, every class kept
    for t, task in enumerate(s.train_sets):
        current = set(s.experience_classes(t))
        assert all(set(target["labels"].tolist()) <= current for target in task.targets)
    absent = create_scenario("voc-10+10-absent", RunConfig(data_root=str(root), image_size=48))
    pool = read_voc(root / "VOCdevkit" / "VOC2007", "trainval", size=48)
    assert all(not set(pool.targets[r]["labels"].tolist()) & set(range(10)) for r in absent.train_sets[1].rows)
    many = create_scenario("voc-15+1x5", RunConfig(data_root=str(root), image_size=48))
    assert many.increments == [15, 1, 1, 1, 1, 1]


def test_a_bare_voc2007_folder_is_accepted_and_a_damaged_image_is_named(tmp_path):
    write_voc(_padded_with_difficult(24, seed=2), tmp_path, "trainval", STAND_INS)
    write_voc(_padded_with_difficult(4, seed=5), tmp_path, "test", STAND_INS, first_id=500)  # holds a tvmonitor
    s = create_scenario("voc-19+1", RunConfig(data_root=str(tmp_path), image_size=32))
    assert s.increments == [19, 1] and len(s.test_set) == 4
    loader = pickle.loads(pickle.dumps(s.test_set.images))  # DataLoader workers may pickle it
    assert torch.equal(loader(0), s.test_set.image(0).mul(255).round().byte())
    (tmp_path / "VOC2007" / "JPEGImages" / "000500.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(UsageError, match="000500.jpg"):
        s.test_set.image(0)


def test_missing_data_names_the_path_and_how_to_get_it(tmp_path):
    with pytest.raises(DataNotFoundError) as e:
        create_scenario("voc-10+10", RunConfig(data_root=str(tmp_path)))
    message = str(e.value)
    assert str(tmp_path / "VOCdevkit" / "VOC2007") in message
    assert "VOCtrainval_06-Nov-2007.tar" in message and "ImageSets/Main/test.txt" in message


def test_each_name_carries_its_ap_convention_and_paper_settings_pick_the_papers(voc_root):
    from clbench.engine.runner import paper_settings
    from clbench.registry import STRATEGIES

    root, _, _ = voc_root
    run = RunConfig(data_root=str(root), image_size=48)
    default, voc07 = create_scenario("voc-10+10", run), create_scenario("voc-10+10-absent-voc07", run)
    assert default.convention.name == "coco101" and default.describe()["convention"] == "coco101"
    assert voc07.convention.name == "voc07" and voc07.name == "voc-10+10-absent-voc07" and voc07.setting == "absent"
    assert voc07.convention.metric == default.convention.metric == "AP50"
    # P2IOD reports COCO-API AP50 on VOC: its settings exist for the coco101 names only
    p2iod = STRATEGIES.get("p2iod")
    voc_keys = [k for k in p2iod.PAPER_SETTINGS if k.startswith("voc-")]
    assert voc_keys and not any(k.endswith("-voc07") for k in voc_keys)
    with pytest.raises(UsageError, match=r"voc-10\+10-voc07"):
        paper_settings(p2iod, "voc-10+10-voc07")
    assert all(k.startswith("coco-") for k in STRATEGIES.get("ior").PAPER_SETTINGS)  # IOR: COCO only


def test_an_empty_test_list_is_refused_before_training_naming_the_file(tmp_path, capsys):
    from clbench.cli import main

    write_voc(_padded_with_difficult(24, seed=2), tmp_path, "trainval", STAND_INS)
    write_voc(_padded_with_difficult(4, seed=5), tmp_path, "test", STAND_INS, first_id=500)
    test_list = tmp_path / "VOC2007" / "ImageSets" / "Main" / "test.txt"
    test_list.write_text("")
    code = main(["run", "--strategy", "gfl_finetune", "--scenario", "voc-19+1", "--data-root", str(tmp_path),
                 "--set", "image_size=32", "epochs=1", "--accelerator", "cpu", "--quiet",
                 "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert str(test_list) in err[0] and "lists no image" in err[0] and "4,952" in err[0]
    assert not list((tmp_path / "out").rglob("*.json"))


def test_a_voc07_run_records_its_convention(tmp_path):
    import json

    from clbench.cli import main

    write_voc(_padded_with_difficult(24, seed=2), tmp_path, "trainval", STAND_INS)
    write_voc(_padded_with_difficult(4, seed=5), tmp_path, "test", STAND_INS, first_id=500)
    out = tmp_path / "out"
    code = main(["run", "--strategy", "gfl_finetune", "--scenario", "voc-19+1-voc07", "--data-root", str(tmp_path),
                 "--set", "image_size=32", "epochs=1", "limit_train_batches=1", "--accelerator", "cpu", "--quiet",
                 "--output-dir", str(out)])
    assert code == 0
    (path,) = out.rglob("*.json")
    det = json.loads(path.read_text())["detection"]
    assert det["convention"] == "voc07" and "11-point" in det["convention_description"] and det["metric"] == "AP50"
    last = det["per_task"][-1]
    # the 8 stand-in classes have test boxes, the other 12 VOC classes none: None with a note, never 0
    missing = {c for c, v in last["ap_per_class"].items() if v is None}
    assert len(last["ap_per_class"]) == 20 and len(missing) >= 12 and "left out of every mean" in last["notes"][0]
    assert all(0.0 <= v <= 1.0 for v in last["ap_per_class"].values() if v is not None)
