"""Incremental object detection (IOD): the protocol every detection strategy and scenario shares.

Terms: a task (= experience) adds *current* classes; classes of
earlier tasks are *old*, of later tasks *future*; *seen* = old + current.  Labels are
positions in the benchmark's class order, boxes are `xyxy` in pixels of the image as fed.

- Task data: `standard_task_images` (keep every image with a current-class object, only its
  current-class boxes) and `absent_task_images` (also drop images holding any earlier class).
  Crowd (COCO) and difficult (VOC) boxes travel as `ignore` flags, never as targets.
- Evaluation after every task (`evaluate_detection`): the full test set with ground truth
  restricted to seen classes, predictions restricted to seen classes, per-class AP from
  torchmetrics' `MeanAveragePrecision` (pycocotools backend, COCO-style 101-point
  interpolation), and the old / new / all means over classes that have ground truth.
- `DetectionTask`: what the runner and the reports ask of a detection run (the per-task AP
  record, the AP columns).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from clbench import metrics as M
from clbench.datasets import Target, restrict
from clbench.errors import UsageError
from clbench.models.freeze import evaluating
from clbench.tasks.base import Column, Task
from clbench.tasks.classification import format_matrix
from clbench.types import ExperienceInfo


# --------------------------------------------------------------------------- task filters
def standard_task_images(targets: Sequence[Target], current: Sequence[int]) -> tuple[list[int], list[Target]]:
    """Standard ("co-occurring") setting: every image with at least one current-class object
    (ignored boxes do not count), keeping only its current-class boxes. Old and future objects
    stay in the pixels, unlabelled."""
    return _task_images(targets, current, earlier=())


def absent_task_images(targets: Sequence[Target], current: Sequence[int], earlier: Sequence[int]) -> tuple[list[int], list[Target]]:
    """Absent ("non-co-occurrence") setting (IOR): the standard images of the task minus every
    image whose original annotations hold an object of a class seen before the task; future
    objects may remain. With no earlier classes it is the standard filter. IOR's code defines it
    for two tasks; dropping images of any class seen before the task, for more tasks, is the
    protocol as clbench reconstructs it."""
    return _task_images(targets, current, earlier)


def _task_images(targets: Sequence[Target], current: Sequence[int], earlier: Sequence[int]) -> tuple[list[int], list[Target]]:
    # one pass over all boxes at once: a per-image loop of tensor ops takes tens of seconds on COCO
    if not len(targets):
        return [], []
    counts = torch.tensor([len(t["labels"]) for t in targets])
    labels = torch.cat([t["labels"] for t in targets])
    ignore = torch.cat([t["ignore"] for t in targets])
    image = torch.repeat_interleave(torch.arange(len(targets)), counts)
    mine = torch.isin(labels, torch.as_tensor(list(current), dtype=torch.long))
    wanted = torch.zeros(len(targets), dtype=torch.bool).index_fill_(0, image[mine & ~ignore], True)
    if len(earlier):
        holds_earlier = torch.isin(labels, torch.as_tensor(list(earlier), dtype=torch.long))
        wanted.index_fill_(0, image[holds_earlier], False)
    rows = wanted.nonzero().flatten().tolist()
    kept_box = mine & wanted[image]
    per_image = torch.bincount(image[kept_box], minlength=len(targets))[rows].tolist()
    boxes = torch.cat([t["boxes"] for t in targets])
    parts = [v[kept_box].split(per_image) for v in (boxes, labels, ignore)]
    return rows, [{"boxes": b, "labels": lab, "ignore": ign} for b, lab, ign in zip(*parts)]


SETTINGS = {"standard": standard_task_images, "absent": absent_task_images}


def task_images(setting: str, targets: Sequence[Target], current: Sequence[int], earlier: Sequence[int]):
    if setting == "standard":
        return standard_task_images(targets, current)
    if setting == "absent":
        return absent_task_images(targets, current, earlier)
    raise ValueError(f"IOD setting {setting!r} is unknown; expected one of {sorted(SETTINGS)}")


# --------------------------------------------------------------------------- evaluation
@dataclass(frozen=True)
class APConvention:
    """Which AP a detection scenario reports (stored with every number)."""

    metric: str  # "AP50" (VOC) or "AP" (COCO, IoU .50:.95)
    iou_thresholds: tuple[float, ...] | None  # None: torchmetrics' default .50:.05:.95

    @property
    def description(self) -> str:
        ious = "IoU 0.5" if self.iou_thresholds == (0.5,) else "IoU .50:.95"
        return f"{self.metric}: COCO-style 101-point AP at {ious} (torchmetrics MeanAveragePrecision, pycocotools backend)"


VOC_AP50 = APConvention("AP50", (0.5,))
COCO_AP = APConvention("AP", None)


def class_ap(predictions: Sequence[dict], targets: Sequence[Target], seen: Sequence[int],
             convention: APConvention = VOC_AP50) -> dict[int, float]:
    """Per-class AP of `predictions` against `targets`, both restricted to the `seen` classes;
    classes without ground truth are left out (torchmetrics reports them as -1).

    Ignored boxes go to torchmetrics as `iscrowd`, so matching one is neither a true nor a
    false positive (the VOC "difficult" rule and COCO's crowd rule).
    """
    try:
        from torchmetrics.detection import MeanAveragePrecision
    except ImportError as e:  # pragma: no cover - torchmetrics ships with Lightning
        raise ImportError("detection evaluation needs torchmetrics: pip install torchmetrics pycocotools") from e
    metric = MeanAveragePrecision(
        box_format="xyxy", iou_type="bbox", class_metrics=True, backend="pycocotools",
        iou_thresholds=list(convention.iou_thresholds) if convention.iou_thresholds else None,
    )
    seen_t = torch.as_tensor(list(seen), dtype=torch.long)
    preds, gts = [], []
    for p, t in zip(predictions, targets):
        keep = torch.isin(p["labels"].long().cpu(), seen_t)
        preds.append({"boxes": p["boxes"].detach().float().cpu()[keep], "scores": p["scores"].detach().float().cpu()[keep],
                      "labels": p["labels"].long().cpu()[keep]})
        g = restrict({k: v.cpu() for k, v in t.items()}, seen_t)
        gts.append({"boxes": g["boxes"].float(), "labels": g["labels"], "iscrowd": g["ignore"].long()})
    if not any(len(g["labels"]) for g in gts):
        return {}
    metric.update(preds, gts)
    out = metric.compute()
    classes = out["classes"].reshape(-1).tolist()
    values = out["map_per_class"].reshape(-1).tolist()
    return {int(c): float(v) for c, v in zip(classes, values) if v >= 0 and c in set(seen_t.tolist())}


def mean_over(ap: dict[int, float], classes: Sequence[int]) -> float:
    """Mean AP over the `classes` that have an AP (ground truth in the test set); NaN if none."""
    values = [ap[c] for c in classes if c in ap]
    return sum(values) / len(values) if values else math.nan


def breakdown(ap: dict[int, float], old: Sequence[int], new: Sequence[int]) -> dict[str, float]:
    """Old / new / all mean AP (all = over every seen class with ground truth)."""
    return {"old": mean_over(ap, old), "new": mean_over(ap, new), "all": mean_over(ap, [*old, *new])}


@torch.no_grad()
def evaluate_detection(strategy, loader, info: ExperienceInfo, task_classes: Sequence[Sequence[int]],
                       convention: APConvention = VOC_AP50, device=None) -> tuple[list[float], dict[str, Any]]:
    """After task `info.index`: (row of the accuracy matrix, detail).

    The row holds, per task j, the mean AP over task j's classes (0 for tasks not yet trained,
    like a classifier's masked logits), so the continual-learning summary metrics apply as they
    are; the detail holds per-class AP and the old / new / all breakdown.
    """
    predictions, targets = [], []
    with evaluating(strategy, device) as device:
        for batch in loader:
            batch = batch.to(device)
            predictions.extend(strategy.detect(batch.x, info.seen_classes))
            targets.extend(batch.targets)
    ap = class_ap(predictions, targets, info.seen_classes, convention)
    row = [mean_over(ap, classes) if j <= info.index else 0.0 for j, classes in enumerate(task_classes)]
    row = [0.0 if (j <= info.index and math.isnan(v)) else v for j, v in enumerate(row)]
    detail = {"ap_per_class": {str(c): v for c, v in sorted(ap.items())},
              **breakdown(ap, info.past_classes, info.classes)}
    return row, detail


def final_ap(part: str):
    """A stored detection result's final-task mean AP over `part` (all / old / new) classes."""

    def get(r):
        per_task = (r.detection or {}).get("per_task") or []
        value = per_task[-1].get(part) if per_task else None
        return None if value is None or math.isnan(value) else value

    return get


def ap_summary(key: str):
    return lambda r: r.metrics.get(key)


class DetectionTask(Task):
    """The accuracy matrix of a detection run holds per-task mean AP, so the continual-learning
    summary metrics apply to it as they are; `result.detection` keeps the per-class detail."""

    name = "detection"
    matrix_name = "per-task mean AP"
    headline = "final_ap_all"
    builds_own_model = True

    def build_model(self, strategy_cls, scenario, run_cfg, cfg):
        if run_cfg.backbone:
            raise UsageError(f"backbone={run_cfg.backbone!r} does not apply to detection strategies; "
                             f"expected no --backbone (each builds its detector from its Config)")
        return None, strategy_cls.detector_name, cfg

    def start(self, result, strategy, scenario, loaders, device) -> None:
        result.initial_accuracy = [0.0] * scenario.num_experiences  # nothing seen: no class can score
        result.detection = {"metric": scenario.convention.metric, "convention": scenario.convention.description,
                            "class_names": scenario.class_names, "per_task": []}

    def after_experience(self, result, strategy, info, scenario, loaders, device) -> None:
        row, detail = evaluate_detection(strategy, loaders[0], info, scenario.task_classes, scenario.convention,
                                         device=device)
        result.detection["per_task"].append({"task": info.index, **detail})
        result.accuracy_matrix.append(row)

    def finish(self, result) -> None:
        result.metrics = M.summarise(result.accuracy_matrix, result.initial_accuracy)

    def columns(self) -> list[Column]:
        return [Column("final_ap_all", "Final AP all", True, final_ap("all"), 100.0, ".1f", "%"),
                Column("final_ap_old", "Final AP old", True, final_ap("old"), 100.0, ".1f", "%"),
                Column("final_ap_new", "Final AP new", True, final_ap("new"), 100.0, ".1f", "%"),
                Column("avg_incremental_ap", "Avg inc. AP", True, ap_summary("avg_incremental_acc"), 100.0, ".1f", "%"),
                Column("forgetting_ap", "Forgetting (AP)", False, ap_summary("forgetting_max"), 100.0, ".1f", "%")]

    def print_matrix(self, result, out) -> None:
        metric = (result.detection or {}).get("metric", "AP")
        print(f"{self.matrix_name} ({metric}, %) matrix, rows: after training task i; columns: test task j", file=out)
        print(format_matrix(result.accuracy_matrix), file=out)
