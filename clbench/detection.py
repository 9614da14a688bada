"""Incremental object detection (IOD): the protocol every detection strategy and scenario shares.

Terms (see the IOD protocol card): a task (= experience) adds *current* classes; classes of
earlier tasks are *old*, of later tasks *future*; *seen* = old + current.  Labels are
positions in the benchmark's class order, boxes are `xyxy` in pixels of the image as fed.

- Task data: `standard_task_images` (keep every image with a current-class object, only its
  current-class boxes) and `absent_task_images` (also drop images holding any earlier class).
  Crowd (COCO) and difficult (VOC) boxes travel as `ignore` flags, never as targets.
- Evaluation after every task (`evaluate_detection`): the full test set with ground truth
  restricted to seen classes, predictions restricted to seen classes, per-class AP from
  torchmetrics' `MeanAveragePrecision` (pycocotools backend, COCO-style 101-point
  interpolation), and the old / new / all means over classes that have ground truth.
- `DetectionStrategy`: the LightningModule contract of a detection method (a detector built
  from the method's Config instead of a classification backbone and head).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import Dataset

from clbench.base import CLStrategy, evaluating, frozen_snapshot
from clbench.types import ExperienceInfo

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
    protocol card's reconstruction."""
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


# --------------------------------------------------------------------------- strategy contract
class DetectionStrategy(CLStrategy):
    """Base of every incremental-detection method.

    The experience loop, optimiser, finiteness checks and logging are `CLStrategy`'s; what
    differs: the model is a detector the method builds from its Config (`build_detector`; the
    runner passes no classification backbone), batches are `DetectionBatch`es, and evaluation
    calls `detect`, which returns seen-class detections only.
    """

    task_type: ClassVar[str] = "detection"
    # names the model in results (where classification runs name their backbone)
    detector_name: ClassVar[str] = "detector"
    accepts_aux: ClassVar[set[str] | None] = set()
    contract_scenario: ClassVar[str] = "shapes-2+2"
    input_channels: ClassVar[int | None] = 3

    def __init__(self, backbone: nn.Module | None, num_classes: int, cfg=None, aux: Sequence[nn.Module] = (), seed: int = 0):
        pl.LightningModule.__init__(self)  # CLStrategy's own __init__ builds a classification head
        self.cfg = cfg if cfg is not None else self.Config()
        self.init_loop_state(num_classes, aux, seed)
        self.detector = self.build_detector(num_classes)

    def build_detector(self, num_classes: int) -> nn.Module:
        """The method's detector; it grows or masks its own classifier per task."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor):
        return self.detector(x)

    # ----------------------------------------------------------- inference
    def predict_detections(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Per image `{"boxes", "scores", "labels"}` of the method's inference rule."""
        raise NotImplementedError

    @torch.no_grad()
    def detect(self, x: torch.Tensor, seen: Sequence[int]) -> list[dict[str, torch.Tensor]]:
        """`predict_detections` with outputs of unseen classes dropped (methods also mask the
        logits of unseen classes before post-processing; this guarantees it for every method)."""
        seen_t = torch.as_tensor(list(seen), dtype=torch.long, device=x.device)
        out = []
        for p in self.predict_detections(x):
            keep = torch.isin(p["labels"].long(), seen_t)
            out.append({k: v[keep] for k, v in p.items()})
        return out

    def predict(self, x: torch.Tensor):
        return self.predict_detections(x)

    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        raise TypeError(f"{type(self).__name__} is a detection strategy: use detect(), not predict_logits()")

    def step_losses(self, batch: DetectionBatch) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def frozen_copy(self, **more: nn.Module) -> nn.Module:
        """A teacher snapshot of the detector (and of `more` modules), eval mode, gradients off."""
        return frozen_snapshot({"detector": self.detector, **more})
