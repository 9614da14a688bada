"""Detection data on disk: reading images on demand, and writing a `DetectionDataset` in the
exact PASCAL VOC and COCO layouts (so the real loaders can be tested on ShapesIOD).

Box conventions. In memory a box is `xyxy` in pixel edges: a box covering pixel columns
`a..b` (0-based, inclusive) is `x0 = a, x1 = b + 1`. VOC XML stores 1-based inclusive pixel
indices (`xmin = a + 1, xmax = b + 1`), so the VOC loader subtracts 1 from xmin / ymin only;
COCO stores `[x, y, width, height]` in the same pixel edges as ours. Both round-trip exactly
for integer boxes.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from clbench.datasets import DetectionDataset
from clbench.errors import UsageError


# --------------------------------------------------------------------------- reading
# The papers' test scale (mmdetection's `img_scale=(1333, 800)` with `keep_ratio=True`, DETR's
# and Deformable DETR's evaluation resize): the shorter side 800, the longer at most 1333.
# `image_size=N` scales both: shorter side N, longer at most round(N * 1333 / 800).
PAPER_SHORT_SIDE, PAPER_LONG_SIDE = 800, 1333


def long_side_cap(short: int) -> int:
    """The longest side allowed with shorter side `short`: 1333 at 800, in proportion otherwise."""
    return int(round(short * PAPER_LONG_SIDE / PAPER_SHORT_SIDE))


def aspect_size(width: int, height: int, short: int, long: int) -> tuple[int, int]:
    """`(width, height)` of a `width` x `height` image resized keeping its aspect ratio so that its
    shorter side is `short` unless its longer side would exceed `long` (then the longer is `long`):
    mmcv's `rescale_size` (factor `min(short / min(w, h), long / max(w, h))`, each side
    `int(side * factor + 0.5)`), what mmdetection's `Resize(img_scale=(1333, 800), keep_ratio=True)` does."""
    factor = min(short / min(width, height), long / max(width, height))
    return int(width * factor + 0.5), int(height * factor + 0.5)


@dataclass
class ResizedImages:
    """`load(row)` for `DetectionDataset`: decodes image file `paths[row]` with PIL, checks it has
    the size its annotation gave, and resizes it (bilinear).

    `long` given: keeping the aspect ratio, shorter side `size`, longer side at most `long`
    (`aspect_size`; the papers' 800 / 1333). `long` None: to a `size` x `size` square (not
    aspect-preserving). Boxes follow with `scale_boxes` and the per-axis factors `scales()`
    (new width / width, new height / height, as mmdetection scales them).

    A plain object (not a closure), so DataLoader workers can pickle it.
    """

    paths: list[str]
    sizes: list[tuple[int, int]]  # (width, height) from the annotation
    size: int
    long: int | None = None

    def output_size(self, row: int) -> tuple[int, int]:
        """(width, height) of image `row` as loaded."""
        width, height = self.sizes[row]
        return aspect_size(width, height, self.size, self.long) if self.long is not None else (self.size, self.size)

    def scales(self) -> torch.Tensor:
        """float64 `[N, 2]`: per image `(new width / width, new height / height)`."""
        return torch.tensor([[nw / w, nh / h] for (w, h), (nw, nh) in
                             zip(self.sizes, (self.output_size(r) for r in range(len(self.sizes))))], dtype=torch.float64)

    def __call__(self, row: int) -> torch.Tensor:
        from PIL import Image

        path = self.paths[row]
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB")
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot read image {path} ({type(e).__name__}: {e}); the file is damaged or missing") from None
        if rgb.size != tuple(self.sizes[row]):
            raise UsageError(f"image {path} is {rgb.size[0]}x{rgb.size[1]} but its annotation says "
                             f"{self.sizes[row][0]}x{self.sizes[row][1]}; the annotations do not belong to these images")
        size = self.output_size(row)
        if rgb.size != size:
            rgb = rgb.resize(size, Image.BILINEAR)
        return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).contiguous()


def scale_boxes(boxes: torch.Tensor, width: int, height: int, new_width: int, new_height: int | None = None) -> torch.Tensor:
    """Boxes of a `width` x `height` image in pixels of the same image resized to `new_width` x
    `new_height` (default: a `new_width` square); factors computed in float64."""
    new_height = new_width if new_height is None else new_height
    factor = torch.tensor([new_width / width, new_height / height] * 2, dtype=torch.float64)
    return (boxes.double() * factor).float()


def fixed_class_order(spec: str, benchmark: str) -> None:
    """IOD benchmarks keep their published class order (VOC 15+5 in another order is
    another benchmark), so only the names that mean that order are accepted."""
    if spec not in ("default", "paper", "natural"):
        raise UsageError(f"{benchmark} has a fixed class order; --class-order {spec!r} is not supported "
                         "(expected default, paper or natural, which all mean the benchmark's order)")


# --------------------------------------------------------------------------- writing
def _save_image(image: torch.Tensor, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    if image.dtype != torch.uint8:
        image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    picture = Image.fromarray(image.permute(1, 2, 0).numpy())
    if path.suffix.lower() in (".jpg", ".jpeg"):
        picture.save(path, quality=95)
    else:
        picture.save(path)


def _raw_image(dataset: DetectionDataset, i: int) -> torch.Tensor:
    row = dataset.rows[i]
    return dataset.images[row] if isinstance(dataset.images, torch.Tensor) else dataset.images(row)


def write_coco(dataset: DetectionDataset, folder: str | Path, split_name: str, class_names: Sequence[str],
               category_ids: Sequence[int] | None = None, image_format: str = "png", first_image_id: int = 1) -> Path:
    """Write `dataset` as COCO: `<folder>/annotations/instances_<split_name>.json` and the images
    under `<folder>/<split_name>/<12-digit id>.<image_format>`; returns the JSON's path.

    Label `l` becomes category `category_ids[l]` (default `l + 1`, COCO's 1-based ids) named
    `class_names[l]`; every class gets a category entry, with or without annotations. Ignored
    boxes are written as `iscrowd: 1`; `area` is the box area (no segmentation is written).
    """
    folder = Path(folder)
    ids = list(category_ids) if category_ids is not None else list(range(1, len(class_names) + 1))
    if len(ids) != len(class_names):
        raise ValueError(f"{len(class_names)} class names but {len(ids)} category ids")
    images, annotations = [], []
    for i in range(len(dataset)):
        image = _raw_image(dataset, i)
        image_id = first_image_id + i
        file_name = f"{image_id:012d}.{image_format}"
        _save_image(image, folder / split_name / file_name)
        images.append({"id": image_id, "file_name": file_name, "width": int(image.shape[2]), "height": int(image.shape[1])})
        target = dataset.targets[i]
        for box, label, ignore in zip(target["boxes"].tolist(), target["labels"].tolist(), target["ignore"].tolist()):
            w, h = box[2] - box[0], box[3] - box[1]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": ids[label],
                                "bbox": [box[0], box[1], w, h], "area": w * h, "iscrowd": int(ignore), "segmentation": []})
    categories = [{"id": c, "name": n, "supercategory": "shape"} for c, n in zip(ids, class_names)]
    path = folder / "annotations" / f"instances_{split_name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"info": {"description": "written by clbench"}, "licenses": [], "images": images,
                                "annotations": annotations, "categories": categories}))
    return path


def write_voc(dataset: DetectionDataset, folder: str | Path, image_set: str, class_names: Sequence[str],
              image_format: str = "jpg", first_id: int = 1) -> Path:
    """Write `dataset` as PASCAL VOC under `<folder>/VOC2007`: `Annotations/<id>.xml`,
    `JPEGImages/<id>.<image_format>` and `ImageSets/Main/<image_set>.txt` (ids are 6-digit numbers
    from `first_id`, so several image sets can share one VOC2007 folder); returns that folder.

    Coordinates are 1-based inclusive pixel indices (boxes are rounded to whole pixels); ignored
    boxes are written with `<difficult>1</difficult>`. Use `image_format="png"` for pixels that
    must round-trip exactly (the JPEGImages folder keeps its name).
    """
    root = Path(folder) / "VOC2007"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ids = []
    for i in range(len(dataset)):
        image_id = f"{first_id + i:06d}"
        ids.append(image_id)
        image = _raw_image(dataset, i)
        file_name = f"{image_id}.{image_format}"
        _save_image(image, root / "JPEGImages" / file_name)
        annotation = ET.Element("annotation")
        ET.SubElement(annotation, "folder").text = "VOC2007"
        ET.SubElement(annotation, "filename").text = file_name
        size = ET.SubElement(annotation, "size")
        for tag, value in (("width", image.shape[2]), ("height", image.shape[1]), ("depth", image.shape[0])):
            ET.SubElement(size, tag).text = str(int(value))
        ET.SubElement(annotation, "segmented").text = "0"
        target = dataset.targets[i]
        for box, label, ignore in zip(target["boxes"].tolist(), target["labels"].tolist(), target["ignore"].tolist()):
            obj = ET.SubElement(annotation, "object")
            ET.SubElement(obj, "name").text = class_names[label]
            ET.SubElement(obj, "pose").text = "Unspecified"
            ET.SubElement(obj, "truncated").text = "0"
            ET.SubElement(obj, "difficult").text = str(int(ignore))
            bndbox = ET.SubElement(obj, "bndbox")
            x0, y0, x1, y1 = (int(round(v)) for v in box)
            for tag, value in (("xmin", x0 + 1), ("ymin", y0 + 1), ("xmax", x1), ("ymax", y1)):
                ET.SubElement(bndbox, tag).text = str(value)
        ET.ElementTree(annotation).write(root / "Annotations" / f"{image_id}.xml")
    listing = root / "ImageSets" / "Main" / f"{image_set}.txt"
    listing.write_text("".join(f"{i}\n" for i in ids))
    return root
