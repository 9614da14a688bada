"""The data strategies and scenarios exchange: in-memory tensors, relabelled subsets, detection
images with their targets, and the loaders that collate them into batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from clbench.types import Batch


class InMemoryDataset(Dataset):
    """Tensors held in memory, fetched a whole batch at a time (no per-item Python overhead).

    `transform`, if given, is applied per sample when items are fetched (training
    augmentation); evaluation sets carry no transform.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform: Callable | None = None):
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
        self.x, self.y, self.transform = x, y.long(), transform

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        x = self.x[i]
        return (self.transform(x) if self.transform else x), self.y[i]

    def __getitems__(self, indices: Sequence[int]):
        idx = torch.as_tensor(indices, dtype=torch.long)
        x = self.x[idx]
        if self.transform is not None:
            x = torch.stack([self.transform(xi) for xi in x])
        return x, self.y[idx]

    @property
    def targets(self) -> torch.Tensor:
        return self.y

    def without_transform(self) -> "InMemoryDataset":
        return InMemoryDataset(self.x, self.y)


class LabelledSubset(Dataset):
    """Rows `indices` of a dataset whose items load on demand, relabelled (positions in the class order).

    A batch is fetched through the parent's `__getitems__` when it returns `(x, y)`
    tensors (whole-batch decoding); otherwise item by item.
    """

    def __init__(self, dataset: Dataset, indices: torch.Tensor, labels: torch.Tensor):
        if len(indices) != len(labels):
            raise ValueError(f"{len(indices)} indices but {len(labels)} labels")
        self.dataset, self.indices, self.labels = dataset, torch.as_tensor(indices).long(), torch.as_tensor(labels).long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.dataset[int(self.indices[i])][0], self.labels[i]

    def __getitems__(self, positions: Sequence[int]):
        pos = torch.as_tensor(positions, dtype=torch.long)
        rows = self.indices[pos].tolist()
        fetch = getattr(self.dataset, "__getitems__", None)
        got = fetch(rows) if fetch is not None else None
        if isinstance(got, tuple) and len(got) == 2 and isinstance(got[0], torch.Tensor):
            x = got[0]
        else:
            x = torch.stack([item[0] for item in got] if got is not None else [self.dataset[r][0] for r in rows])
        return x, self.labels[pos]

    @property
    def targets(self) -> torch.Tensor:
        return self.labels


def concat(datasets: Sequence[Dataset]) -> Dataset:
    """Concatenate experiences (joint training, exemplar sets); stays in memory when all parts are."""
    if all(isinstance(d, InMemoryDataset) for d in datasets):
        transforms = {id(d.transform): d.transform for d in datasets}
        transform = next(iter(transforms.values())) if len(transforms) == 1 else None
        return InMemoryDataset(torch.cat([d.x for d in datasets]), torch.cat([d.y for d in datasets]), transform)
    return torch.utils.data.ConcatDataset(list(datasets))


def dataset_labels(dataset: Dataset) -> torch.Tensor:
    if hasattr(dataset, "targets"):
        return torch.as_tensor(dataset.targets).long()
    if isinstance(dataset, torch.utils.data.ConcatDataset):
        return torch.cat([dataset_labels(d) for d in dataset.datasets])
    return torch.as_tensor([int(dataset[i][1]) for i in range(len(dataset))])


# --------------------------------------------------------------------------- detection
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
SIZE_DIVISOR = 32  # a padded batch's height and width are multiples of this (the FPN's largest stride of P5)
# what padding holds in [0, 1] pixel space: the ImageNet mean every clbench detector normalises with,
# so after its normalisation ((x - mean) / std) padding is exactly 0, as mmdetection and DETR pad
# normalised images with zeros
PAD_VALUE = (0.485, 0.456, 0.406)


@dataclass
class DetectionBatch:
    """Images stacked to `x` (values in [0, 1]; detectors normalise themselves) and one target per
    image.

    Images of different sizes are padded at the bottom and right to the batch's largest
    height and width, each rounded up to a multiple of `SIZE_DIVISOR` (`detection_collate`);
    `image_sizes` (long `[B, 2]`, `(height, width)`) is each image's valid area, its top-left
    corner. None: every image fills `x` (`sizes()` says so).
    """

    x: torch.Tensor
    targets: list[Target]
    x_raw: None = None  # no per-sample train augmentation outside the strategy
    image_sizes: torch.Tensor | None = None

    def sizes(self) -> torch.Tensor:
        """`[B, 2]` (height, width) of every image's valid area (the whole `x` when unpadded)."""
        if self.image_sizes is not None:
            return self.image_sizes
        return torch.tensor([list(self.x.shape[-2:])] * len(self.x), dtype=torch.long)

    @property
    def padded(self) -> bool:
        return self.image_sizes is not None and bool((self.image_sizes != self.image_sizes.new_tensor(self.x.shape[-2:])).any())

    def to(self, device) -> "DetectionBatch":
        return DetectionBatch(self.x.to(device), [{k: v.to(device) for k, v in t.items()} for t in self.targets],
                              image_sizes=self.image_sizes)

    def __len__(self) -> int:
        return len(self.targets)


class DetectionDataset(Dataset):
    """Images and their targets; items are `(image float [3, H, W] in [0, 1], target)`.

    `images` is either a uint8 tensor `[N, 3, H, W]` held in memory or a function `load(row)`
    returning one such image (files decoded on demand; images may differ in size); `rows[i]` is
    the parent row of item `i`, so task subsets share the parent's images.

    Targets' boxes are in pixels of the image as loaded. `scales` (float64 `[N, 2]`, per parent
    row, optional) is `(x, y)` factor from the original image (the file) to the loaded one: boxes
    divided by it are in the original image's pixels (`original_scales`), what evaluation compares.
    """

    def __init__(self, images: torch.Tensor | Callable[[int], torch.Tensor], targets: Sequence[Target],
                 rows: Sequence[int] | None = None, scales: torch.Tensor | None = None):
        self.images = images
        self.targets = list(targets)
        self.rows = list(range(len(self.targets))) if rows is None else [int(r) for r in rows]
        if len(self.rows) != len(self.targets):
            raise ValueError(f"{len(self.rows)} rows but {len(self.targets)} targets")
        self.scales = None if scales is None else torch.as_tensor(scales, dtype=torch.float64).reshape(-1, 2)

    def original_scales(self) -> torch.Tensor:
        """float64 `[len(self), 2]`: each item's `(x, y)` factor from its original image to the
        loaded one (ones when the images are loaded at their own size)."""
        if self.scales is None:
            return torch.ones(len(self), 2, dtype=torch.float64)
        return self.scales[torch.as_tensor(self.rows, dtype=torch.long)]

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
        return DetectionDataset(self.images, targets, [self.rows[i] for i in items], self.scales)

    @property
    def label_sets(self) -> list[set[int]]:
        return [set(t["labels"].tolist()) for t in self.targets]


def pad_images(images: Sequence[torch.Tensor], size_divisor: int = SIZE_DIVISOR,
               value: Sequence[float] = PAD_VALUE) -> tuple[torch.Tensor, torch.Tensor]:
    """`(x, image_sizes)`: images `[C, H_i, W_i]` in [0, 1] stacked into one tensor `[B, C, H, W]`,
    each at the top left, the rest filled with the per-channel `value` (`PAD_VALUE`: 0 once a
    detector normalises); `H`, `W` are the largest height and width rounded up to a multiple of
    `size_divisor`. Images that all have one size are stacked as they are (no padding)."""
    sizes = torch.tensor([list(im.shape[-2:]) for im in images], dtype=torch.long).reshape(-1, 2)
    if len(images) and bool((sizes == sizes[0]).all()):
        return torch.stack(list(images)), sizes
    h, w = (int(-(-int(v) // size_divisor) * size_divisor) for v in sizes.max(0).values)
    fill = torch.tensor(list(value), dtype=images[0].dtype) if images[0].shape[0] == len(value) else torch.zeros(1)
    x = fill.to(images[0].dtype).view(1, -1, 1, 1).expand(len(images), images[0].shape[0], h, w).clone()
    for b, im in enumerate(images):
        x[b, :, :im.shape[-2], :im.shape[-1]] = im
    return x, sizes


def detection_collate(items) -> DetectionBatch:
    images, targets = zip(*items)
    x, sizes = pad_images(images)
    return DetectionBatch(x, list(targets), image_sizes=sizes)


# --------------------------------------------------------------------------- loaders
def collate(items) -> Batch:
    if isinstance(items, tuple) and len(items) == 2 and isinstance(items[0], torch.Tensor):
        return Batch(items[0], items[1])  # already a whole batch from __getitems__
    if items and isinstance(items[0][1], dict):  # detection: (image, target dict) pairs
        return detection_collate(items)
    xs, ys = zip(*[(it[0], it[1]) for it in items])
    return Batch(torch.stack(list(xs)), torch.as_tensor(ys).long())


def make_loader(
    dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int = 0, num_workers: int = 0, drop_last: bool = False
) -> DataLoader:
    # a loader of its own generator: iterating a loader draws a base seed, which from the global
    # generator would tie training randomness to how many evaluation passes ran before it
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=num_workers,
        collate_fn=collate,
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
    )
