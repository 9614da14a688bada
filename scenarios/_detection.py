"""Incremental-detection scenarios: one image pool, tasks cut from it by the IOD filters.

Every detection benchmark (ShapesIOD, VOC, COCO) hands this builder a training pool and a test
set whose labels are already positions in the benchmark's class order; task `t` takes the next
`increments[t]` classes and its images come from the setting's filter (`standard` or
`absent`, see `clbench.tasks.detection`). The test set is the full one: evaluation restricts its
ground truth to the classes seen so far.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import torch
from clbench.scenarios.base import Scenario

from clbench.datasets import DetectionDataset
from clbench.errors import UsageError
from clbench.tasks.detection import VOC_AP50, APConvention, task_images


@dataclass
class DetectionScenario(Scenario):
    setting: str = "standard"
    convention: APConvention = VOC_AP50
    task_type: ClassVar[str] = "detection"

    @property
    def test_set(self) -> DetectionDataset:
        return self.test_sets[0]

    @property
    def task_classes(self) -> list[tuple[int, ...]]:
        return [self.experience_classes(i) for i in range(self.num_experiences)]

    def describe(self) -> dict:
        return {
            **super().describe(),
            "task_type": self.task_type,
            "class_names": self.class_names,
            "setting": self.setting,
            "metric": self.convention.metric,
            "convention": self.convention.name,
            "ap_convention": self.convention.description,
            "evaluation": "full test set; ground truth and predictions restricted to seen classes",
        }


def parse_split(split: str) -> list[int]:
    """`"10+5+5"` -> `[10, 5, 5]`; `"10+2x5"` -> `[10, 2, 2, 2, 2, 2]`: `MxN` is N tasks of M classes,
    the notation of the IOD papers (VOC "10+2×5", "15+1×5")."""
    increments: list[int] = []
    for part in split.split("+"):
        m = re.fullmatch(r"(\d+)(?:x(\d+))?", part)
        if not m or int(m.group(1)) == 0 or m.group(2) is not None and int(m.group(2)) == 0:
            raise UsageError(f"split {split!r} is invalid; expected class counts joined by '+', e.g. 10+10 or 10+2x5")
        increments += [int(m.group(1))] * int(m.group(2) or 1)
    return increments


def _unignored_boxes_per_class(data: DetectionDataset, num_classes: int) -> list[int]:
    if not len(data.targets):
        return [0] * num_classes
    labels = torch.cat([t["labels"][~t["ignore"]] for t in data.targets])
    return torch.bincount(labels, minlength=num_classes).tolist()


def detection_scenario(name: str, train: DetectionDataset, test: DetectionDataset, *, increments: list[int],
                       class_names: list[str], setting: str, input_shape: tuple[int, int, int],
                       convention: APConvention = VOC_AP50, meta: dict | None = None) -> DetectionScenario:
    num_classes = len(class_names)
    if sum(increments) != num_classes:
        raise UsageError(f"{name}: split {increments} covers {sum(increments)} classes, but the benchmark has {num_classes}")
    if setting not in ("standard", "absent"):
        raise UsageError(f"{name}: IOD setting {setting!r} is unknown; expected standard or absent")
    if len(test) == 0:
        raise UsageError(f"{name}: the test set has no image; expected at least one test image with boxes of every task")
    test_boxes = _unignored_boxes_per_class(test, num_classes)
    train_sets = []
    for t in range(len(increments)):
        start = sum(increments[:t])
        current = list(range(start, start + increments[t]))
        rows, targets = task_images(setting, train.targets, current, list(range(start)))
        if not rows:
            raise UsageError(f"{name}: task {t} (classes {current}) has no training image in the {setting} setting")
        if not sum(test_boxes[c] for c in current):
            raise UsageError(f"{name}: task {t} (classes {current}) has no test box; expected at least one "
                             f"non-ignored test box of its classes (its AP would be undefined)")
        train_sets.append(train.subset(rows, targets))
    return DetectionScenario(
        name=name,
        num_classes=num_classes,
        class_order=list(range(num_classes)),
        increments=list(increments),
        train_sets=train_sets,
        test_sets=[test],
        input_shape=input_shape,
        default_backbone="detector",
        class_names=list(class_names),
        setting=setting,
        convention=convention,
        meta=dict(meta or {}),
    )
