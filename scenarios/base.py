"""Scenario: an Avalanche class-incremental stream turned into clbench datasets.

This is the only module family that imports avalanche.  Labels are remapped to their
position in the class order before Avalanche splits the stream, so experience `i`
holds classes `[sum(increments[:i]), sum(increments[:i+1]))` and heads can grow in
order.  Avalanche silently drops classes when they do not divide evenly; the builder
rejects such splits instead.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Sequence

import torch
from torch.utils.data import Dataset

from clbench.datasets import InMemoryDataset
from clbench.errors import UsageError
from clbench.types import ExperienceInfo


@dataclass
class Scenario:
    task_type: ClassVar[str] = "classification"  # DetectionScenario: "detection"

    name: str
    num_classes: int
    class_order: list[int]  # original dataset label of each position
    increments: list[int]  # classes per experience
    train_sets: list[Dataset]
    test_sets: list[Dataset]
    input_shape: tuple[int, int, int]  # (channels, height, width)
    default_backbone: str
    class_names: list[str] | None = None
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None  # per-sample train augmentation on a batch
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    meta: dict = field(default_factory=dict)

    @property
    def num_experiences(self) -> int:
        return len(self.increments)

    def experience_classes(self, i: int) -> tuple[int, ...]:
        start = sum(self.increments[:i])
        return tuple(range(start, start + self.increments[i]))

    def info(self, i: int) -> ExperienceInfo:
        return ExperienceInfo(
            index=i,
            classes=self.experience_classes(i),
            seen_classes=tuple(range(sum(self.increments[: i + 1]))),
            num_experiences=self.num_experiences,
            num_classes=self.num_classes,
        )

    def describe(self) -> dict:
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "num_experiences": self.num_experiences,
            "increments": self.increments,
            "class_order": self.class_order,
            "input_shape": list(self.input_shape),
            "train_sizes": [len(d) for d in self.train_sets],
            "test_sizes": [len(d) for d in self.test_sets],
            **self.meta,
        }


def resolve_class_order(spec: str, labels: Sequence[int], paper_order: Sequence[int] | None = None) -> list[int]:
    """`natural` (sorted labels), `paper` (the order the benchmark's papers use), `seed:N` (shuffled), `default`."""
    natural = sorted(set(int(c) for c in labels))
    if spec in ("natural",) or (spec == "default" and paper_order is None):
        return natural
    if spec in ("paper", "default"):
        if paper_order is None:
            return natural
        return list(paper_order)
    if spec.startswith("seed:"):
        try:
            seed = int(spec[5:])
        except ValueError:
            raise UsageError(f"class order {spec!r} is invalid; expected natural, paper or seed:N") from None
        if seed < 0:
            raise UsageError(f"class order {spec!r} is invalid; expected seed:N with N >= 0")
        order = list(natural)
        random.Random(seed).shuffle(order)  # PyCIL/PILOT: np.random.seed(1993) permutation; see seeded_permutation
        return order
    raise UsageError(f"class order {spec!r} is invalid; expected natural, paper or seed:N")


def split_increments(num_classes: int, num_experiences: int, first: int | None = None) -> list[int]:
    """Equal steps, optionally after a larger first experience; uneven splits are an error."""
    if first is not None:
        rest = num_classes - first
        steps = num_experiences - 1
        if first <= 0 or rest <= 0 or steps <= 0 or rest % steps:
            raise UsageError(
                f"cannot split {num_classes} classes into a first experience of {first} and {steps} equal steps"
            )
        return [first] + [rest // steps] * steps
    if num_experiences <= 0 or num_classes % num_experiences:
        raise UsageError(
            f"{num_classes} classes do not divide into {num_experiences} experiences; "
            f"expected a divisor of {num_classes}"
        )
    return [num_classes // num_experiences] * num_experiences


def class_incremental_from_tensors(
    name: str,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    *,
    increments: list[int],
    class_order: list[int],
    default_backbone: str,
    class_names: list[str] | None = None,
    train_transform: Callable | None = None,
    augment: Callable | None = None,
    mean=None,
    std=None,
    meta: dict | None = None,
) -> Scenario:
    """Build an in-memory scenario: remap labels, split with Avalanche, materialise each experience."""
    num_classes = len(class_order)
    position = _class_positions(class_order, increments)
    present = set(torch.unique(train[1]).tolist())
    if present != set(class_order):
        raise UsageError(f"class order has {sorted(class_order)} but the data holds labels {sorted(present)}")
    ytr, yte = position[train[1].long()], position[test[1].long()]
    stream = _avalanche_split(train[0], ytr, test[0], yte, increments)
    train_sets = [_materialise(e.dataset, train_transform) for e in stream.train_stream]
    test_sets = [_materialise(e.dataset.eval(), None) for e in stream.test_stream]
    scenario = Scenario(
        name=name,
        num_classes=num_classes,
        class_order=[int(c) for c in class_order],
        increments=list(increments),
        train_sets=train_sets,
        test_sets=test_sets,
        input_shape=tuple(train[0].shape[1:]),  # type: ignore[arg-type]
        default_backbone=default_backbone,
        class_names=class_names,
        augment=augment,
        mean=mean,
        std=std,
        meta=meta or {},
    )
    _check_partition(scenario)
    return scenario


def _class_positions(class_order: list[int], increments: list[int]) -> torch.Tensor:
    """Lookup table: original label -> position in the class order (-1 for labels not in it)."""
    if sum(increments) != len(class_order):
        raise UsageError(f"increments {increments} cover {sum(increments)} classes, but there are {len(class_order)}")
    position = torch.full((max(class_order) + 1,), -1, dtype=torch.long)
    position[torch.tensor(class_order)] = torch.arange(len(class_order))
    return position


def _avalanche_split(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, increments):
    """Avalanche's class-incremental split of (already remapped) labels, classes in position order."""
    from avalanche.benchmarks.scenarios import class_incremental_benchmark
    from avalanche.benchmarks.utils import (
        _make_taskaware_tensor_classification_dataset as tensor_dataset,
    )

    return class_incremental_benchmark(
        {"train": tensor_dataset(train_x, train_y), "test": tensor_dataset(test_x, test_y)},
        class_order=list(range(sum(increments))),
        num_classes_per_exp=increments,
    )


def _materialise(avl_dataset, transform) -> InMemoryDataset:
    """Gather an Avalanche experience's samples into tensors (cheap for in-memory data)."""
    xs, ys = [], []
    for item in avl_dataset:
        xs.append(item[0])
        ys.append(int(item[1]))
    x = torch.stack(xs) if xs else torch.empty(0)
    return InMemoryDataset(x, torch.tensor(ys, dtype=torch.long), transform)


def _check_partition(s: Scenario) -> None:
    for i, (tr, te) in enumerate(zip(s.train_sets, s.test_sets)):
        expected = set(s.experience_classes(i))
        got = set(torch.unique(tr.targets).tolist()) | set(torch.unique(te.targets).tolist())
        if got != expected:
            raise UsageError(f"experience {i} holds classes {sorted(got)}, expected {sorted(expected)}")


@dataclass(frozen=True)
class ScenarioOptions:
    """What a scenario factory may be told by the run (the rest is fixed by the scenario's name)."""

    class_order: str = "default"
    data_root: str | None = None
    download: bool = False
    seed: int = 0
    # image scenarios only: input side in pixels (None: the benchmark's own, e.g. 32 for CIFAR,
    # 224 for ImageNet-R) and normalization (dataset | imagenet | inception | none), so a
    # pretrained backbone can get the input size and mean/std it was trained with
    image_size: int | None = None
    normalization: str = "dataset"


def data_root(options: ScenarioOptions):
    """`--data-root`, else `$CLBENCH_DATA`, else `~/.cache/clbench/data`."""
    import os
    from pathlib import Path

    root = options.data_root or os.environ.get("CLBENCH_DATA") or "~/.cache/clbench/data"
    return Path(root).expanduser()


def class_incremental_from_datasets(
    name: str,
    train: Dataset,
    test: Dataset,
    *,
    increments: list[int],
    class_order: list[int],
    default_backbone: str,
    input_shape: tuple[int, int, int],
    class_names: list[str] | None = None,
    augment: Callable | None = None,
    mean=None,
    std=None,
    meta: dict | None = None,
) -> Scenario:
    """Build a scenario over datasets that load items on demand (image folders, uint8 arrays).

    `train` and `test` expose `.targets` (original labels).  Only sample indices pass
    through Avalanche's split, so building the scenario reads no image; each experience
    is a `LabelledSubset` of the parent dataset carrying class-order positions.
    """
    from clbench.datasets import LabelledSubset

    num_classes = len(class_order)
    position = _class_positions(class_order, increments)
    train_y, test_y = torch.as_tensor(train.targets).long(), torch.as_tensor(test.targets).long()
    for split, y in (("train", train_y), ("test", test_y)):
        present = set(torch.unique(y).tolist())
        if present != set(class_order):
            missing = sorted(set(class_order) - present)[:10]
            raise UsageError(
                f"{name}: the {split} split holds {len(present)} classes, expected {num_classes} "
                f"(e.g. no samples of labels {missing})"
            )
    ytr, yte = position[train_y], position[test_y]
    stream = _avalanche_split(torch.arange(len(ytr)), ytr, torch.arange(len(yte)), yte, increments)

    def subset(parent, avl_dataset, y):
        rows = torch.sort(torch.tensor([int(item[0]) for item in avl_dataset], dtype=torch.long)).values
        return LabelledSubset(parent, rows, y[rows])

    scenario = Scenario(
        name=name,
        num_classes=num_classes,
        class_order=[int(c) for c in class_order],
        increments=list(increments),
        train_sets=[subset(train, e.dataset, ytr) for e in stream.train_stream],
        test_sets=[subset(test, e.dataset.eval(), yte) for e in stream.test_stream],
        input_shape=tuple(input_shape),  # type: ignore[arg-type]
        default_backbone=default_backbone,
        class_names=class_names,
        augment=augment,
        mean=mean,
        std=std,
        meta=meta or {},
    )
    _check_partition(scenario)
    return scenario


def seeded_permutation(n: int, seed: int) -> list[int]:
    """`np.random.seed(seed); np.random.permutation(n)`: the class order PyCIL/PILOT use (seed 1993)."""
    import numpy as np

    return np.random.RandomState(seed).permutation(n).tolist()
