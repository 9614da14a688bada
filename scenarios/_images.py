"""Image preprocessing, lazily-read image datasets and batch-level train augmentations.

Datasets yield normalized, NON-augmented tensors: buffers store what the loader gives,
and the runner applies `Scenario.augment` to every training batch (replayed samples
included).  Augmentations therefore work on a whole batch on its device, drawing a
different random crop/flip per sample from torch's global generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from clbench.errors import UsageError

NORMALIZATIONS = ("dataset", "imagenet", "inception", "none")


def normalization(name: str, dataset_mean: Sequence[float], dataset_std: Sequence[float]):
    """(mean, std) for `ScenarioOptions.normalization`: the dataset's own statistics or a backbone's."""
    from timm.data import (
        IMAGENET_DEFAULT_MEAN,
        IMAGENET_DEFAULT_STD,
        IMAGENET_INCEPTION_MEAN,
        IMAGENET_INCEPTION_STD,
    )

    table = {
        "dataset": (dataset_mean, dataset_std),
        "imagenet": (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
        "inception": (IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD),
        "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    }
    if name not in table:
        raise UsageError(f"normalization {name!r} is invalid; expected one of: {', '.join(NORMALIZATIONS)}")
    mean, std = table[name]
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def image_size(requested: int | None, default: int) -> int:
    size = default if requested is None else requested
    if not isinstance(size, int) or not 8 <= size <= 1024:
        raise UsageError(f"image_size={requested!r} is invalid; expected an integer between 8 and 1024")
    return size


@dataclass(frozen=True)
class Preprocess:
    """Evaluation-style preprocessing: shorter side to `resize`, center crop `size`, normalize."""

    size: int
    resize: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    bicubic: bool = False

    def pil(self, image) -> torch.Tensor:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        mode = InterpolationMode.BICUBIC if self.bicubic else InterpolationMode.BILINEAR
        if min(image.size) != self.resize:
            image = TF.resize(image, self.resize, interpolation=mode)
        image = TF.center_crop(image, [self.size, self.size])
        return self._normalize(TF.pil_to_tensor(image).float().div_(255))

    def uint8_batch(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) uint8 -> normalized float, resized and cropped when the size differs."""
        x = x.float().div_(255)
        if x.shape[-1] != self.resize or x.shape[-2] != self.resize:
            x = F.interpolate(x, size=(self.resize, self.resize), mode="bicubic" if self.bicubic else "bilinear",
                              align_corners=False, antialias=True).clamp_(0, 1)
        if self.resize != self.size:
            top = (self.resize - self.size) // 2
            x = x[..., top : top + self.size, top : top + self.size]
        return self._normalize(x)

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        shape = (-1, 1, 1)
        mean = torch.tensor(self.mean, dtype=x.dtype).view(shape)
        std = torch.tensor(self.std, dtype=x.dtype).view(shape)
        return (x - mean) / std


def open_rgb(path: str):
    """Decode one image file; a missing, truncated or non-image file is an error naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise UsageError(f"image {path} is unreadable or truncated ({type(e).__name__}: {e}); re-extract the dataset") from None


class ImageFiles(Dataset):
    """Images read from disk one item at a time; only the paths and labels live in memory.

    Paths are kept in one numpy string array rather than a list of Python strings, so
    DataLoader workers do not copy them page by page through reference counting.
    """

    def __init__(self, paths: Sequence[str | Path], labels: Sequence[int], preprocess: Preprocess):
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.paths = np.array([str(p) for p in paths])
        self.targets = torch.as_tensor(list(labels), dtype=torch.long)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.preprocess.pil(open_rgb(str(self.paths[i]))), self.targets[i]


class ImageTensors(Dataset):
    """uint8 images held in memory (CIFAR), converted a whole batch at a time.

    Kept as uint8 (a quarter of float32) and resized on the fly, so asking for 224x224
    inputs does not multiply the memory held.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, preprocess: Preprocess):
        if images.dtype != torch.uint8 or images.dim() != 4 or len(images) != len(labels):
            raise ValueError("expected (N, C, H, W) uint8 images and N labels")
        self.images, self.targets, self.preprocess = images, labels.long(), preprocess

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.preprocess.uint8_batch(self.images[i : i + 1])[0], self.targets[i]

    def __getitems__(self, indices: Sequence[int]):
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.preprocess.uint8_batch(self.images[idx]), self.targets[idx]


# --------------------------------------------------------------------------- train augmentations
def _rand(shape, device, generator=None) -> torch.Tensor:
    return torch.rand(shape, device=device, generator=generator)


def _flip_half(x: torch.Tensor) -> torch.Tensor:
    flip = _rand((len(x),), x.device) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


@dataclass(frozen=True)
class PadCropFlip:
    """RandomCrop(size, padding=pad) + RandomHorizontalFlip, optionally ColorJitter(brightness).

    The padding is black in pixel space, i.e. `-mean/std` after normalization, as when
    torchvision pads the PIL image before `Normalize`.
    """

    pad: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    brightness: float = 0.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.pad
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, c, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, c, 1, 1)
        padded = (-mean / std).expand(b, c, h + 2 * p, w + 2 * p).clone()
        padded[:, :, p : p + h, p : p + w] = x
        top = torch.randint(0, 2 * p + 1, (b,), device=x.device)
        left = torch.randint(0, 2 * p + 1, (b,), device=x.device)
        rows = (top[:, None] + torch.arange(h, device=x.device))[:, :, None]
        cols = (left[:, None] + torch.arange(w, device=x.device))[:, None, :]
        batch = torch.arange(b, device=x.device)[:, None, None]
        out = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)
        out = _flip_half(out)
        if self.brightness:
            factor = 1 + (2 * _rand((b, 1, 1, 1), x.device) - 1) * self.brightness
            out = (((out * std + mean) * factor).clamp(0, 1) - mean) / std
        return out.contiguous()


@dataclass(frozen=True)
class ResizedCropFlip:
    """RandomResizedCrop(size, scale, ratio) + RandomHorizontalFlip on a batch.

    The crop box is drawn as torchvision does (10 tries of area and log-ratio, else the
    whole image) and resampled bilinearly with `roi_align`, one call for the batch.
    It crops the stored center crop, not the full original image (a documented limit).
    """

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from torchvision.ops import roi_align

        b, _, h, w = x.shape
        tries = 10
        area = h * w * torch.empty((b, tries), device=x.device).uniform_(*self.scale)
        log_ratio = torch.empty((b, tries), device=x.device).uniform_(math.log(self.ratio[0]), math.log(self.ratio[1]))
        aspect = torch.exp(log_ratio)
        cw = torch.sqrt(area * aspect).round()
        ch = torch.sqrt(area / aspect).round()
        ok = (cw >= 1) & (ch >= 1) & (cw <= w) & (ch <= h)
        first = ok.float().argmax(dim=1, keepdim=True)
        found = ok.any(dim=1)
        cw = torch.where(found, cw.gather(1, first).squeeze(1), torch.full_like(found, w, dtype=cw.dtype))
        ch = torch.where(found, ch.gather(1, first).squeeze(1), torch.full_like(found, h, dtype=ch.dtype))
        top = torch.floor(_rand((b,), x.device) * (h - ch + 1))
        left = torch.floor(_rand((b,), x.device) * (w - cw + 1))
        index = torch.arange(b, device=x.device, dtype=cw.dtype)
        boxes = torch.stack([index, left, top, left + cw, top + ch], dim=1).to(x.dtype)
        out = roi_align(x, boxes, output_size=(h, w), spatial_scale=1.0, sampling_ratio=1, aligned=True)
        return _flip_half(out)


# --------------------------------------------------------------------------- image-folder scenarios
@dataclass(frozen=True)
class Protocol:
    """How a benchmark's papers feed images to the network (sizes, statistics, augmentation, backbone)."""

    size: int
    resize_ratio: float  # shorter side = size * ratio before the center crop (256/224 ImageNet-style, 1: none)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    augment: str  # "pad_crop": RandomCrop(size, 4) + flip; "resized_crop": RandomResizedCrop(crop_scale) + flip
    backbone: str
    crop_scale: tuple[float, float] = (0.08, 1.0)
    bicubic: bool = False


def image_folder_scenario(
    name: str,
    options,
    protocol: Protocol,
    train: tuple[Sequence[str], Sequence[int]],
    test: tuple[Sequence[str], Sequence[int]],
    *,
    increments: list[int],
    class_names: Sequence[str],
    paper_order: Sequence[int] | None,
    meta: dict,
):
    """A scenario over image files read lazily, preprocessed as `protocol` says (overridable by options)."""
    from clbench.scenarios.base import (
        class_incremental_from_datasets,
        resolve_class_order,
    )

    size = image_size(options.image_size, protocol.size)
    mean, std = normalization(options.normalization, protocol.mean, protocol.std)
    preprocess = Preprocess(size=size, resize=round(size * protocol.resize_ratio), mean=mean, std=std, bicubic=protocol.bicubic)
    if protocol.augment == "pad_crop":
        augment = PadCropFlip(pad=4, mean=mean, std=std)
    else:
        augment = ResizedCropFlip(scale=protocol.crop_scale)
    order = resolve_class_order(options.class_order, list(train[1]), paper_order)
    return class_incremental_from_datasets(
        name,
        ImageFiles(train[0], train[1], preprocess),
        ImageFiles(test[0], test[1], preprocess),
        increments=increments,
        class_order=order,
        default_backbone=protocol.backbone,
        input_shape=(3, size, size),
        class_names=[class_names[c] for c in order],
        augment=augment,
        mean=mean,
        std=std,
        meta={**meta, "image_size": size, "normalization": options.normalization},
    )
