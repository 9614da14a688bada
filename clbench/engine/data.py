"""Loaders: batches collated into `Batch`, seeded shuffling."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from clbench.types import Batch


def collate(items) -> Batch:
    if isinstance(items, tuple) and len(items) == 2 and isinstance(items[0], torch.Tensor):
        return Batch(items[0], items[1])  # already a whole batch from __getitems__
    if items and isinstance(items[0][1], dict):  # detection: (image, target dict) pairs
        from clbench.models.detection.targets import detection_collate

        return detection_collate(items)
    xs, ys = zip(*[(it[0], it[1]) for it in items])
    return Batch(torch.stack(list(xs)), torch.as_tensor(ys).long())


def make_loader(
    dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int = 0, num_workers: int = 0, drop_last: bool = False
) -> DataLoader:
    generator = torch.Generator().manual_seed(seed) if shuffle else None
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
