"""Training-time augmentation of the detection input pipeline, as named settings.

The images a detection scenario loads are already at the test scale (shorter side 800, longer at
most 1333, aspect kept; `image_size=N` scales both: `scenarios/_iod_files.py`). A training
augmentation reshapes each image of a training batch from there and pads the batch again, so
evaluation never sees it. Settings (`TRAIN_AUGMENTS`, a Config's `train_augment`):

- `none`: the images as loaded.
- `detr_multiscale`: the training transforms of DETR (Carion et al., ECCV 2020), which Deformable
  DETR (Zhu et al., ICLR 2021) trains with unchanged, and so P2IOD's and CL-DETR's Deformable-DETR
  codes: a horizontal flip with probability 0.5; then, with probability 0.5, a resize whose
  shorter side is drawn from 480, 512, ..., 800 (step 32) with the longer side at most 1333;
  otherwise a resize to a shorter side drawn from 400 / 500 / 600 (no cap), a random crop whose
  width and height are each drawn from 384 .. min(side, 600) at a uniformly drawn position, and
  then that same multi-scale resize. The resize rule is DETR's (`resize_shorter`: the shorter
  side becomes the drawn size unless the longer would exceed the cap, then the shorter is
  `round(cap * short / long)`; the other side is truncated, not rounded). The crop moves boxes by
  its corner, clips them to the crop and drops those left without width or height (DETR's
  `crop`); labels and ignore flags follow their boxes.

Sizes are given at the 800-px test scale and scaled with the run's: an image loaded at shorter
side N (`image_size=N`) draws from the same sizes times N / 800, rounded (N = 800: the paper's
numbers). N is read from the image itself (`loaded_short_side`). The draws use torch's generator
(the global one by default, seeded by the run's seed, as GFL's flip), so a run is reproducible
under its seed. Not reproduced: DETR resizes the original file, this the image as loaded (the
same sizes up to the rounding of the loaded image's aspect ratio).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from clbench.datasets import DetectionBatch, Target, pad_images

TEST_SHORT_SIDE, TEST_LONG_SIDE = 800, 1333  # the test scale the setting's sizes are given at


@dataclass(frozen=True)
class MultiScaleCrop:
    """DETR's training transform family (see the module docstring); sizes at the 800-px test scale."""

    name: str
    flip_prob: float
    scales: tuple[int, ...]  # shorter side of the final resize, one drawn per image
    max_size: int  # longer side cap of the final resize
    crop_prob: float  # probability of the resize + crop branch before the final resize
    crop_scales: tuple[int, ...]  # shorter side of the resize before the crop (no cap)
    crop_min: int  # crop width and height drawn from crop_min .. min(side, crop_max)
    crop_max: int


DETR_MULTISCALE = MultiScaleCrop("detr_multiscale", flip_prob=0.5, scales=tuple(range(480, 801, 32)), max_size=1333,
                                 crop_prob=0.5, crop_scales=(400, 500, 600), crop_min=384, crop_max=600)
TRAIN_AUGMENTS: dict[str, MultiScaleCrop | None] = {"none": None, DETR_MULTISCALE.name: DETR_MULTISCALE}


# --------------------------------------------------------------------------- one image
def hflip(image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
    """The image mirrored left-right; a box `x0, x1` becomes `W - x1, W - x0` (pixel edges)."""
    width = image.shape[-1]
    boxes = target["boxes"].clone()
    boxes[:, 0], boxes[:, 2] = width - target["boxes"][:, 2], width - target["boxes"][:, 0]
    return image.flip(-1), {**target, "boxes": boxes}


def shorter_side_size(height: int, width: int, size: int, max_size: int | None = None) -> tuple[int, int]:
    """`(height, width)` after DETR's resize of a `height` x `width` image to shorter side `size`, the
    longer side capped at `max_size`: with the cap the shorter side is `round(max_size * short / long)`;
    the longer side is `int(size * long / short)` (truncated)."""
    if max_size is not None:
        short, long = min(height, width), max(height, width)
        if long / short * size > max_size:
            size = int(round(max_size * short / long))
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


def resize_to(image: torch.Tensor, target: Target, height: int, width: int) -> tuple[torch.Tensor, Target]:
    """Bilinear resize (antialiased, as PIL's) to `height` x `width`; boxes scaled per axis."""
    h, w = image.shape[-2:]
    if (h, w) == (height, width):
        return image, target
    out = F.interpolate(image[None], size=(height, width), mode="bilinear", align_corners=False, antialias=True)[0]
    factor = torch.tensor([width / w, height / h] * 2, dtype=torch.float64)
    boxes = (target["boxes"].double() * factor.to(target["boxes"].device)).to(target["boxes"].dtype)
    return out.clamp(0, 1), {**target, "boxes": boxes}


def resize_shorter(image: torch.Tensor, target: Target, size: int, max_size: int | None = None):
    return resize_to(image, target, *shorter_side_size(*image.shape[-2:], size, max_size))


def crop(image: torch.Tensor, target: Target, top: int, left: int, height: int, width: int) -> tuple[torch.Tensor, Target]:
    """The `height` x `width` region at (`top`, `left`); boxes moved by the corner, clipped to the
    region, and dropped where nothing of their width or height is left (with their labels and flags)."""
    boxes = target["boxes"] - target["boxes"].new_tensor([left, top, left, top])
    boxes = torch.minimum(boxes, boxes.new_tensor([width, height, width, height])).clamp(min=0)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    out = {k: v[keep] for k, v in target.items()}
    out["boxes"] = boxes[keep]
    return image[:, top:top + height, left:left + width], out


def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """Uniform on `low .. high`, both included."""
    return int(torch.randint(low, high + 1, (1,), generator=generator))


def _choice(values: Sequence[int], generator: torch.Generator | None) -> int:
    return values[_randint(0, len(values) - 1, generator)]


def _uniform(generator: torch.Generator | None) -> float:
    return float(torch.rand(1, generator=generator))


def loaded_short_side(height: int, width: int) -> int:
    """The shorter side N an image was loaded at (`image_size=N`): its shorter side, unless its longer
    side was capped at `round(N * 1333 / 800)`, then N is read back from the longer side."""
    return max(min(height, width), int(round(max(height, width) * TEST_SHORT_SIDE / TEST_LONG_SIDE)))


def augment_image(image: torch.Tensor, target: Target, setting: MultiScaleCrop, reference: int | None = None,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, Target]:
    """One draw of `setting` on one image `[C, H, W]` and its target; sizes scaled by
    `reference / 800` (`reference`: the image's loaded shorter side, read from it when None)."""
    ratio = (reference or loaded_short_side(*image.shape[-2:])) / TEST_SHORT_SIDE

    def scaled(size: int) -> int:
        return max(1, int(round(size * ratio)))

    if _uniform(generator) < setting.flip_prob:
        image, target = hflip(image, target)
    if _uniform(generator) < setting.crop_prob:
        image, target = resize_shorter(image, target, scaled(_choice(setting.crop_scales, generator)))
        h, w = image.shape[-2:]
        low, high = scaled(setting.crop_min), scaled(setting.crop_max)
        crop_w = _randint(min(low, w), min(w, high), generator)  # images narrower than crop_min: their width
        crop_h = _randint(min(low, h), min(h, high), generator)
        top, left = _randint(0, h - crop_h, generator), _randint(0, w - crop_w, generator)
        image, target = crop(image, target, top, left, crop_h, crop_w)
    return resize_shorter(image, target, scaled(_choice(setting.scales, generator)), scaled(setting.max_size))


def augment_batch(batch: DetectionBatch, setting: MultiScaleCrop | None,
                  generator: torch.Generator | None = None) -> DetectionBatch:
    """Each image's valid area (and its boxes) augmented by `setting`, then padded again to one batch
    (`pad_images`: multiples of 32, the ImageNet mean); `setting` None returns the batch as it is."""
    if setting is None:
        return batch
    sizes = batch.sizes().tolist()
    images, targets = [], []
    for b, (h, w) in enumerate(sizes):
        image, target = augment_image(batch.x[b, :, :h, :w], batch.targets[b], setting, generator=generator)
        images.append(image)
        targets.append(target)
    x, image_sizes = pad_images(images)
    return DetectionBatch(x.to(batch.x.device), targets, image_sizes=image_sizes)
