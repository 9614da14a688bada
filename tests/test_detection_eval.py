"""Detection AP against the reference implementations, on hand-built cases and random data.

- `voc07`: against `voc07_reference` below, written from the published algorithm (py-faster-rcnn's
  `voc_eval` with `use_07_metric=True`: 1-based inclusive pixel boxes with its "+1" overlap,
  greedy by score, `ovmax > 0.5`, difficult boxes ignored, 11 recall points
  `np.arange(0., 1.1, 0.1)`), independent of the code under test. The one choice the published
  code leaves open: it sorts scores with numpy's default (unstable) sort, so the order of tied
  scores is unspecified there; the reference (and clbench) take ties in input order.
- `coco` and `coco101`: against pycocotools' `COCOeval` itself, per-class AP read from its
  precision array as `summarize` averages it. For `coco101` a difficult box is an ignored box
  matched by plain IoU: the reference sets pycocotools' per-box `ignore` after `_prepare` (which
  otherwise overwrites it with `iscrowd`).
"""

from __future__ import annotations

import contextlib
import io
import math
import sys

import numpy as np
import pytest
import torch

from clbench.datasets import make_target
from clbench.tasks.detection import (
    COCO101_AP50,
    COCO_AP,
    CONVENTIONS,
    VOC07,
    breakdown,
    class_ap,
    evaluate_detection,
)


# --------------------------------------------------------------------------- the VOC07 reference
def voc07_reference(detections, annotations, classname, ovthresh=0.5):
    """`voc_eval(..., use_07_metric=True)` for one class.

    detections: list of (image_id, score, [xmin, ymin, xmax, ymax]) in the order they were written;
    annotations: {image_id: [{"name", "bbox" (1-based inclusive), "difficult"}]}. Returns AP, or
    None when the class has no non-difficult box (the published code divides by npos = 0).
    """
    class_recs, npos = {}, 0
    for image_id, objects in annotations.items():
        R = [obj for obj in objects if obj["name"] == classname]
        bbox = np.array([x["bbox"] for x in R], dtype=float).reshape(-1, 4)
        difficult = np.array([x["difficult"] for x in R]).astype(bool)
        npos = npos + sum(~difficult)
        class_recs[image_id] = {"bbox": bbox, "difficult": difficult, "det": [False] * len(R)}
    if npos == 0:
        return None
    image_ids = [d[0] for d in detections]
    confidence = np.array([d[1] for d in detections], dtype=float)
    BB = np.array([d[2] for d in detections], dtype=float).reshape(-1, 4)
    sorted_ind = np.argsort(-confidence, kind="stable")  # ties: input order (see the module docstring)
    BB = BB[sorted_ind, :]
    image_ids = [image_ids[x] for x in sorted_ind]
    nd = len(image_ids)
    tp, fp = np.zeros(nd), np.zeros(nd)
    for d in range(nd):
        R = class_recs[image_ids[d]]
        bb = BB[d, :].astype(float)
        ovmax = -np.inf
        BBGT = R["bbox"].astype(float)
        if BBGT.size > 0:
            ixmin = np.maximum(BBGT[:, 0], bb[0])
            iymin = np.maximum(BBGT[:, 1], bb[1])
            ixmax = np.minimum(BBGT[:, 2], bb[2])
            iymax = np.minimum(BBGT[:, 3], bb[3])
            iw = np.maximum(ixmax - ixmin + 1.0, 0.0)
            ih = np.maximum(iymax - iymin + 1.0, 0.0)
            inters = iw * ih
            uni = ((bb[2] - bb[0] + 1.0) * (bb[3] - bb[1] + 1.0)
                   + (BBGT[:, 2] - BBGT[:, 0] + 1.0) * (BBGT[:, 3] - BBGT[:, 1] + 1.0) - inters)
            overlaps = inters / uni
            ovmax = np.max(overlaps)
            jmax = np.argmax(overlaps)
        if ovmax > ovthresh:
            if not R["difficult"][jmax]:
                if not R["det"][jmax]:
                    tp[d] = 1.0
                    R["det"][jmax] = 1
                else:
                    fp[d] = 1.0
        else:
            fp[d] = 1.0
    fp, tp = np.cumsum(fp), np.cumsum(tp)
    rec = tp / float(npos)
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    ap = 0.0
    for t in np.arange(0.0, 1.1, 0.1):
        p = 0 if np.sum(rec >= t) == 0 else np.max(prec[rec >= t])
        ap = ap + p / 11.0
    return ap


# --------------------------------------------------------------------------- the COCOeval reference
def pycocotools_reference(predictions, targets, seen, convention):
    """Per-class AP of pycocotools' COCOeval (default matching, the convention's IoU thresholds,
    101 recall points, 100 detections, area "all"). Targets' ignore flags: crowd (`coco`) or
    ignored-by-IoU (`coco101`)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    crowd = convention.ignored == "crowd"

    class Reference(COCOeval):
        def _prepare(self):
            super()._prepare()
            if not crowd:
                for gts in self._gts.values():
                    for g in gts:
                        g["ignore"] = int(g["difficult"])

    annotations, results = [], []
    for i, (p, t) in enumerate(zip(predictions, targets)):
        for b, label, ign in zip(t["boxes"].double().tolist(), t["labels"].tolist(), t["ignore"].tolist()):
            if label in seen:
                w, h = b[2] - b[0], b[3] - b[1]
                annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": label + 1,
                                    "bbox": [b[0], b[1], w, h], "area": w * h, "iscrowd": int(ign and crowd),
                                    "difficult": int(ign and not crowd)})
        for b, s, label in zip(p["boxes"].double().tolist(), p["scores"].double().tolist(), p["labels"].tolist()):
            if label in seen:
                results.append({"image_id": i + 1, "category_id": label + 1, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                                "score": s})
    out = {}
    positives = {c: sum(1 for a in annotations if a["category_id"] == c + 1 and not (a["iscrowd"] or a["difficult"]))
                 for c in seen}
    if not results:  # pycocotools' loadRes cannot load an empty list
        return {c: (0.0 if positives[c] else None) for c in seen}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": [{"id": i + 1} for i in range(len(targets))],
                      "categories": [{"id": c + 1} for c in seen], "annotations": annotations}
        gt.createIndex()
        evaluator = Reference(gt, gt.loadRes(results), "bbox")
        evaluator.params.catIds = [c + 1 for c in seen]
        evaluator.params.iouThrs = np.linspace(0.5, 0.95, 10) if convention.metric == "AP" else np.array([0.5])
        evaluator.params.maxDets = [100]
        evaluator.params.areaRng, evaluator.params.areaRngLbl = [[0, 1e5**2]], ["all"]
        evaluator.evaluate()
        evaluator.accumulate()
    for k, c in enumerate(seen):
        s = evaluator.eval["precision"][:, :, k, 0, -1]
        out[c] = float(np.mean(s[s > -1])) if (s > -1).any() else None
    return out


# --------------------------------------------------------------------------- cases
# A case: per image, ground truth [(label, xmin, ymin, xmax, ymax, difficult)] and detections
# [(label, score, xmin, ymin, xmax, ymax)], in VOC's 1-based inclusive pixels; clbench gets pixel
# edges (xmin - 1, ymin - 1, xmax, ymax), the conversion `read_voc` does.
def as_clbench(case):
    predictions, targets = [], []
    for gts, dets in case:
        targets.append(make_target([[x0 - 1, y0 - 1, x1, y1] for _, x0, y0, x1, y1, _ in gts] or torch.zeros(0, 4),
                                   [g[0] for g in gts], [bool(g[5]) for g in gts]))
        predictions.append({"boxes": torch.tensor([[x0 - 1, y0 - 1, x1, y1] for _, _, x0, y0, x1, y1 in dets],
                                                  dtype=torch.float32).reshape(-1, 4),
                            "scores": torch.tensor([d[1] for d in dets], dtype=torch.float32),
                            "labels": torch.tensor([d[0] for d in dets], dtype=torch.long)})
    return predictions, targets


def as_voc(case, label):
    # scores through float32, exactly as clbench receives them
    annotations = {i: [{"name": g[0], "bbox": g[1:5], "difficult": int(g[5])} for g in gts] for i, (gts, _) in enumerate(case)}
    detections = [(i, float(np.float32(d[1])), d[2:]) for i, (_, dets) in enumerate(case) for d in dets if d[0] == label]
    return detections, annotations


def voc07_reference_all(case, seen):
    return {c: voc07_reference(*as_voc(case, c), classname=c) for c in seen}


G = (1, 1, 100, 100)  # a 100 x 100 box
CASES = {
    "one_hit_one_miss": [([(0, *G, 0), (0, 201, 201, 300, 300, 0)], [(0, 0.9, *G), (0, 0.8, 401, 401, 450, 450)])],
    # ties in score across images and inside one image: input order decides, in both implementations
    "ties_in_score": [([(0, *G, 0)], [(0, 0.5, 301, 301, 400, 400), (0, 0.5, *G)]),
                      ([(0, *G, 0)], [(0, 0.5, *G), (0, 0.7, 1, 1, 100, 120)]),
                      ([], [(0, 0.5, 5, 5, 50, 50)])],
    # a small detection inside a big difficult box: IoU 0.04, a false positive for VOC; the COCO
    # crowd rule (intersection over the detection's area = 1) would swallow it
    "difficult_absorbs_nothing_by_iou": [([(0, *G, 0), (0, 201, 201, 400, 400, 1)],
                                          [(0, 0.95, 211, 211, 250, 250), (0, 0.9, *G)])],
    # detections on a difficult box (IoU > 0.5): ignored, however many
    "hits_on_difficult": [([(0, *G, 0), (0, 201, 201, 300, 300, 1)],
                           [(0, 0.99, 201, 201, 300, 300), (0, 0.98, 203, 203, 300, 300), (0, 0.5, *G),
                            (0, 0.4, 501, 501, 600, 600)])],
    # best overlap on a difficult box while also > 0.5 on a normal one: VOC ignores it
    "best_on_difficult": [([(0, 1, 1, 100, 100, 0), (0, 11, 1, 110, 100, 1)], [(0, 0.9, 9, 1, 108, 100)])],
    # best overlap on an already matched box: a false positive for VOC even though another box is free
    "argmax_already_matched": [([(0, 1, 1, 100, 100, 0), (0, 31, 1, 130, 100, 0)],
                                [(0, 0.9, 1, 1, 100, 100), (0, 0.8, 11, 1, 110, 100)])],
    "tiny_boxes": [([(0, 5, 5, 5, 5, 0), (0, 10, 10, 11, 11, 0), (1, 20, 20, 21, 20, 0)],
                    [(0, 0.9, 5, 5, 5, 5), (0, 0.8, 10, 10, 11, 10), (0, 0.7, 10, 10, 11, 11), (1, 0.6, 20, 20, 20, 20)])],
    "images_without_ground_truth": [([], [(0, 0.99, *G), (1, 0.9, *G)]), ([(0, *G, 0)], [(0, 0.5, *G)]),
                                    ([], []), ([(1, *G, 0)], [])],
    # IoU exactly 0.5 (VOC: a miss, strictly greater needed; COCO: a hit) and exactly 0.55 .. 0.9
    "iou_on_thresholds": [([(0, *G, 0)], [(0, 0.9, 1, 1, 100, 50)])]
                         + [([(1, *G, 0)], [(1, 0.9 - k / 100, 1, 1, 100, 100 * t // 100)])
                            for k, t in enumerate((55, 60, 65, 70, 75, 80, 85, 90))],
    # recall exactly 3/10 is below voc_eval's 11-point grid value 0.30000000000000004
    "recall_exactly_three_tenths": [([(0, 1 + 200 * i, 1, 100 + 200 * i, 100, 0) for i in range(10)],
                                     [(0, 0.9 - i / 100, 1 + 200 * i, 1, 100 + 200 * i, 100) for i in range(3)])],
    "only_difficult_ground_truth": [([(0, *G, 1), (1, *G, 0)], [(0, 0.9, *G), (1, 0.9, *G)])],
    "no_detection_at_all": [([(0, *G, 0)], [])],
    "duplicates_and_misses": [([(0, *G, 0), (0, 151, 151, 250, 250, 0), (1, 301, 301, 400, 400, 0)],
                               [(0, 0.9, *G), (0, 0.9, 3, 3, 100, 100), (0, 0.6, 151, 151, 240, 250),
                                (1, 0.95, 301, 301, 400, 400), (1, 0.3, 1, 1, 10, 10)])],
}
SEEN = [0, 1]


@pytest.mark.parametrize("name", sorted(CASES))
def test_voc07_equals_the_published_algorithm_on_hand_built_cases(name):
    case = CASES[name]
    predictions, targets = as_clbench(case)
    ours, reference = class_ap(predictions, targets, SEEN, VOC07), voc07_reference_all(case, SEEN)
    assert ours.keys() == reference.keys()
    for c in SEEN:
        assert (ours[c] is None) == (reference[c] is None), (c, ours, reference)
        if reference[c] is not None:
            assert ours[c] == pytest.approx(reference[c], abs=1e-12), (c, ours, reference)


@pytest.mark.parametrize("convention", [COCO_AP, COCO101_AP50], ids=lambda c: c.name)
@pytest.mark.parametrize("name", sorted(CASES))
def test_coco_conventions_equal_pycocotools_on_hand_built_cases(name, convention):
    predictions, targets = as_clbench(CASES[name])
    ours = class_ap(predictions, targets, SEEN, convention)
    reference = pycocotools_reference(predictions, targets, SEEN, convention)
    assert ours.keys() == reference.keys()
    for c in SEEN:
        assert (ours[c] is None) == (reference[c] is None), (c, ours, reference)
        if reference[c] is not None:
            assert ours[c] == pytest.approx(reference[c], abs=1e-6), (c, ours, reference)


def test_hand_computed_values_that_separate_the_conventions():
    def ap(name, convention):
        return class_ap(*as_clbench(CASES[name]), SEEN, convention)

    # the difficult box does not swallow a detection it hardly overlaps (VOC, and coco101), a crowd box does
    assert ap("difficult_absorbs_nothing_by_iou", VOC07)[0] == pytest.approx(0.5)
    assert ap("difficult_absorbs_nothing_by_iou", COCO101_AP50)[0] == pytest.approx(0.5)
    assert ap("difficult_absorbs_nothing_by_iou", COCO_AP)[0] == pytest.approx(1.0)
    # IoU exactly 0.5: not a VOC hit (strict >), a COCO hit (>=)
    assert ap("iou_on_thresholds", VOC07)[0] == 0.0
    assert ap("iou_on_thresholds", COCO101_AP50)[0] == pytest.approx(1.0)
    # class 1: eight images, IoU exactly 0.55, 0.60, ..., 0.90 in descending score: at IoU
    # threshold t the hits are the detections with IoU >= t, all of them the lowest-ranked ones
    iou = [0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9]
    thresholds = np.linspace(0.5, 0.95, 10)
    recall_points = np.linspace(0, 1, 101)
    expected = []
    for t in thresholds:
        hits = np.array([v >= t - 1e-12 for v in iou])
        tp, fp = np.cumsum(hits), np.cumsum(~hits)
        rc, pr = tp / 8, tp / (tp + fp)
        pr = np.maximum.accumulate(pr[::-1])[::-1]
        expected.append(np.mean([pr[np.searchsorted(rc, r, side="left")] if r <= rc[-1] else 0 for r in recall_points]))
    assert ap("iou_on_thresholds", COCO_AP)[1] == pytest.approx(float(np.mean(expected)), abs=1e-12)
    # recall 3/10 with precision 1: points 0, 0.1, 0.2 only (0.3 is 0.30000000000000004)
    assert ap("recall_exactly_three_tenths", VOC07)[0] == pytest.approx(3 / 11)
    # the second detection's best box is already taken: VOC counts it false, COCO matches the free box
    assert ap("argmax_already_matched", VOC07)[0] == pytest.approx(6 / 11)  # recall 0.5 at precision 1
    assert ap("argmax_already_matched", COCO101_AP50)[0] == pytest.approx(1.0)
    # a class whose only box is difficult has no AP in every convention
    for convention in CONVENTIONS.values():
        assert ap("only_difficult_ground_truth", convention)[0] is None


def random_case(seed, images=60, classes=4, detections=30):
    """Integer pixel boxes (so the VOC "+1" and edge overlaps agree exactly), 10% difficult,
    detections jittered from ground truth or placed at random, scores on a coarse grid (ties)."""
    g = np.random.default_rng(seed)
    case = []
    for _ in range(images):
        k = int(g.integers(0, 6))
        xy, wh = g.integers(1, 300, (k, 2)), g.integers(1, 120, (k, 2))
        gts = [(int(g.integers(classes)), *map(int, xy[j]), *map(int, xy[j] + wh[j] - 1), int(g.random() < 0.1))
               for j in range(k)]
        dets = []
        for _ in range(int(g.integers(0, detections))):
            if gts and g.random() < 0.7:
                label, x0, y0, x1, y1, _ = gts[int(g.integers(len(gts)))]
                jitter = g.integers(-8, 9, 4)
                x0, y0 = x0 + jitter[0], y0 + jitter[1]
                box = (int(x0), int(y0), int(max(x1 + jitter[2], x0)), int(max(y1 + jitter[3], y0)))
                label = label if g.random() < 0.85 else int(g.integers(classes))
            else:
                x0, y0 = g.integers(1, 300, 2)
                w, h = g.integers(1, 120, 2)
                box, label = (int(x0), int(y0), int(x0 + w - 1), int(y0 + h - 1)), int(g.integers(classes))
            dets.append((label, float(g.integers(0, 20)) / 20, *box))
        case.append((gts, dets))
    return case


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_data_equals_the_references(seed):
    case = random_case(seed)
    seen = [0, 1, 2, 3]
    predictions, targets = as_clbench(case)
    voc, reference = class_ap(predictions, targets, seen, VOC07), voc07_reference_all(case, seen)
    for c in seen:
        assert voc[c] == pytest.approx(reference[c], abs=1e-12)
    for convention in (COCO_AP, COCO101_AP50):
        ours, ref = class_ap(predictions, targets, seen, convention), pycocotools_reference(predictions, targets, seen, convention)
        for c in seen:
            assert ours[c] == pytest.approx(ref[c], abs=1e-6), (convention.name, c)


def test_float_boxes_with_more_than_100_detections_per_image_equal_pycocotools():
    g = np.random.default_rng(5)
    predictions, targets = [], []
    for _ in range(20):
        k = int(g.integers(1, 8))
        xy, wh = g.uniform(0, 300, (k, 2)), g.uniform(2, 120, (k, 2))
        gt = np.concatenate([xy, xy + wh], 1)
        j = g.integers(0, k, 150)
        det = gt[j] + g.normal(0, 6, (150, 4))
        det[:, 2:] = np.maximum(det[:, 2:], det[:, :2] + 0.5)
        targets.append(make_target(gt, g.integers(0, 3, k), g.random(k) < 0.15))
        predictions.append({"boxes": torch.tensor(det, dtype=torch.float32), "labels": torch.tensor(g.integers(0, 3, 150)),
                            "scores": torch.tensor(g.random(150), dtype=torch.float32)})
    for convention in (COCO_AP, COCO101_AP50):
        ours = class_ap(predictions, targets, [0, 1, 2], convention)
        ref = pycocotools_reference(predictions, targets, [0, 1, 2], convention)
        assert max(abs(ours[c] - ref[c]) for c in (0, 1, 2)) < 1e-6


def test_the_pycocotools_fallback_gives_the_same_numbers(monkeypatch):
    predictions, targets = as_clbench(random_case(3))
    engine = class_ap(predictions, targets, [0, 1, 2, 3], COCO_AP)
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # import fails: pycocotools takes over
    from clbench.tasks.detection import coco_engine

    assert coco_engine().startswith("pycocotools")
    assert class_ap(predictions, targets, [0, 1, 2, 3], COCO_AP) == pytest.approx(engine, abs=1e-12)


# --------------------------------------------------------------------------- no AP is not 0
class _Fixed(torch.nn.Module):
    """A stand-in strategy: `detect` returns the same detections for every image."""

    def __init__(self, detections):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.detections = detections

    def detect(self, x, seen):
        return [self.detections for _ in range(len(x))]


def test_a_seen_class_without_test_boxes_is_none_with_a_note_and_the_means_skip_it():
    from clbench.datasets import DetectionDataset, make_loader
    from clbench.types import ExperienceInfo

    targets = [make_target([[0, 0, 10, 10]], [0]), make_target([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 1], [False, True])]
    data = DetectionDataset(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), targets)
    strategy = _Fixed({"boxes": torch.tensor([[0.0, 0, 10, 10]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([0])})
    info = ExperienceInfo(index=1, classes=(1, 2), seen_classes=(0, 1, 2), num_experiences=2, num_classes=3)
    row, detail = evaluate_detection(strategy, make_loader(data, 2, shuffle=False), info, [(0,), (1, 2)],
                                     COCO101_AP50, class_names=["a", "b", "c"])
    assert detail["ap_per_class"] == {"0": pytest.approx(1.0), "1": None, "2": None}
    assert detail["old"] == pytest.approx(1.0) and math.isnan(detail["new"]) and detail["all"] == pytest.approx(1.0)
    assert "1 (b), 2 (c)" in detail["notes"][0]
    assert row[0] == pytest.approx(1.0) and math.isnan(row[1])  # never 0.0 for "no AP"
    means = breakdown({0: 0.5, 1: None}, old=[0], new=[1])
    assert means["old"] == means["all"] == 0.5 and math.isnan(means["new"])
