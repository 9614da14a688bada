"""MS COCO 2017 incremental detection: train on train2017 (118k images), evaluate on val2017 (5k).

Files: `<data root>/coco/annotations/instances_{train,val}2017.json` and the image folders
`<data root>/coco/train2017/`, `<data root>/coco/val2017/`, as extracted from the official
zips. The class order is ascending category id (person, bicycle, car, ..., toothbrush:
`COCO_CATEGORIES`), never the alphabetical order an older codebase used. Crowd boxes
(`iscrowd: 1`) travel as ignored boxes; images without annotations stay in the pool (no task
keeps them) and in the test set.

Images are decoded on demand and resized keeping their aspect ratio: shorter side 800, longer
side at most 1333 (mmdetection's `Resize(img_scale=(1333, 800), keep_ratio=True)` of the GFL /
IOR / ERD configs, and Deformable DETR's test scale); `--set image_size=N` makes the shorter side N
and the cap `round(N * 1333 / 800)`. Boxes are scaled by the same per-axis factors; evaluation
scales predictions and ground truth back to the original image's pixels. Batches of images of
different sizes are padded (`detection_collate`).

AP convention `coco` (`clbench.tasks.detection.COCO_AP`): per-class COCOeval AP averaged over
IoU .50:.05:.95, 101 recall points, 100 detections per image, crowd boxes under COCO's crowd
rule, from one faster-coco-eval pass (pycocotools' numbers).

Names: `coco-<split>` (standard setting) and `coco-<split>-absent` (IOR's absent setting), for
40+40, 50+30, 60+20, 70+10, 40+20+20 and 40+10+10+10+10.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from clbench.scenarios import _files
from clbench.scenarios._detection import (
    DetectionScenario,
    detection_scenario,
    parse_split,
)
from clbench.scenarios._images import image_size
from clbench.scenarios._iod_files import ResizedImages, fixed_class_order, long_side_cap
from clbench.scenarios.base import ScenarioOptions, data_root

from clbench.datasets import DetectionDataset
from clbench.errors import UsageError
from clbench.registry import register_scenario
from clbench.tasks.detection import COCO_AP

# (category id, name) of the 80 COCO 2017 categories in ascending id order: the class order
COCO_CATEGORIES = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"), (7, "train"),
    (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"), (13, "stop sign"),
    (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"), (18, "dog"), (19, "horse"), (20, "sheep"),
    (21, "cow"), (22, "elephant"), (23, "bear"), (24, "zebra"), (25, "giraffe"), (27, "backpack"),
    (28, "umbrella"), (31, "handbag"), (32, "tie"), (33, "suitcase"), (34, "frisbee"), (35, "skis"),
    (36, "snowboard"), (37, "sports ball"), (38, "kite"), (39, "baseball bat"), (40, "baseball glove"),
    (41, "skateboard"), (42, "surfboard"), (43, "tennis racket"), (44, "bottle"), (46, "wine glass"), (47, "cup"),
    (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"), (52, "banana"), (53, "apple"), (54, "sandwich"),
    (55, "orange"), (56, "broccoli"), (57, "carrot"), (58, "hot dog"), (59, "pizza"), (60, "donut"), (61, "cake"),
    (62, "chair"), (63, "couch"), (64, "potted plant"), (65, "bed"), (67, "dining table"), (70, "toilet"),
    (72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"), (76, "keyboard"), (77, "cell phone"),
    (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"), (82, "refrigerator"), (84, "book"),
    (85, "clock"), (86, "vase"), (87, "scissors"), (88, "teddy bear"), (89, "hair drier"), (90, "toothbrush"),
)
COCO_CLASSES = tuple(name for _, name in COCO_CATEGORIES)
DEFAULT_SIZE = 800  # the shorter side; the longer at most long_side_cap(800) = 1333
OFFICIAL_COUNTS = {"train2017": "118,287", "val2017": "5,000"}
HOW_TO_GET = ("download 2017 Train images, 2017 Val images and 2017 Train/Val annotations from "
              "https://cocodataset.org/#download and extract them into {folder} "
              "(giving annotations/, train2017/ and val2017/)")


def coco_folder(root: Path) -> Path:
    return root / "coco"


def read_coco(folder: Path, split: str, size: int, long: int | None = None) -> DetectionDataset:
    """The images of `annotations/instances_<split>.json` in ascending image id, decoded lazily
    with shorter side `size` and longer side at most `long` (aspect kept; `long` None: a `size` x
    `size` square), with labels in ascending category-id order (crowd -> ignore)."""
    how = HOW_TO_GET.format(folder=folder)
    _files.require(folder, [f"annotations/instances_{split}.json", split], dataset="MS COCO 2017", how=how)
    path = folder / "annotations" / f"instances_{split}.json"
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        categories = sorted((int(c["id"]), c["name"]) for c in data["categories"])
        images = sorted(data["images"], key=lambda im: int(im["id"]))
        annotations = data["annotations"]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is not a COCO instances file ({type(e).__name__}: {e}); {how}") from None
    if tuple(categories) != COCO_CATEGORIES:
        ids = [c for c, _ in categories]
        raise UsageError(f"{path} has {len(categories)} categories (ids {ids[:5]}...), expected the 80 COCO 2017 "
                         f"categories with their standard ids and names; {how}")
    if not images:
        raise UsageError(f"{path} has no image; expected the {split} images ({OFFICIAL_COUNTS.get(split, 'thousands')} "
                         f"in the official file) in its 'images' list")
    try:
        paths = [str(folder / split / image["file_name"]) for image in images]
        sizes = [(int(image["width"]), int(image["height"])) for image in images]
        loader = ResizedImages(paths, sizes, size, long)
        scales = loader.scales()
        targets = _targets(images, annotations, scales.numpy())
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        raise UsageError(f"{path} has malformed annotations ({type(e).__name__}: {e}); {how}") from None
    return DetectionDataset(loader, targets, scales=scales)


def _targets(images: list[dict], annotations: list[dict], scale: np.ndarray) -> list[dict[str, torch.Tensor]]:
    """One target per image (in the order of `images`), boxes times the image's `(x, y)` factor
    `scale[i]`, built with whole-array operations: the 860k annotations of train2017 take a few
    seconds this way, minutes one by one."""
    image_ids = np.array([int(im["id"]) for im in images], dtype=np.int64)  # ascending
    scale = np.asarray(scale, dtype=np.float64).reshape(-1, 2)
    n = len(annotations)
    owner = np.fromiter((a["image_id"] for a in annotations), dtype=np.int64, count=n)
    category = np.fromiter((a["category_id"] for a in annotations), dtype=np.int64, count=n)
    crowd = np.fromiter((bool(a.get("iscrowd", 0)) for a in annotations), dtype=bool, count=n)
    xywh = np.array([a["bbox"] for a in annotations], dtype=np.float64).reshape(n, 4)
    row = np.searchsorted(image_ids, owner)
    if n and (row.max() >= len(image_ids) or not np.array_equal(image_ids[row], owner)):
        raise ValueError("an annotation refers to an image id that is not in the images list")
    position = np.full(max(c for c, _ in COCO_CATEGORIES) + 1, -1, dtype=np.int64)
    position[[c for c, _ in COCO_CATEGORIES]] = np.arange(len(COCO_CATEGORIES))
    if n and (category.max() >= len(position) or category.min() < 0 or (position[category] < 0).any()):
        raise ValueError("an annotation has a category id outside the 80 COCO categories")
    keep = (xywh[:, 2] > 0) & (xywh[:, 3] > 0)  # a handful of degenerate boxes in the official files
    row, category, crowd, xywh = row[keep], category[keep], crowd[keep], xywh[keep]
    order = np.argsort(row, kind="stable")  # annotations grouped by image, in file order within one
    row, category, crowd, xywh = row[order], category[order], crowd[order], xywh[order]
    xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1) * np.tile(scale[row], 2)
    boxes = torch.from_numpy(xyxy.astype(np.float32))
    labels = torch.from_numpy(position[category])
    ignore = torch.from_numpy(crowd)
    bounds = np.searchsorted(row, np.arange(len(images) + 1)).tolist()
    # clones, not views: a saved or pickled target must not carry every image's boxes along
    return [{"boxes": boxes[a:b].clone(), "labels": labels[a:b].clone(), "ignore": ignore[a:b].clone()}
            for a, b in zip(bounds[:-1], bounds[1:])]


def coco_scenario(split: str, setting: str, options: ScenarioOptions) -> DetectionScenario:
    fixed_class_order(options.class_order, "MS COCO")
    increments = parse_split(split)
    size = image_size(options.image_size, DEFAULT_SIZE)
    folder = coco_folder(data_root(options))
    long = long_side_cap(size)
    train, test = read_coco(folder, "train2017", size, long), read_coco(folder, "val2017", size, long)
    return detection_scenario(
        f"coco-{split}" + ("-absent" if setting == "absent" else ""), train, test, increments=increments,
        class_names=list(COCO_CLASSES), setting=setting, input_shape=(3, size, long), convention=COCO_AP,
        meta={"source": f"MS COCO 2017 ({folder}): train2017 for training, val2017 for evaluation",
              "image_size": size, "max_size": long,
              "resize": f"aspect-preserving: shorter side {size}, longer at most {long} (mmdetection's keep_ratio "
                        f"rule); boxes scaled per axis; batches padded to a multiple of 32; AP in original pixels",
              "class_order_rule": "ascending COCO category id", "crowd": "ignored boxes"},
    )


@register_scenario("coco-40+40")
def coco_40_40(options: ScenarioOptions) -> DetectionScenario:
    """MS COCO 2017 40+40 (first task ends at bottle), standard setting."""
    return coco_scenario("40+40", "standard", options)


@register_scenario("coco-40+40-absent")
def coco_40_40_absent(options: ScenarioOptions) -> DetectionScenario:
    """MS COCO 2017 40+40, absent setting (IOR)."""
    return coco_scenario("40+40", "absent", options)


@register_scenario("coco-50+30")
def coco_50_30(options: ScenarioOptions) -> DetectionScenario:
    """MS COCO 2017 50+30 (first task ends at orange), standard setting."""
    return coco_scenario("50+30", "standard", options)


@register_scenario("coco-50+30-absent")
def coco_50_30_absent(options: ScenarioOptions) -> DetectionScenario:
    """MS COCO 2017 50+30, absent setting (IOR)."""
    return coco_scenario("50+30", "absent", options)


@register_scenario("coco-60+20")
def coco_60_20(options: ScenarioOptions) -> DetectionScenario:
    """MS COCO 2017 60+20 (first task ends at bed), standard setting."""
    return coco_scenario("60+20", "standard", options)


@register_scenario("coco-60+20-absent")
def coco_60_20_absent(options: ScenarioOptions) -> DetectionScenario:
    """MS COCO 2017 60+20, absent setting (IOR)."""
    return coco_scenario("60+20", "absent", options)


@register_scenario("coco-70+10")
def coco_70_10(options: ScenarioOptions) -> DetectionScenario:
    """MS COCO 2017 70+10 (first task ends at oven), standard setting."""
    return coco_scenario("70+10", "standard", options)


@register_scenario("coco-70+10-absent")
def coco_70_10_absent(options: ScenarioOptions) -> DetectionScenario:
    """MS COCO 2017 70+10, absent setting (IOR)."""
    return coco_scenario("70+10", "absent", options)


@register_scenario("coco-40+20+20")
def coco_40_20_20(options: ScenarioOptions) -> DetectionScenario:
    """MS COCO 2017 40+20+20 (three tasks), standard setting."""
    return coco_scenario("40+20+20", "standard", options)


@register_scenario("coco-40+20+20-absent")
def coco_40_20_20_absent(options: ScenarioOptions) -> DetectionScenario:
    """MS COCO 2017 40+20+20, absent setting (IOR)."""
    return coco_scenario("40+20+20", "absent", options)


@register_scenario("coco-40+10+10+10+10")
def coco_40_10_10_10_10(options: ScenarioOptions) -> DetectionScenario:
    """MS COCO 2017 40+10+10+10+10 (five tasks), standard setting."""
    return coco_scenario("40+10+10+10+10", "standard", options)


@register_scenario("coco-40+10+10+10+10-absent")
def coco_40_10_10_10_10_absent(options: ScenarioOptions) -> DetectionScenario:
    """MS COCO 2017 40+10+10+10+10, absent setting (IOR)."""
    return coco_scenario("40+10+10+10+10", "absent", options)
