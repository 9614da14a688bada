"""Incremental object detection (IOD): the protocol every detection strategy and scenario shares.

Terms: a task (= experience) adds *current* classes; classes of
earlier tasks are *old*, of later tasks *future*; *seen* = old + current.  Labels are
positions in the benchmark's class order, boxes are `xyxy` in pixels of the image as fed.

- Task data: `standard_task_images` (keep every image with a current-class object, only its
  current-class boxes) and `absent_task_images` (also drop images holding any earlier class).
  Crowd (COCO) and difficult (VOC) boxes travel as `ignore` flags, never as targets.
- Evaluation after every task (`evaluate_detection`): the full test set with ground truth
  restricted to seen classes, predictions restricted to seen classes, per-class AP under the
  scenario's `APConvention` (`voc07`: VOC 2007 11-point AP50, computed here; `coco101`:
  COCO-style 101-point AP50; `coco`: AP at IoU .50:.95; the last two from one COCOeval pass of
  faster-coco-eval, pycocotools' float64 thresholds), and the old / new / all means over the
  classes that have a test box (a class without one has AP None, never 0).
- `DetectionTask`: what the runner and the reports ask of a detection run (the per-task AP
  record, the AP columns).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from clbench import metrics as M
from clbench.datasets import Target
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
# pycocotools' own grids (cocoeval.Params): float64, so an IoU exactly on a threshold (0.55,
# 0.6, ...) is a match as in pycocotools; torchmetrics' float32 linspaces put 0.55 at 0.55000001
COCO_IOU_THRESHOLDS = tuple(np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True).tolist())
RECALL_THRESHOLDS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
# voc_eval's 11 recall points, np.arange(0., 1.1, 0.1), kept bit for bit: its 0.3 is
# 0.30000000000000004, so a recall of exactly 3/10 does not reach that point, as in the reference
VOC07_RECALL_POINTS = np.arange(0.0, 1.1, 0.1)
MAX_DETECTIONS = 100  # COCOeval's per image and class cap (maxDets[-1]); the VOC07 rule has none


@dataclass(frozen=True)
class APConvention:
    """Which AP a detection scenario reports (its name is stored with every number).

    - `voc07`: PASCAL VOC 2007 11-point interpolated AP at IoU > 0.5 (py-faster-rcnn /
      Detectron `voc_eval`, `use_07_metric=True`); a detection whose best-overlapping box of its
      class is difficult (ignored) is neither a true nor a false positive.
    - `coco101`: COCO-style 101-point AP at IoU >= 0.5 (COCOeval on VOC converted to COCO
      format, as DETR-based codebases evaluate VOC); ignored boxes are ignored ground truth
      matched by plain IoU, not crowd boxes.
    - `coco`: COCOeval AP averaged over IoU .50:.05:.95; ignored boxes are COCO crowd boxes
      (intersection over the detection's area, any number of detections absorbed).
    """

    name: str
    metric: str  # "AP50" (VOC-style) or "AP" (COCO, IoU .50:.95)
    iou_thresholds: tuple[float, ...]
    ignored: str  # what an ignore flag means: "difficult" (VOC) or "crowd" (COCO)

    @property
    def description(self) -> str:
        if self.name == "voc07":
            return ("AP50: PASCAL VOC 2007 11-point interpolated AP at IoU > 0.5, greedy by score, each box matched "
                    "once, detections best-overlapping a difficult box ignored (voc_eval, use_07_metric)")
        ious = "IoU >= 0.5" if self.iou_thresholds == (0.5,) else "IoU .50:.05:.95"
        ignored = ("difficult boxes ignored, matched by IoU" if self.ignored == "difficult"
                   else "crowd boxes ignored (COCO crowd rule)")
        return (f"{self.metric}: COCO-style 101-point interpolated AP at {ious}, at most {MAX_DETECTIONS} detections "
                f"per image and class, {ignored} (COCOeval)")


VOC07 = APConvention("voc07", "AP50", (0.5,), "difficult")
COCO101_AP50 = APConvention("coco101", "AP50", (0.5,), "difficult")
COCO_AP = APConvention("coco", "AP", COCO_IOU_THRESHOLDS, "crowd")
VOC_AP50 = COCO101_AP50  # clbench's default for VOC-style scenarios
CONVENTIONS = {c.name: c for c in (VOC07, COCO101_AP50, COCO_AP)}


def coco_engine() -> str:
    """The COCOeval implementation `class_ap` uses: faster-coco-eval (C++), else pycocotools
    (the same numbers, slower)."""
    try:
        import faster_coco_eval  # noqa: F401
    except ImportError:
        try:
            import pycocotools  # noqa: F401
        except ImportError as e:
            raise ImportError("detection evaluation needs faster-coco-eval (pip install faster-coco-eval) "
                              "or pycocotools") from e
        return f"pycocotools {_version('pycocotools')}"
    return f"faster-coco-eval {_version('faster-coco-eval')}"


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:  # pragma: no cover - imported but not installed as a distribution
        return "unknown"


@dataclass
class _Boxes:
    """Boxes of every image in one array, in image order: `image[i]` is box i's image."""

    image: np.ndarray  # int64
    boxes: np.ndarray  # float64 (n, 4), xyxy pixel edges
    labels: np.ndarray  # int64
    extra: np.ndarray  # detections: scores (float64); ground truth: ignore flags (bool)

    def per_image(self, n_images: int) -> list[slice]:
        bounds = np.searchsorted(self.image, np.arange(n_images + 1))
        return [slice(a, b) for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist())]


def _flatten(items: Sequence[dict], seen_a: np.ndarray, extra: str) -> _Boxes:
    """The `seen_a`-class boxes of every image, stored dtypes widened to float64 without rounding."""
    counts = [len(item["labels"]) for item in items]
    image = np.repeat(np.arange(len(items), dtype=np.int64), counts)
    if not sum(counts):
        return _Boxes(image, np.zeros((0, 4)), np.zeros(0, np.int64), np.zeros(0, bool if extra == "ignore" else float))
    boxes = np.concatenate([_numpy(item["boxes"]).reshape(-1, 4) for item in items]).astype(np.float64)
    labels = np.concatenate([_numpy(item["labels"]).reshape(-1) for item in items]).astype(np.int64)
    if extra == "ignore":
        values = np.concatenate([_numpy(item["ignore"]).reshape(-1) if "ignore" in item else np.zeros(n, bool)
                                 for item, n in zip(items, counts)]).astype(bool)
    else:
        values = np.concatenate([_numpy(item["scores"]).reshape(-1) for item in items]).astype(np.float64)
    keep = np.isin(labels, seen_a)
    return _Boxes(image[keep], boxes[keep], labels[keep], values[keep])


def _numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def class_ap(predictions: Sequence[dict], targets: Sequence[Target], seen: Sequence[int],
             convention: APConvention = VOC_AP50) -> dict[int, float | None]:
    """Per-class AP of `predictions` against `targets`, both restricted to the `seen` classes,
    for every seen class: None ("no AP") for a class without a non-ignored test box.

    `voc07` is computed here (`voc07_ap`); `coco101` and `coco` by one COCOeval pass
    (`cocoeval_ap`), per-class AP read from its accumulated precision array.
    """
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} images; expected one per image")
    seen_a = np.asarray(sorted(set(int(c) for c in seen)), dtype=np.int64)
    dets, gts = _flatten(predictions, seen_a, "scores"), _flatten(targets, seen_a, "ignore")
    if convention.name == "voc07":
        return voc07_ap(dets, gts, seen_a, len(targets))
    return cocoeval_ap(dets, gts, seen_a, convention, len(targets))


def _positives(gts: _Boxes, seen_a: np.ndarray) -> dict[int, int]:
    counted = np.bincount(gts.labels[~gts.extra], minlength=int(seen_a.max()) + 1 if len(seen_a) else 0)
    return {c: int(counted[c]) for c in seen_a.tolist()}


def voc07_ap(dets: _Boxes, gts: _Boxes, seen_a: np.ndarray, n_images: int) -> dict[int, float | None]:
    """PASCAL VOC 2007 AP50 (py-faster-rcnn's `voc_eval` with `use_07_metric=True`).

    Detections of a class are taken in descending score (ties: image order, then the order
    within the image); each is compared with every box of its class in its image, difficult
    ones included, and its best overlap `ovmax` (first box on a tie) decides: `ovmax > 0.5`
    on a difficult box -> ignored; on a box not yet matched -> true positive (the box is now
    matched); on a matched box, or `ovmax <= 0.5` -> false positive. AP = mean over the 11
    recall points t of the best precision at recall >= t. Boxes are pixel edges, so the
    overlap needs no VOC "+1" (`read_voc` turns 1-based inclusive pixels into edges).
    No cap on detections per image.
    """
    positives = _positives(gts, seen_a)
    best = np.zeros(len(dets.labels), np.int64)  # index into gts of each detection's best-overlapping box
    overlap = np.full(len(dets.labels), -np.inf)
    for d, g in zip(dets.per_image(n_images), gts.per_image(n_images)):
        if d.start == d.stop or g.start == g.stop:
            continue
        iou = _iou(dets.boxes[d], gts.boxes[g])
        iou[dets.labels[d][:, None] != gts.labels[g][None, :]] = -np.inf  # only boxes of the detection's class
        j = iou.argmax(1)
        best[d], overlap[d] = g.start + j, iou[np.arange(len(j)), j]
    out: dict[int, float | None] = {}
    for c in seen_a.tolist():
        if positives[c] == 0:
            out[c] = None
            continue
        mine = np.flatnonzero(dets.labels == c)
        if not len(mine):
            out[c] = 0.0
            continue
        order = mine[np.argsort(-dets.extra[mine], kind="stable")]
        hit = overlap[order] > 0.5
        on_difficult = np.zeros(len(order), bool)
        on_difficult[hit] = gts.extra[best[order][hit]]
        rows = np.flatnonzero(hit & ~on_difficult)
        _, first = np.unique(best[order][rows], return_index=True)  # the first detection on each box
        tp = np.zeros(len(order), bool)
        tp[rows[first]] = True
        counted = ~on_difficult  # an ignored detection is neither: it adds nothing to either count
        out[c] = _voc07_from_counts(np.cumsum(tp[counted]), np.cumsum(~tp[counted]), positives[c])
    return out


def _voc07_from_counts(tp: np.ndarray, fp: np.ndarray, positives: int) -> float:
    recall = tp / float(positives)
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    ap = 0.0
    for t in VOC07_RECALL_POINTS:
        reached = recall >= t
        ap += (precision[reached].max() if reached.any() else 0.0) / 11.0
    return float(ap)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of `a` with every box of `b` (xyxy pixel edges); 0 where the union is empty."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def cocoeval_ap(dets: _Boxes, gts: _Boxes, seen_a: np.ndarray, convention: APConvention,
                n_images: int) -> dict[int, float | None]:
    """Per-class COCO-style AP from ONE COCOeval pass (faster-coco-eval, else pycocotools):
    pycocotools' float64 IoU and 101 recall thresholds, at most 100 detections per image and
    class, area range "all"; a class's AP is the mean of its accumulated precision over the
    IoU thresholds and recall points, as `COCOeval.summarize` averages over all classes.

    Ignored boxes: `crowd` -> `iscrowd: 1` (COCO's rule). `difficult` -> an ignored box matched
    by plain IoU: COCOeval's only other per-box ignore input is the area range, so such a box
    gets area -1, outside every range, and stays `iscrowd: 0` (its overlap is plain IoU; the box
    area is used for nothing else here).
    """
    positives = _positives(gts, seen_a)
    out: dict[int, float | None] = {c: (None if n == 0 else 0.0) for c, n in positives.items()}
    if not any(positives.values()) or not len(dets.labels):
        return out  # no ground truth: nothing to score; no detection: AP 0 for each class with ground truth
    crowd = convention.ignored == "crowd"
    g_xywh = np.concatenate([gts.boxes[:, :2], gts.boxes[:, 2:] - gts.boxes[:, :2]], 1)
    g_area = np.where(gts.extra & ~crowd, -1.0, g_xywh[:, 2] * g_xywh[:, 3])
    g_crowd = (gts.extra & crowd).astype(np.int64)
    annotations = [{"id": k + 1, "image_id": i + 1, "category_id": c + 1, "bbox": box, "area": area, "iscrowd": cr}
                   for k, (i, c, box, area, cr) in enumerate(zip(gts.image.tolist(), gts.labels.tolist(), g_xywh.tolist(),
                                                                 g_area.tolist(), g_crowd.tolist()))]
    # what `COCO.loadRes` makes of a bbox result list (area w*h, id, iscrowd 0), without the
    # segmentation polygons it also builds and bbox evaluation never reads
    d_xywh = np.concatenate([dets.boxes[:, :2], dets.boxes[:, 2:] - dets.boxes[:, :2]], 1)
    results = [{"id": k + 1, "image_id": i + 1, "category_id": c + 1, "bbox": box, "score": s, "area": box[2] * box[3],
                "iscrowd": 0}
               for k, (i, c, box, s) in enumerate(zip(dets.image.tolist(), dets.labels.tolist(), d_xywh.tolist(),
                                                      dets.extra.tolist()))]
    images = [{"id": i + 1} for i in range(n_images)]
    categories = [{"id": c + 1} for c in seen_a.tolist()]
    precision = _run_cocoeval({"images": images, "categories": categories, "annotations": annotations},
                              {"images": images, "categories": categories, "annotations": results},
                              convention.iou_thresholds, [c + 1 for c in seen_a.tolist()])
    for k, c in enumerate(seen_a.tolist()):
        p = precision[:, :, k, 0, -1]
        valid = p[p > -1]
        out[c] = float(valid.mean()) if valid.size else None
    return out


def _run_cocoeval(gt: dict, dt: dict, iou_thresholds, cat_ids: list[int]) -> np.ndarray:
    """The accumulated precision array [IoU, recall, class, area, maxDets] of one COCOeval pass."""
    import contextlib
    import io

    try:
        from faster_coco_eval import COCO, COCOeval_faster as COCOeval

        def coco(dataset):
            return COCO(dataset, print_function=_quiet)

        quiet = {"print_function": _quiet}
    except ImportError:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        def coco(dataset):
            api = COCO()
            api.dataset = dataset
            api.createIndex()
            return api

        quiet = {}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        evaluator = COCOeval(coco(gt), coco(dt), iouType="bbox", **quiet)
        params = evaluator.params
        params.imgIds = [image["id"] for image in gt["images"]]
        params.catIds = list(cat_ids)
        params.iouThrs = np.asarray(iou_thresholds, dtype=np.float64)
        params.recThrs = RECALL_THRESHOLDS.copy()
        params.maxDets = [MAX_DETECTIONS]
        params.areaRng, params.areaRngLbl = [[0.0, 1e5**2]], ["all"]
        evaluator.evaluate()
        evaluator.accumulate()
    return np.asarray(evaluator.eval["precision"])


def _quiet(*args, **kwargs) -> None:
    pass


def mean_over(ap: dict[int, float | None], classes: Sequence[int]) -> float:
    """Mean AP over the `classes` that have an AP (a non-ignored test box); NaN if none."""
    values = [ap[c] for c in classes if ap.get(c) is not None]
    return sum(values) / len(values) if values else math.nan


def breakdown(ap: dict[int, float | None], old: Sequence[int], new: Sequence[int]) -> dict[str, float]:
    """Old / new / all mean AP (all = over every seen class with an AP); NaN where no class of the
    group has one (no old class in the first task), never 0."""
    return {"old": mean_over(ap, old), "new": mean_over(ap, new), "all": mean_over(ap, [*old, *new])}


def in_original_pixels(items: Sequence[dict], scales: torch.Tensor) -> list[dict]:
    """Detections or targets with their boxes divided by their image's `(x, y)` resize factor
    `scales[i]` (float64 `[N, 2]`), so they are in the original image's pixels (float64). Predictions
    and ground truth of one image always go through the same factor, so AP compares them in one frame."""
    out = []
    for item, (sx, sy) in zip(items, scales.tolist()):
        factor = torch.tensor([sx, sy, sx, sy], dtype=torch.float64)
        out.append({**item, "boxes": item["boxes"].detach().cpu().double().reshape(-1, 4) / factor})
    return out


def _original_scales(loader, n: int) -> torch.Tensor | None:
    """The test images' resize factors, in the order the (unshuffled) loader yields them; None
    when its dataset does not record them or is not read in order (then boxes stay as fed)."""
    dataset = getattr(loader, "dataset", None)
    sampler = getattr(loader, "sampler", None)
    if not hasattr(dataset, "original_scales") or not isinstance(sampler, torch.utils.data.SequentialSampler):
        return None
    scales = dataset.original_scales()
    if len(scales) != n or bool((scales == 1).all()):
        return None
    return scales


@torch.no_grad()
def evaluate_detection(strategy, loader, info: ExperienceInfo, task_classes: Sequence[Sequence[int]],
                       convention: APConvention = VOC_AP50, device=None,
                       class_names: Sequence[str] | None = None) -> tuple[list[float], dict[str, Any]]:
    """After task `info.index`: (row of the accuracy matrix, detail).

    Boxes are compared in the original images' pixels: predictions (in the pixels of the image as
    fed, each inside its valid area of a padded batch) and ground truth are both divided by the
    image's resize factor (`DetectionDataset.original_scales`) before AP is computed.

    The row holds, per task j, the mean AP over task j's classes that have an AP (0 for tasks
    not yet trained, like a classifier's masked logits; NaN for a trained task none of whose
    classes has a test box, which the detection scenarios refuse before training), so the
    continual-learning summary metrics apply as they are; the detail holds per-class AP (None:
    no test box, with a note) and the old / new / all breakdown over classes with an AP.
    """
    predictions, targets = [], []
    with evaluating(strategy, device) as device:
        for batch in loader:
            batch = batch.to(device)
            padded = {"image_sizes": batch.image_sizes} if getattr(batch, "padded", False) else {}
            predictions.extend(strategy.detect(batch.x, info.seen_classes, **padded))
            targets.extend(batch.targets)
    if not targets:
        raise UsageError("detection evaluation got an empty test set; expected at least one test image")
    scales = _original_scales(loader, len(targets))
    if scales is not None:
        predictions, targets = in_original_pixels(predictions, scales), in_original_pixels(targets, scales)
    ap = class_ap(predictions, targets, info.seen_classes, convention)
    row = [mean_over(ap, classes) if j <= info.index else 0.0 for j, classes in enumerate(task_classes)]
    missing = [c for c, v in sorted(ap.items()) if v is None]
    detail: dict[str, Any] = {"ap_per_class": {str(c): v for c, v in sorted(ap.items())},
                              **breakdown(ap, info.past_classes, info.classes)}
    if missing:
        names = [f"{c} ({class_names[c]})" if class_names else str(c) for c in missing]
        detail["notes"] = [f"no AP for class {', '.join(names)}: the test set has no non-ignored box of "
                           f"{'it' if len(missing) == 1 else 'them'}; left out of every mean"]
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
        """No classification backbone: the strategy builds its detector from its Config. The run
        flags `--pretrained`, `--weights FILE` and `--download` become Config fields of the
        detector (`strategy_cls.run_flag_settings`: GFL's `backbone_weights` / `download_weights`,
        the DETR family's `base` / `base_download`), with classification's offline-first rule:
        nothing is fetched without `--download`, a missing file stops the run naming it. The model
        name recorded is the built detector's (`strategy_cls.model_name(cfg)`: `tiny_gfl`,
        `r50_fpn_gfl`, `tiny_detr`, `deformable_detr_r50`)."""
        if run_cfg.backbone:
            raise UsageError(f"backbone={run_cfg.backbone!r} does not apply to detection strategies; "
                             f"expected no --backbone (each builds its detector from its Config)")
        flags = getattr(strategy_cls, "run_flag_settings", None)
        if cfg is not None and flags is not None:
            settings = flags(cfg, bool(run_cfg.pretrained), run_cfg.weights, bool(run_cfg.download))
            if settings:
                from dataclasses import replace

                cfg = replace(cfg, **settings)
        name = strategy_cls.model_name(cfg) if hasattr(strategy_cls, "model_name") else strategy_cls.detector_name
        return None, name, cfg

    def start(self, result, strategy, scenario, loaders, device) -> None:
        result.initial_accuracy = [0.0] * scenario.num_experiences  # nothing seen: no class can score
        convention = scenario.convention
        result.detection = {"metric": convention.metric, "convention": convention.name,
                            "convention_description": convention.description,
                            "engine": "clbench voc07_ap (numpy)" if convention.name == "voc07" else coco_engine(),
                            "class_names": scenario.class_names, "per_task": []}

    def after_experience(self, result, strategy, info, scenario, loaders, device) -> None:
        row, detail = evaluate_detection(strategy, loaders[0], info, scenario.task_classes, scenario.convention,
                                         device=device, class_names=scenario.class_names)
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
