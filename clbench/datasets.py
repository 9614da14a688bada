"""The dataset containers strategies and scenarios exchange: in-memory tensors, relabelled subsets."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset


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
