"""Detection targets and batches: boxes, labels and ignore flags per image."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset

Target = dict[str, torch.Tensor]  # {"boxes": float [n, 4] xyxy, "labels": long [n], "ignore": bool [n]}


def make_target(boxes, labels, ignore=None) -> Target:
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    ignore = torch.zeros(len(labels), dtype=torch.bool) if ignore is None else torch.as_tensor(ignore, dtype=torch.bool)
    if not (len(boxes) == len(labels) == len(ignore)):
        raise ValueError(f"target has {len(boxes)} boxes, {len(labels)} labels and {len(ignore)} ignore flags")
    return {"boxes": boxes, "labels": labels, "ignore": ignore.reshape(-1)}


def select(target: Target, keep: torch.Tensor) -> Target:
    return {k: v[keep] for k, v in target.items()}


def restrict(target: Target, classes: Sequence[int] | torch.Tensor) -> Target:
    """The target's boxes whose label is in `classes`."""
    allowed = torch.as_tensor(list(classes) if not isinstance(classes, torch.Tensor) else classes, dtype=torch.long)
    return select(target, torch.isin(target["labels"], allowed))


# --------------------------------------------------------------------------- data
@dataclass
class DetectionBatch:
    """Images of one size stacked to `x` (values in [0, 1]; detectors normalise themselves) and
    one target per image."""

    x: torch.Tensor
    targets: list[Target]
    x_raw: None = None  # no per-sample train augmentation outside the strategy

    def to(self, device) -> "DetectionBatch":
        return DetectionBatch(self.x.to(device), [{k: v.to(device) for k, v in t.items()} for t in self.targets])

    def __len__(self) -> int:
        return len(self.targets)


class DetectionDataset(Dataset):
    """Images and their targets; items are `(image float [3, H, W] in [0, 1], target)`.

    `images` is either a uint8 tensor `[N, 3, H, W]` held in memory or a function `load(row)`
    returning one such image (files decoded on demand); `rows[i]` is the parent row of item `i`,
    so task subsets share the parent's images.
    """

    def __init__(self, images: torch.Tensor | Callable[[int], torch.Tensor], targets: Sequence[Target],
                 rows: Sequence[int] | None = None):
        self.images = images
        self.targets = list(targets)
        self.rows = list(range(len(self.targets))) if rows is None else [int(r) for r in rows]
        if len(self.rows) != len(self.targets):
            raise ValueError(f"{len(self.rows)} rows but {len(self.targets)} targets")

    def __len__(self) -> int:
        return len(self.targets)

    def image(self, i: int) -> torch.Tensor:
        row = self.rows[i]
        raw = self.images[row] if isinstance(self.images, torch.Tensor) else self.images(row)
        return raw.float() / 255.0 if raw.dtype == torch.uint8 else raw.float()

    def __getitem__(self, i: int):
        return self.image(i), self.targets[i]

    def subset(self, items: Sequence[int], targets: Sequence[Target] | None = None) -> "DetectionDataset":
        """Items `items` of this dataset (with replaced targets, if given), sharing its images."""
        targets = [self.targets[i] for i in items] if targets is None else list(targets)
        return DetectionDataset(self.images, targets, [self.rows[i] for i in items])

    @property
    def label_sets(self) -> list[set[int]]:
        return [set(t["labels"].tolist()) for t in self.targets]


def detection_collate(items) -> DetectionBatch:
    images, targets = zip(*items)
    return DetectionBatch(torch.stack(list(images)), list(targets))
