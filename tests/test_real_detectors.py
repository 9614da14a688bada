"""Smoke runs of the incremental detectors at their papers' architectures, through `clbench run`.

Each run goes through the command line (`clbench.cli.main(["run", ...])`) with the real pretrained-weight
path: random-weight checkpoints written by this module into the caches the loaders read (torch.hub's
`checkpoints/resnet50-0676ba61.pth` for GFL R50-FPN's ImageNet backbone, the Hugging Face hub layout for
the COCO-pretrained `SenseTime/deformable-detr` and timm's `resnet50.tv_in1k`). The data are fixtures in
the official on-disk formats, written here at real photo sizes:

- PASCAL VOC 2007 (`VOCdevkit/VOC2007/{Annotations,JPEGImages,ImageSets/Main}`): 500x375 and 375x500
  JPEGs, VOC XML with 1-based pixel boxes and a difficult box;
- MS COCO 2017 (`coco/annotations/instances_{train,val}2017.json`, `train2017/`, `val2017/`): 640x480 and
  480x640 JPEGs, the 80 categories with their official ids, a crowd box.

Every run: two tasks, two training steps each (`limit_train_batches=2`, batch 2, one epoch), images at
shorter side 64 (`image_size=64`, longer at most 107) instead of 800. Checked: the run completes and
writes its result JSON, and each experience's `total_params` is the published model's count with the
stream's classes (GFL R50-FPN: 32,440,537 with COCO's 80 classes, mmdetection's count; Deformable DETR
R50: 40,069,665 with the 91 label ids of the released head, `transformers`' configuration) plus the
method's own parameters (P2IOD's prompt generators), each counted here by hand; frozen teachers are
reported apart (`teacher_params`). P2IOD's and CL-DETR's `--paper-settings` runs train with Deformable
DETR's flip / multi-scale resize / crop (`train_augment=detr_multiscale`). Also here: a missing detector weight file stops the run before any
data is read, and `settings_source` names the flag for the detector fields run flags map onto.

The smoke runs are marked slow.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers", minversion="5.0")

REVISION = "0123456789abcdef0123456789abcdef01234567"
IMAGE = 64  # shorter side of every image as fed (the papers: 800)

# ---------------------------------------------------------------------------- published sizes, by hand
GFL_R50_FPN_COCO = 32_440_537  # mmdetection's gfl_r50_fpn_1x_coco, 80 classes
GFL_CLASS_ROW = 256 * 3 * 3 + 1  # one output channel of the 3x3 class conv on 256 channels
DDETR_R50_COCO = 40_069_665  # SenseTime/deformable-detr, class head over 91 label ids
DDETR_CLASS_ROW = 256 + 1  # one row of the linear class head on d = 256
DECODER_LAYERS, D_MODEL = 6, 256


def gfl_params(classes: int) -> int:
    return GFL_R50_FPN_COCO - (80 - classes) * GFL_CLASS_ROW


def ddetr_params(classes: int) -> int:
    return DDETR_R50_COCO - (91 - classes) * DDETR_CLASS_ROW


def p2iod_prompt_params(length: int, hidden: int) -> int:
    """Per decoder layer a bias-free two-layer MLP d -> hidden -> length * d (keys and values)."""
    return DECODER_LAYERS * (D_MODEL * hidden + hidden * length * D_MODEL)


def test_hand_counts():
    assert gfl_params(80) == 32_440_537 and gfl_params(20) == 32_302_237
    assert ddetr_params(20) == 40_051_418 and ddetr_params(80) == 40_066_838
    assert p2iod_prompt_params(10, 64) == 1_081_344


# ---------------------------------------------------------------------------- fixtures on disk
VOC = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
       "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")


def _jpeg(path: Path, width: int, height: int, seed: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def _voc_xml(path: Path, name: str, width: int, height: int, objects) -> None:
    root = ET.Element("annotation")
    ET.SubElement(root, "filename").text = f"{name}.jpg"
    size = ET.SubElement(root, "size")
    for key, value in (("width", width), ("height", height), ("depth", 3)):
        ET.SubElement(size, key).text = str(value)
    for cls, (x0, y0, x1, y1), difficult in objects:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = cls
        ET.SubElement(obj, "difficult").text = str(int(difficult))
        box = ET.SubElement(obj, "bndbox")
        for key, value in zip(("xmin", "ymin", "xmax", "ymax"), (x0, y0, x1, y1)):
            ET.SubElement(box, key).text = str(value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(root).write(path)


def write_voc(root: Path) -> None:
    """8 trainval images (4 of task 1's classes only, 4 of task 2's only: the absent setting keeps
    them) and 2 test images holding both tasks' classes; voc-10+10's tasks: aeroplane..cow, diningtable..tvmonitor."""
    folder = root / "VOCdevkit" / "VOC2007"
    ids = {"trainval": [], "test": []}
    for i in range(10):
        split = "trainval" if i < 8 else "test"
        name = f"{i:06d}"
        width, height = (500, 375) if i % 2 == 0 else (375, 500)
        if split == "test":
            objects = [(VOC[i % 10], (20, 30, 200, 250), False), (VOC[10 + i % 10], (150, 100, 360, 340), False),
                       (VOC[3], (5, 5, 40, 40), True)]
        else:
            first = VOC[i % 4] if i < 4 else VOC[10 + i % 4]
            objects = [(first, (30 + i, 40, 250, 300), False), (first, (200, 60, 340, 200 + i), False)]
        _voc_xml(folder / "Annotations" / f"{name}.xml", name, width, height, objects)
        _jpeg(folder / "JPEGImages" / f"{name}.jpg", width, height, i)
        ids[split].append(name)
    (folder / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    for split, names in ids.items():
        (folder / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(names) + "\n")


def write_coco(root: Path) -> None:
    """coco-40+40: 8 train images of 10 classes each (4 with classes of task 1 only, 4 with task 2 only),
    2 val images with both tasks' classes and a crowd box; the 80 official category ids."""
    from clbench.scenarios.coco import COCO_CATEGORIES

    folder = root / "coco"
    categories = [{"id": cid, "name": name, "supercategory": "x"} for cid, name in COCO_CATEGORIES]
    for split, n, first in (("train2017", 8, 1), ("val2017", 2, 100)):
        images, annotations = [], []
        for k in range(n):
            image_id = first + k
            width, height = (640, 480) if k % 2 == 0 else (480, 640)
            file_name = f"{image_id:012d}.jpg"
            _jpeg(folder / split / file_name, width, height, image_id)
            images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
            if split == "val2017":
                chosen = [(COCO_CATEGORIES[k][0], 0), (COCO_CATEGORIES[40 + k][0], 0), (COCO_CATEGORIES[5][0], 1)]
            else:  # every class of the task has a box (IOR keeps per-class box statistics of each task)
                chosen = [(COCO_CATEGORIES[10 * k + j][0], 0) for j in range(10)]
            for j, (cid, crowd) in enumerate(chosen):
                box = [20.0 + 40 * j, 30.0 + 20 * j, 120.0 + 5 * j, 90.0 + 3 * j]
                annotations.append({"id": len(annotations) + 1 + 1000 * first, "image_id": image_id, "category_id": cid,
                                    "bbox": box, "area": box[2] * box[3], "iscrowd": crowd})
        (folder / "annotations").mkdir(parents=True, exist_ok=True)
        (folder / "annotations" / f"instances_{split}.json").write_text(
            json.dumps({"images": images, "annotations": annotations, "categories": categories}))


def _hub_snapshot(cache: Path, repo: str) -> Path:
    folder = cache / ("models--" + repo.replace("/", "--"))
    snapshot = folder / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(REVISION)
    return snapshot


def write_weights(torch_home: Path, hub: Path) -> None:
    """Random weights of the three pretrained files, in the caches' own layouts."""
    import timm
    from safetensors.torch import save_file
    from torchvision.models import resnet50

    from clbench.models.detection.deformable_detr import DeformableDETR

    torch.manual_seed(3)
    (torch_home / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(resnet50(weights=None).state_dict(), torch_home / "hub" / "checkpoints" / "resnet50-0676ba61.pth")
    state = {k: v.contiguous() for k, v in timm.create_model("resnet50", pretrained=False).state_dict().items()}
    save_file(state, str(_hub_snapshot(hub, "timm/resnet50.tv_in1k") / "model.safetensors"))
    DeformableDETR(91).hf.save_pretrained(_hub_snapshot(hub, "SenseTime/deformable-detr"))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("real-detectors")
    write_voc(root / "data")
    write_coco(root / "data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(root / "torch"))
        mp.setenv("HF_HUB_CACHE", str(root / "hub"))
        mp.setenv("HF_HUB_OFFLINE", "1")  # nothing may be fetched
        write_weights(root / "torch", root / "hub")
        yield root


def run_cli(env: Path, name: str, strategy: str, scenario: str, *extra: str) -> dict:
    from clbench.cli import main

    out = env / "results" / name
    args = ["run", "--strategy", strategy, "--scenario", scenario, "--data-root", str(env / "data"),
            "--output-dir", str(out), "--quiet", "--epochs", "1", "--batch-size", "2", "--flops", "off",
            "--set", "limit_train_batches=2", f"image_size={IMAGE}", "checkpoint=false", "progress=false", *extra]
    assert main(args) == 0
    (path,) = out.rglob("*.json")
    result = json.loads(path.read_text())
    assert result["status"] == "completed"
    assert len(result["accuracy_matrix"]) == 2 and len(result["detection"]["per_task"]) == 2
    return result


def params(result: dict) -> list[int]:
    return [r["total_params"] for r in result["edge"]["per_experience"]]


def teachers(result: dict) -> list[int | None]:
    return [r.get("teacher_params") for r in result["edge"]["per_experience"]]


# ---------------------------------------------------------------------------- GFL R50-FPN
R50_HEAD = ["fpn_channels=256", "tower_convs=4", "num_levels=5", "reg_max=16", "warmup_iters=2"]


@pytest.mark.slow
def test_gfl_finetune_paper_settings_on_coco(env):
    result = run_cli(env, "gfl_finetune", "gfl_finetune", "coco-40+40", "--paper-settings", "--set", "warmup_iters=2")
    assert result["backbone"] == "r50_fpn_gfl"
    assert params(result) == [gfl_params(40), gfl_params(80)]  # the class conv grows with the seen classes
    sources = result["settings_source"]["strategy_config"]
    assert sources["detector"] == sources["backbone_weights"] == "paper settings"
    assert result["settings_source"]["run_config"]["image_size"] == "set"


@pytest.mark.slow
def test_ior_paper_settings_on_coco_absent(env):
    result = run_cli(env, "ior", "ior", "coco-40+40-absent", "--paper-settings", "--set", "warmup_iters=2",
                     "inversion_steps=2", "images_per_class=1", "canvas_size=64", "max_pastes=1")
    assert params(result) == [gfl_params(40), gfl_params(80)]
    assert teachers(result) == [None, gfl_params(40)]  # the frozen detector of task 1


@pytest.mark.slow
def test_erd_on_voc_with_a_weights_file(env):
    weights = env / "torch" / "hub" / "checkpoints" / "resnet50-0676ba61.pth"
    result = run_cli(env, "erd", "erd", "voc-10+10", "--weights", str(weights), "--set", "detector=r50_fpn", *R50_HEAD)
    assert params(result) == [gfl_params(10), gfl_params(20)]
    assert teachers(result) == [None, gfl_params(10)]
    assert result["strategy_config"]["backbone_weights"] == str(weights)
    assert result["settings_source"]["strategy_config"]["backbone_weights"] == "flag"
    assert result["settings_source"]["strategy_config"]["detector"] == "set"
    assert result["settings_source"]["run_config"]["pretrained"] == "flag"


# ---------------------------------------------------------------------------- Deformable DETR R50
@pytest.mark.slow
def test_p2iod_paper_settings_on_voc(env):
    result = run_cli(env, "p2iod", "p2iod", "voc-10+10", "--paper-settings")
    assert result["backbone"] == "deformable_detr_r50"
    assert params(result) == [ddetr_params(20) + p2iod_prompt_params(10, 64)] * 2
    assert result["settings_source"]["strategy_config"]["base"] == "paper settings"
    assert result["strategy_config"]["train_augment"] == "detr_multiscale"  # Deformable DETR's training pipeline


@pytest.mark.slow
def test_detr_finetune_pretrained_flag_on_voc(env):
    result = run_cli(env, "detr_finetune", "detr_finetune", "voc-10+10", "--pretrained", "--set",
                     "detector=deformable_detr")
    assert params(result) == [ddetr_params(20)] * 2
    assert result["strategy_config"]["base"] == "coco"  # --pretrained: the COCO-pretrained base
    assert result["settings_source"]["strategy_config"]["base"] == "flag"
    assert result["settings_source"]["run_config"]["pretrained"] == "flag"


@pytest.mark.slow
def test_cl_detr_paper_settings_on_coco(env):
    result = run_cli(env, "cl_detr", "cl_detr", "coco-40+40", "--paper-settings", "--set", "calibration_epochs=1")
    assert params(result) == [ddetr_params(80)] * 2
    assert teachers(result) == [None, ddetr_params(80)]
    assert result["strategy_config"]["base"] == "imagenet"
    assert result["strategy_config"]["train_augment"] == "detr_multiscale"


# ---------------------------------------------------------------------------- weights first
@pytest.mark.parametrize("strategy, scenario, extra, named", [
    ("gfl_finetune", "coco-40+40", ["--paper-settings"], "resnet50-0676ba61.pth"),
    ("erd", "voc-10+10", ["--set", "detector=r50_fpn", "--weights", "{tmp}/nowhere.pth"], "nowhere.pth"),
    ("p2iod", "voc-10+10", ["--paper-settings"], "SenseTime/deformable-detr model.safetensors"),
    ("cl_detr", "coco-40+40", ["--paper-settings"], "resnet50.tv_in1k"),
    ("detr_finetune", "voc-10+10", ["--set", "detector=deformable_detr", "--weights", "{tmp}/nowhere"], "nowhere"),
])
def test_missing_detector_weights_stop_the_run_before_any_data(strategy, scenario, extra, named, tmp_path, monkeypatch,
                                                              capsys):
    from clbench.cli import main

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "data").mkdir()  # empty: were the data read first, the error would name the dataset
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    code = main(["run", "--strategy", strategy, "--scenario", scenario, "--data-root", str(tmp_path / "data"),
                 "--output-dir", str(tmp_path / "out"), "--quiet", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert named in err and "Traceback" not in err
    assert not any(word in err for word in ("VOC", "COCO 2017", "VOCdevkit", "instances_"))
    if "--weights" not in extra:
        assert "--download" in err and "clbench download" in err  # how to get the file
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_settings_source_of_flag_mapped_detector_fields():
    """The fields a run flag stands for name that flag; those left alone keep their own source."""
    from clbench.cli import build_parser, spec_from_args
    from clbench.engine.runner import resolve_sources

    def sources(*argv):
        args = build_parser().parse_args(["run", *argv])
        _, cfg, src = resolve_sources(spec_from_args(args, 0))
        return cfg, src

    cfg, src = sources("--strategy", "detr_finetune", "--scenario", "voc-10+10", "--set", "detector=deformable_detr",
                       "base=random", "image_size=96", "--pretrained", "--download")
    assert (cfg.base, cfg.base_download) == ("coco", True)
    assert src["strategy_config"]["base"] == src["strategy_config"]["base_download"] == "flag"
    assert src["strategy_config"]["detector"] == "set" and src["run_config"]["image_size"] == "set"
    cfg, src = sources("--strategy", "gfl_finetune", "--scenario", "coco-40+40", "--paper-settings",
                       "--weights", "w.pth")
    assert cfg.backbone_weights == "w.pth" and src["strategy_config"]["backbone_weights"] == "flag"
    assert src["run_config"]["pretrained"] == "flag" and src["strategy_config"]["lr"] == "paper settings"
    cfg, src = sources("--strategy", "gfl_finetune", "--scenario", "coco-40+40", "--paper-settings")
    assert cfg.backbone_weights == "imagenet" and src["strategy_config"]["backbone_weights"] == "paper settings"
    assert "download_weights" not in src["strategy_config"] or src["strategy_config"]["download_weights"] == "default"
    cfg, src = sources("--strategy", "p2iod", "--scenario", "voc-10+10", "--paper-settings", "--download")
    assert cfg.base == "coco" and src["strategy_config"]["base"] == "paper settings"
    assert src["strategy_config"]["base_download"] == "flag"


@pytest.mark.slow
def test_clbench_download_names_the_detector_weights_it_has(env, capsys):
    from clbench.cli import main

    assert main(["download", "--strategy", "p2iod", "--scenario", "voc-10+10", "--paper-settings",
                 "--data-root", str(env / "data")]) == 0
    out = capsys.readouterr().out.splitlines()
    snapshot = env / "hub" / "models--SenseTime--deformable-detr" / "snapshots" / REVISION
    assert out[0] == f"weights: p2iod's model -> {snapshot}"
    assert out[1].startswith("data: voc-10+10 ready (2 experiences)")
