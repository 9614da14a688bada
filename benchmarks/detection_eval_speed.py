"""Detection AP: clbench's evaluation (`class_ap`, one faster-coco-eval pass) against pycocotools'
COCOeval on the same detections, timed in one run; also checks that both give the same AP.

    python benchmarks/detection_eval_speed.py [--images 2000] [--classes 20] [--detections 100]
                                              [--convention coco] [--repeats 3] [--torchmetrics]

Random data: per image 1-8 ground-truth boxes (10% ignored), `--detections` detections (70%
jittered copies of ground truth, the rest at random places and classes). Both contenders start
from the same per-image tensors and end with per-class AP: pycocotools builds its COCO objects
from dicts, runs `evaluate()` and `accumulate()` with the same parameters (the convention's IoU
thresholds, 101 recall points, 100 detections, area "all") and per-class AP is read from its
precision array, one pass for all classes. Each runs once untimed, then both round-robin
`--repeats` times (load on shared cores hits both alike); prints the medians, the ratio
clbench / pycocotools (the target is <= 0.5) and the largest per-class AP difference.
`--torchmetrics` also times torchmetrics' `MeanAveragePrecision(class_metrics=True,
backend="pycocotools")`, what clbench used before (it evaluates once more per class), once.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import time

import numpy as np
import torch


def make_data(images: int, classes: int, detections: int, seed: int = 0):
    g = np.random.default_rng(seed)
    predictions, targets = [], []
    for _ in range(images):
        k = int(g.integers(1, 9))
        xy, wh = g.uniform(0, 500, (k, 2)), g.uniform(8, 200, (k, 2))
        gt = np.concatenate([xy, xy + wh], 1)
        labels = g.integers(0, classes, k)
        j = g.integers(0, k, detections)
        det = gt[j] + g.normal(0, 0.1, (detections, 4)) * np.concatenate([wh[j], wh[j]], 1)
        stray = g.random(detections) < 0.3
        xy2, wh2 = g.uniform(0, 500, (detections, 2)), g.uniform(8, 200, (detections, 2))
        det[stray] = np.concatenate([xy2, xy2 + wh2], 1)[stray]
        det[:, 2:] = np.maximum(det[:, 2:], det[:, :2] + 1)
        det_labels = np.where(stray, g.integers(0, classes, detections), labels[j])
        targets.append({"boxes": torch.tensor(gt, dtype=torch.float32), "labels": torch.tensor(labels),
                        "ignore": torch.tensor(g.random(k) < 0.1)})
        predictions.append({"boxes": torch.tensor(det, dtype=torch.float32), "labels": torch.tensor(det_labels),
                            "scores": torch.tensor(g.random(detections), dtype=torch.float32)})
    return predictions, targets


def pycocotools_ap(predictions, targets, seen, convention):
    """Per-class AP with pycocotools, from the same tensors (the reference and the baseline)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    crowd = convention.ignored == "crowd"
    annotations, results = [], []
    for i, (p, t) in enumerate(zip(predictions, targets)):
        for b, label, ign in zip(t["boxes"].double().tolist(), t["labels"].tolist(), t["ignore"].tolist()):
            w, h = b[2] - b[0], b[3] - b[1]
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": label + 1,
                                "bbox": [b[0], b[1], w, h], "area": w * h if (crowd or not ign) else -1.0,
                                "iscrowd": int(ign and crowd)})
        for b, s, label in zip(p["boxes"].double().tolist(), p["scores"].double().tolist(), p["labels"].tolist()):
            results.append({"image_id": i + 1, "category_id": label + 1, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                            "score": s})
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": [{"id": i + 1} for i in range(len(targets))],
                      "categories": [{"id": c + 1} for c in seen], "annotations": annotations}
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes(results), "bbox")
        evaluator.params.catIds = [c + 1 for c in seen]
        evaluator.params.iouThrs = np.asarray(convention.iou_thresholds, dtype=np.float64)
        evaluator.params.maxDets = [100]
        evaluator.params.areaRng, evaluator.params.areaRngLbl = [[0, 1e5**2]], ["all"]
        evaluator.evaluate()
        evaluator.accumulate()
    out = {}
    for k, c in enumerate(seen):
        s = evaluator.eval["precision"][:, :, k, 0, -1]
        out[c] = float(np.mean(s[s > -1])) if (s > -1).any() else None
    return out


def torchmetrics_ap(predictions, targets, seen):
    from torchmetrics.detection import MeanAveragePrecision

    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", class_metrics=True, backend="pycocotools")
    metric.update(predictions, [{"boxes": t["boxes"], "labels": t["labels"], "iscrowd": t["ignore"].long()}
                                for t in targets])
    with contextlib.redirect_stdout(io.StringIO()):
        out = metric.compute()
    return dict(zip(out["classes"].tolist(), out["map_per_class"].tolist()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--detections", type=int, default=100)
    parser.add_argument("--convention", default="coco", choices=["coco", "coco101"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torchmetrics", action="store_true")
    args = parser.parse_args()

    from clbench.tasks.detection import CONVENTIONS, class_ap, coco_engine

    convention = CONVENTIONS[args.convention]
    predictions, targets = make_data(args.images, args.classes, args.detections)
    seen = list(range(args.classes))
    contenders = {"clbench": lambda: class_ap(predictions, targets, seen, convention),
                  "pycocotools": lambda: pycocotools_ap(predictions, targets, seen, convention)}
    results = {name: f() for name, f in contenders.items()}  # untimed first call
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.repeats):
        for name, f in contenders.items():
            start = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - start)
    ours, ref = (statistics.median(times[n]) for n in ("clbench", "pycocotools"))
    diff = max(abs(results["clbench"][c] - results["pycocotools"][c]) for c in seen if results["pycocotools"][c] is not None)
    print(f"{args.images} images x {args.classes} classes x {args.detections} detections, convention {convention.name}, "
          f"engine {coco_engine()}, median of {args.repeats}")
    print(f"clbench class_ap: {ours:.2f} s   pycocotools COCOeval: {ref:.2f} s   ratio clbench/pycocotools: {ours / ref:.3f}"
          f" (target <= 0.5)")
    print(f"largest per-class AP difference: {diff:.2e}")
    if args.torchmetrics:
        start = time.perf_counter()
        tm = torchmetrics_ap(predictions, targets, seen)
        elapsed = time.perf_counter() - start
        tm_diff = max(abs(tm[c] - results["pycocotools"][c]) for c in seen if results["pycocotools"][c] is not None)
        print(f"torchmetrics MeanAveragePrecision(class_metrics=True): {elapsed:.2f} s (ratio to pycocotools "
              f"{elapsed / ref:.2f}), largest per-class AP difference {tm_diff:.2e}")


if __name__ == "__main__":
    main()
