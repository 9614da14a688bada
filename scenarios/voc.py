"""PASCAL VOC 2007 incremental detection: train on trainval (5,011 images), evaluate on test (4,952).

Files: `<data root>/VOCdevkit/VOC2007/` (or `<data root>/VOC2007/`) as extracted from the
official trainval and test tarballs: `Annotations/*.xml`, `JPEGImages/*.jpg` and
`ImageSets/Main/{trainval,test}.txt`. Classes are in the standard alphabetical order
(`VOC_CLASSES`, aeroplane ... tvmonitor); "difficult" objects travel as ignored boxes.

Images are decoded on demand and resized keeping their aspect ratio: shorter side 800, longer
side at most 1333 (mmdetection's `Resize(img_scale=(1333, 800), keep_ratio=True)`, the test scale of
DETR / Deformable DETR, used on VOC by the DETR-based codebases P2IOD variant (a) and CL-DETR
build on, and the 800 / 1333 default of maskrcnn-benchmark, which the Faster ILOD lineage uses);
`--set image_size=N` makes the shorter side N and the cap `round(N * 1333 / 800)`. Boxes are
scaled by the same per-axis factors; evaluation scales predictions and ground truth back to the
original image's pixels. Batches of images of different sizes are padded (`detection_collate`).

Names: `voc-<split>` (standard setting) and `voc-<split>-absent` (IOR's absent setting). A
split lists the classes per task joined by `+`; `MxN` stands for N tasks of M classes (the
IOD papers' notation, `parse_split`). So the literature's 15-1 (15 + five 1-class tasks) is
`voc-15+1x5`, 10-2 (10 + five 2-class tasks) is `voc-10+2x5` and 10-1 is `voc-10+1x10`.

AP convention (`clbench.tasks.detection.APConvention`): the plain names report `coco101`,
COCO-style 101-point AP50 with difficult boxes ignored (what P2IOD and the DETR-based codebases
report on VOC); the names ending in `-voc07` (`voc-10+10-voc07`, `voc-10+10-absent-voc07`, ...)
report `voc07`, the VOC 2007 11-point AP50 of the Faster R-CNN lineage (ILOD, Faster ILOD).
The two are different numbers for the same detections: compare a result only with results of
the same convention (`result.detection["convention"]`).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import torch
from clbench.scenarios import _files
from clbench.scenarios._detection import (
    DetectionScenario,
    detection_scenario,
    parse_split,
)
from clbench.scenarios._images import image_size
from clbench.scenarios._iod_files import ResizedImages, fixed_class_order, long_side_cap, scale_boxes
from clbench.scenarios.base import ScenarioOptions, data_root

from clbench.datasets import DetectionDataset, make_target
from clbench.errors import UsageError
from clbench.registry import register_scenario
from clbench.tasks.detection import CONVENTIONS

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
DEFAULT_SIZE = 800  # the shorter side; the longer at most long_side_cap(800) = 1333
HOW_TO_GET = ("download VOCtrainval_06-Nov-2007.tar and VOCtest_06-Nov-2007.tar from the PASCAL VOC 2007 page "
              "(http://host.robots.ox.ac.uk/pascal/VOC/voc2007/) and extract both into {root} "
              "(they create VOCdevkit/VOC2007)")
OFFICIAL_COUNTS = {"trainval": "5,011", "test": "4,952"}
EXPECTED = ("Annotations", "JPEGImages", "ImageSets/Main/trainval.txt", "ImageSets/Main/test.txt")


def voc_folder(root: Path) -> Path:
    """`<root>/VOCdevkit/VOC2007`, or `<root>/VOC2007` when only that one exists."""
    devkit, bare = root / "VOCdevkit" / "VOC2007", root / "VOC2007"
    return bare if bare.is_dir() and not devkit.is_dir() else devkit


def read_voc(folder: Path, image_set: str, size: int, long: int | None = None) -> DetectionDataset:
    """The images listed in `ImageSets/Main/<image_set>.txt`, decoded lazily with shorter side
    `size` and longer side at most `long` (aspect kept; `long` None: a `size` x `size` square),
    with targets in the alphabetical class order (difficult -> ignore) in the resized pixels."""
    how = HOW_TO_GET.format(root=folder.parent.parent if folder.parent.name == "VOCdevkit" else folder.parent)
    _files.require(folder, EXPECTED, dataset="PASCAL VOC 2007", how=how)
    list_file = folder / "ImageSets" / "Main" / f"{image_set}.txt"
    ids = _files.read_names(list_file)
    if not ids:
        raise UsageError(f"{list_file} lists no image; expected one image id per line "
                         f"(the official {image_set}.txt lists {OFFICIAL_COUNTS.get(image_set, 'thousands of')} ids)")
    position = {name: i for i, name in enumerate(VOC_CLASSES)}
    paths, sizes, targets, boxes_read = [], [], [], []
    for image_id in ids:
        xml_path = folder / "Annotations" / f"{image_id}.xml"
        if not xml_path.is_file():
            raise _files.missing_error(folder / "Annotations", [f"{image_id}.xml"], dataset="PASCAL VOC 2007", how=how)
        try:
            annotation = ET.parse(xml_path).getroot()
            width, height = (int(annotation.findtext(f"size/{k}")) for k in ("width", "height"))
            boxes, labels, ignore = [], [], []
            for obj in annotation.iter("object"):
                name = obj.findtext("name", "").strip()
                if name not in position:
                    raise UsageError(f"{xml_path} has an object of class {name!r}, which is not a VOC class")
                box = obj.find("bndbox")
                x0, y0, x1, y1 = (float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
                boxes.append([x0 - 1, y0 - 1, x1, y1])  # 1-based inclusive pixels -> pixel edges
                labels.append(position[name])
                ignore.append(int(obj.findtext("difficult", "0").strip() or 0) == 1)
        except UsageError:
            raise
        except (ET.ParseError, TypeError, ValueError, AttributeError) as e:  # a damaged or foreign file
            raise UsageError(f"{xml_path} is not a valid VOC annotation ({type(e).__name__}: {e}); {how}") from None
        file_name = annotation.findtext("filename") or f"{image_id}.jpg"
        paths.append(str(folder / "JPEGImages" / file_name.strip()))
        sizes.append((width, height))
        boxes_read.append((torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), labels, ignore))
    images = ResizedImages(paths, sizes, size, long)
    for row, (pixels, labels, ignore) in enumerate(boxes_read):
        targets.append(make_target(scale_boxes(pixels, *sizes[row], *images.output_size(row)), labels, ignore))
    return DetectionDataset(images, targets, scales=images.scales())


def voc_scenario(split: str, setting: str, options: ScenarioOptions, convention: str = "coco101") -> DetectionScenario:
    fixed_class_order(options.class_order, "PASCAL VOC")
    ap = CONVENTIONS[convention]
    increments = parse_split(split)
    size = image_size(options.image_size, DEFAULT_SIZE)
    folder = voc_folder(data_root(options))
    long = long_side_cap(size)
    train, test = read_voc(folder, "trainval", size, long), read_voc(folder, "test", size, long)
    return detection_scenario(
        f"voc-{split}" + ("-absent" if setting == "absent" else "") + ("-voc07" if convention == "voc07" else ""),
        train, test, increments=increments,
        class_names=list(VOC_CLASSES), setting=setting, input_shape=(3, size, long), convention=ap,
        meta={"source": f"PASCAL VOC 2007 ({folder}): trainval for training, test for evaluation",
              "image_size": size, "max_size": long,
              "resize": f"aspect-preserving: shorter side {size}, longer at most {long} (mmdetection's keep_ratio "
                        f"rule); boxes scaled per axis; batches padded to a multiple of 32; AP in original pixels",
              "difficult": "ignored boxes (neither true nor false positives)"},
    )


@register_scenario("voc-19+1")
def voc_19_1(options: ScenarioOptions) -> DetectionScenario:
    """PASCAL VOC 2007 19+1 (new: tvmonitor), standard setting."""
    return voc_scenario("19+1", "standard", options)


@register_scenario("voc-19+1-absent")
def voc_19_1_absent(options: ScenarioOptions) -> DetectionScenario:
    """PASCAL VOC 2007 19+1, absent setting."""
    return voc_scenario("19+1", "absent", options)


@register_scenario("voc-15+5")
def voc_15_5(options: ScenarioOptions) -> DetectionScenario:
    """PASCAL VOC 2007 15+5 (new: pottedplant ... tvmonitor), standard setting."""
    return voc_scenario("15+5", "standard", options)


@register_scenario("voc-15+5-absent")
def voc_15_5_absent(options: ScenarioOptions) -> DetectionScenario:
    """PASCAL VOC 2007 15+5, absent setting."""
    return voc_scenario("15+5", "absent", options)


@register_scenario("voc-10+10")
def voc_10_10(options: ScenarioOptions) -> DetectionScenario:
    """PASCAL VOC 2007 10+10 (new: diningtable ... tvmonitor), standard setting."""
    return voc_scenario("10+10", "standard", options)


@register_scenario("voc-10+10-absent")
def voc_10_10_absent(options: ScenarioOptions) -> DetectionScenario:
    """PASCAL VOC 2007 10+10, absent setting."""
    return voc_scenario("10+10", "absent", options)


@register_scenario("voc-5+15")
def voc_5_15(options: ScenarioOptions) -> DetectionScenario:
    """PASCAL VOC 2007 5+15, standard setting."""
    return voc_scenario("5+15", "standard", options)


@register_scenario("voc-5+15-absent")
def voc_5_15_absent(options: ScenarioOptions) -> DetectionScenario:
    """PASCAL VOC 2007 5+15, absent setting."""
    return voc_scenario("5+15", "absent", options)


@register_scenario("voc-10+5+5")
def voc_10_5_5(options: ScenarioOptions) -> DetectionScenario:
    """PASCAL VOC 2007 10+5+5 (three tasks), standard setting."""
    return voc_scenario("10+5+5", "standard", options)


@register_scenario("voc-10+5+5-absent")
def voc_10_5_5_absent(options: ScenarioOptions) -> DetectionScenario:
    """PASCAL VOC 2007 10+5+5, absent setting."""
    return voc_scenario("10+5+5", "absent", options)


@register_scenario("voc-5+5+5+5")
def voc_5_5_5_5(options: ScenarioOptions) -> DetectionScenario:
    """PASCAL VOC 2007 5+5+5+5 (four tasks), standard setting."""
    return voc_scenario("5+5+5+5", "standard", options)


@register_scenario("voc-5+5+5+5-absent")
def voc_5_5_5_5_absent(options: ScenarioOptions) -> DetectionScenario:
    """PASCAL VOC 2007 5+5+5+5, absent setting."""
    return voc_scenario("5+5+5+5", "absent", options)


@register_scenario("voc-15+1x5")
def voc_15_1x5(options: ScenarioOptions) -> DetectionScenario:
    """PASCAL VOC 2007 15-1: 15 classes, then 5 tasks of 1 class (15+1+1+1+1+1), standard setting."""
    return voc_scenario("15+1x5", "standard", options)


@register_scenario("voc-15+1x5-absent")
def voc_15_1x5_absent(options: ScenarioOptions) -> DetectionScenario:
    """PASCAL VOC 2007 15-1 (15+1+1+1+1+1), absent setting."""
    return voc_scenario("15+1x5", "absent", options)


@register_scenario("voc-10+2x5")
def voc_10_2x5(options: ScenarioOptions) -> DetectionScenario:
    """PASCAL VOC 2007 10-2: 10 classes, then 5 tasks of 2 classes, standard setting."""
    return voc_scenario("10+2x5", "standard", options)


@register_scenario("voc-10+2x5-absent")
def voc_10_2x5_absent(options: ScenarioOptions) -> DetectionScenario:
    """PASCAL VOC 2007 10-2 (10 + 5 tasks of 2 classes), absent setting."""
    return voc_scenario("10+2x5", "absent", options)


@register_scenario("voc-10+1x10")
def voc_10_1x10(options: ScenarioOptions) -> DetectionScenario:
    """PASCAL VOC 2007 10-1: 10 classes, then 10 tasks of 1 class, standard setting."""
    return voc_scenario("10+1x10", "standard", options)


@register_scenario("voc-10+1x10-absent")
def voc_10_1x10_absent(options: ScenarioOptions) -> DetectionScenario:
    """PASCAL VOC 2007 10-1 (10 + 10 tasks of 1 class), absent setting."""
    return voc_scenario("10+1x10", "absent", options)

# ------------------------------------------------------------------ the VOC 2007 metric (11-point AP50)


@register_scenario("voc-19+1-voc07")
def voc_19_1_voc07(options: ScenarioOptions) -> DetectionScenario:
    """PASCAL VOC 2007 19+1 (new: tvmonitor), standard setting, VOC07 11-point AP50."""
    return voc_scenario("19+1", "standard", options, convention="voc07")


@register_scenario("voc-19+1-absent-voc07")
def voc_19_1_absent_voc07(options: ScenarioOptions) -> DetectionScenario:
    """PASCAL VOC 2007 19+1 (new: tvmonitor), absent setting, VOC07 11-point AP50."""
    return voc_scenario("19+1", "absent", options, convention="voc07")


@register_scenario("voc-15+5-voc07")
def voc_15_5_voc07(options: ScenarioOptions) -> DetectionScenario:
    """PASCAL VOC 2007 15+5, standard setting, VOC07 11-point AP50."""
    return voc_scenario("15+5", "standard", options, convention="voc07")


@register_scenario("voc-15+5-absent-voc07")
def voc_15_5_absent_voc07(options: ScenarioOptions) -> DetectionScenario:
    """PASCAL VOC 2007 15+5, absent setting, VOC07 11-point AP50."""
    return voc_scenario("15+5", "absent", options, convention="voc07")


@register_scenario("voc-10+10-voc07")
def voc_10_10_voc07(options: ScenarioOptions) -> DetectionScenario:
    """PASCAL VOC 2007 10+10, standard setting, VOC07 11-point AP50."""
    return voc_scenario("10+10", "standard", options, convention="voc07")


@register_scenario("voc-10+10-absent-voc07")
def voc_10_10_absent_voc07(options: ScenarioOptions) -> DetectionScenario:
    """PASCAL VOC 2007 10+10, absent setting, VOC07 11-point AP50."""
    return voc_scenario("10+10", "absent", options, convention="voc07")


@register_scenario("voc-5+15-voc07")
def voc_5_15_voc07(options: ScenarioOptions) -> DetectionScenario:
    """PASCAL VOC 2007 5+15, standard setting, VOC07 11-point AP50."""
    return voc_scenario("5+15", "standard", options, convention="voc07")


@register_scenario("voc-5+15-absent-voc07")
def voc_5_15_absent_voc07(options: ScenarioOptions) -> DetectionScenario:
    """PASCAL VOC 2007 5+15, absent setting, VOC07 11-point AP50."""
    return voc_scenario("5+15", "absent", options, convention="voc07")


@register_scenario("voc-10+5+5-voc07")
def voc_10_5_5_voc07(options: ScenarioOptions) -> DetectionScenario:
    """PASCAL VOC 2007 10+5+5, standard setting, VOC07 11-point AP50."""
    return voc_scenario("10+5+5", "standard", options, convention="voc07")


@register_scenario("voc-10+5+5-absent-voc07")
def voc_10_5_5_absent_voc07(options: ScenarioOptions) -> DetectionScenario:
    """PASCAL VOC 2007 10+5+5, absent setting, VOC07 11-point AP50."""
    return voc_scenario("10+5+5", "absent", options, convention="voc07")


@register_scenario("voc-5+5+5+5-voc07")
def voc_5_5_5_5_voc07(options: ScenarioOptions) -> DetectionScenario:
    """PASCAL VOC 2007 5+5+5+5, standard setting, VOC07 11-point AP50."""
    return voc_scenario("5+5+5+5", "standard", options, convention="voc07")


@register_scenario("voc-5+5+5+5-absent-voc07")
def voc_5_5_5_5_absent_voc07(options: ScenarioOptions) -> DetectionScenario:
    """PASCAL VOC 2007 5+5+5+5, absent setting, VOC07 11-point AP50."""
    return voc_scenario("5+5+5+5", "absent", options, convention="voc07")


@register_scenario("voc-15+1x5-voc07")
def voc_15_1x5_voc07(options: ScenarioOptions) -> DetectionScenario:
    """PASCAL VOC 2007 15-1 (15+1+1+1+1+1), standard setting, VOC07 11-point AP50."""
    return voc_scenario("15+1x5", "standard", options, convention="voc07")


@register_scenario("voc-15+1x5-absent-voc07")
def voc_15_1x5_absent_voc07(options: ScenarioOptions) -> DetectionScenario:
    """PASCAL VOC 2007 15-1 (15+1+1+1+1+1), absent setting, VOC07 11-point AP50."""
    return voc_scenario("15+1x5", "absent", options, convention="voc07")


@register_scenario("voc-10+2x5-voc07")
def voc_10_2x5_voc07(options: ScenarioOptions) -> DetectionScenario:
    """PASCAL VOC 2007 10-2 (10 + 5 tasks of 2 classes), standard setting, VOC07 11-point AP50."""
    return voc_scenario("10+2x5", "standard", options, convention="voc07")


@register_scenario("voc-10+2x5-absent-voc07")
def voc_10_2x5_absent_voc07(options: ScenarioOptions) -> DetectionScenario:
    """PASCAL VOC 2007 10-2 (10 + 5 tasks of 2 classes), absent setting, VOC07 11-point AP50."""
    return voc_scenario("10+2x5", "absent", options, convention="voc07")


@register_scenario("voc-10+1x10-voc07")
def voc_10_1x10_voc07(options: ScenarioOptions) -> DetectionScenario:
    """PASCAL VOC 2007 10-1 (10 + 10 tasks of 1 class), standard setting, VOC07 11-point AP50."""
    return voc_scenario("10+1x10", "standard", options, convention="voc07")


@register_scenario("voc-10+1x10-absent-voc07")
def voc_10_1x10_absent_voc07(options: ScenarioOptions) -> DetectionScenario:
    """PASCAL VOC 2007 10-1 (10 + 10 tasks of 1 class), absent setting, VOC07 11-point AP50."""
    return voc_scenario("10+1x10", "absent", options, convention="voc07")
