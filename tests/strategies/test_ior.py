"""IOR: faithfulness checks on a tiny TinyGFL.

1 inversion touches only the image and lowers the old detector's loss; 2 sampled labels; 3 replay
pasting; 4 L_det; 5 L_feat and L_cls. Check 6 (no task-2 training image holds an old-class
object) is the absent filter's, asserted in tests/test_detection.py
(`absent_task_images`, protocol check 2); IOR never touches the scenario's data.
"""

import dataclasses
import math
import re

import pytest
import torch
from clbench.strategies.ior import (
    Config,
    ReplayDataset,
    augment_for_inversion,
    aspect_histogram,
    box_distillation,
    feature_distillation,
    inversion_loss,
    invert,
    logit_distillation,
    Paste,
    object_bank,
    overlap_ok,
    place,
    plan_replay,
    sample_aspect_ratio,
    sample_labels,
    total_variation_l1,
    signed_aspect_ratio,
    top_old_locations,
)

from clbench.datasets import (
    DetectionBatch,
    DetectionDataset,
    make_target,
)
from clbench.registry import STRATEGIES
from clbench.types import ExperienceInfo

SIZE = 64
EXP0 = ExperienceInfo(0, (0, 1), (0, 1), 2, 4)
EXP1 = ExperienceInfo(1, (2, 3), (0, 1, 2, 3), 2, 4)


def _painted(n: int, seed: int) -> DetectionDataset:
    """Class 0: wide red bars, class 1: tall blue bars, on grey noise."""
    g = torch.Generator().manual_seed(seed)
    images = (0.5 + 0.1 * torch.randn(n, 3, SIZE, SIZE, generator=g)).clamp(0, 1)
    targets = []
    for i in range(n):
        c = i % 2
        w, h = (24, 10) if c == 0 else (10, 22)
        x0, y0 = int(torch.randint(0, SIZE - w, (1,), generator=g)), int(torch.randint(0, SIZE - h, (1,), generator=g))
        images[i, :, y0:y0 + h, x0:x0 + w] = torch.tensor([0.9, 0.1, 0.1] if c == 0 else [0.1, 0.1, 0.9])[:, None, None]
        targets.append(make_target([[x0, y0, x0 + w, y0 + h]], [c]))
    return DetectionDataset(images, targets)


@pytest.fixture(scope="module")
def trained():
    """An IOR strategy after task 0 (a few steps on the bars, histograms stored) and at the start of task 1."""
    torch.manual_seed(0)
    strategy = STRATEGIES.get("ior")(None, 4, cfg=Config(flip=False), seed=0)
    data = _painted(8, seed=1)
    strategy.on_experience_start(EXP0)
    optimizer = torch.optim.AdamW(strategy.detector.parameters(), lr=3e-3)
    strategy.train()
    batch = DetectionBatch(torch.stack([data.image(i) for i in range(8)]), data.targets)
    for _ in range(8):
        loss = sum(strategy.step_losses(batch).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    strategy.on_experience_end(EXP0, data)
    strategy.on_experience_start(EXP1)
    return strategy


# --------------------------------------------------------------------------- check 1: inversion
def test_inversion_touches_only_the_image_and_lowers_the_old_loss(trained):
    old = trained.teacher["detector"]
    before = {k: v.clone() for k, v in old.state_dict().items()}
    cfg = dataclasses.replace(trained.cfg, inversion_steps=30)
    boxes = torch.tensor([[8.0, 16.0, 56.0, 36.0], [20.0, 8.0, 40.0, 54.0]])
    labels = torch.tensor([0, 1])
    torch.manual_seed(3)
    start = torch.randn(2, 3, SIZE, SIZE).clamp(0, 1)
    images = invert(old, boxes, labels, cfg, start=start)
    after = old.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "parameters or BN running stats changed"
    assert not old.training and not any(p.requires_grad for p in old.parameters())
    assert not torch.equal(images, start)

    def detection_loss(x):  # the old detector's GFL loss for the sampled labels, no augmentation
        with torch.no_grad():
            return inversion_loss(old, x, boxes, labels, cfg)["main"].item()

    targets = [make_target(b[None], l[None]) for b, l in zip(boxes, labels)]
    assert old.loss(old(start, normalized=True), targets).num_positives > 0

    assert detection_loss(images) < detection_loss(start)
    with pytest.raises(RuntimeError, match="eval mode"):
        invert(trained.detector, boxes, labels, cfg)


# --------------------------------------------------------------------------- check 2: labels
def test_sampled_labels_follow_the_class_histograms(trained):
    cfg = trained.cfg
    assert trained.aspect_counts[:2].sum(1).gt(0).all(), "task-0 classes have histograms"
    assert trained.aspect_counts[2:].sum() == 0, "future classes have none yet"
    torch.manual_seed(4)
    many = dataclasses.replace(cfg, images_per_class=25)
    boxes, labels = sample_labels(trained.aspect_edges, trained.aspect_counts, [0, 1], many)
    assert labels.tolist() == [0] * 25 + [1] * 25  # one box per canvas, old classes only
    s = cfg.canvas_size
    assert (boxes >= -1e-4).all() and (boxes <= s + 1e-4).all()
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    long_side, short_side = torch.maximum(w, h), torch.minimum(w, h)
    low, high = cfg.box_side  # the paper's [0.6 S, 0.8 S] at paper scale
    assert ((long_side >= low * s - 1e-4) & (long_side <= high * s + 1e-4)).all()
    r = signed_aspect_ratio(boxes)
    assert torch.allclose(short_side, long_side / r.abs(), atol=1e-4) and (r.abs() >= 1 - 1e-6).all()
    for c in (0, 1):
        edges, counts = trained.aspect_edges[c], trained.aspect_counts[c]
        for value in r[labels == c]:
            in_bin = (edges[:-1] - 1e-4 <= value) & (value <= edges[1:] + 1e-4) & (counts > 0)
            assert in_bin.any(), f"ratio {value} of class {c} is outside its histogram's bins"
    # the bars: class 0 wide (r = 2.4), class 1 tall (r = -2.2)
    assert (r[labels == 0] > 0).all() and (r[labels == 1] < 0).all()


def test_a_class_without_training_boxes_is_a_usage_error_naming_it(trained):
    # a task whose split holds no box of one of its classes: a one-line error (exit 2), not a traceback
    from clbench.errors import UsageError
    with pytest.raises(UsageError, match=r"IOR: class 2 had no training box"):
        sample_labels(trained.aspect_edges, trained.aspect_counts, [0, 2], trained.cfg)


def test_histogram_folds_bins_no_ratio_can_fall_in():
    boxes = torch.tensor([[0, 0, 21, 20], [0, 0, 20, 21], [0, 0, 22, 20], [0, 0, 20, 22], [0, 0, 20, 20]] * 4, dtype=torch.float)
    edges, counts = aspect_histogram(boxes, 50, (0.05, 0.95))
    centres = (edges[:-1] + edges[1:]) / 2
    assert counts.sum() == 20
    assert counts[(centres >= -1) & (centres < 1)].sum() == 0


# --------------------------------------------------------------------------- check 3: replay
def _intersection(a, b):
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(w, 0) * max(h, 0)


def test_replay_pastes_old_objects_by_the_overlap_rule():
    torch.manual_seed(5)
    g = torch.Generator().manual_seed(6)
    images = torch.rand(12, 3, SIZE, SIZE, generator=g)
    targets = [make_target([[4 + i, 30, 24 + i, 50]], [2 + i % 2]) for i in range(11)]
    targets.append(make_target([[2, 2, 62, 62]], [3]))  # a box over 0.75 W x 0.75 H: no paste
    base = DetectionDataset(images, targets)
    bank = [(torch.rand(3, 14 + k, 18, generator=g), k % 2) for k in range(5)]
    cfg = Config(max_pastes=4)
    replay = ReplayDataset(base, bank, cfg)
    assert sum(len(p) for p in replay.pastes) > 10 and replay.pastes[-1] == []
    for i in range(len(base)):
        n = len(targets[i]["labels"])
        t = replay.targets[i]
        assert torch.equal(t["boxes"][:n], targets[i]["boxes"]) and torch.equal(t["labels"][:n], targets[i]["labels"])
        assert set(t["labels"][n:].tolist()) <= {0, 1}  # every pasted box is an old class
        boxes = t["boxes"].tolist()
        for k in range(n, len(boxes)):
            p = boxes[k]
            area_p = (p[2] - p[0]) * (p[3] - p[1])
            for g_box in boxes[:k]:  # every box present before it
                inter = _intersection(g_box, p)
                assert inter / ((g_box[2] - g_box[0]) * (g_box[3] - g_box[1])) <= 0.3 + 1e-6
                assert inter / area_p <= 0.1 + 1e-6
        # pixels: lambda * image + (1 - lambda) * crop where one paste covers them, untouched elsewhere
        img, lam = replay.image(i), replay.lambdas[i]
        cover = torch.zeros(SIZE, SIZE, dtype=torch.long)
        for p in replay.pastes[i]:
            cover[p.box[1]:p.box[3], p.box[0]:p.box[2]] += 1
        assert torch.equal(img[:, cover == 0], images[i][:, cover == 0])
        for p in replay.pastes[i]:
            x0, y0, x1, y1 = p.box
            crop = bank[p.crop][0][:, p.offset[1]:p.offset[1] + y1 - y0, p.offset[0]:p.offset[0] + x1 - x0]
            only = cover[y0:y1, x0:x1] == 1
            expected = lam * images[i][:, y0:y1, x0:x1] + (1 - lam) * crop
            assert torch.allclose(img[:, y0:y1, x0:x1][:, only], expected[:, only], atol=1e-6)


def test_object_bank_rescales_each_image_and_crops_its_box(trained):
    detector = trained.detector
    images = torch.stack([torch.linspace(-3, 5, SIZE * SIZE * 3).view(3, SIZE, SIZE), torch.randn(3, SIZE, SIZE)])
    bank = object_bank(images, torch.tensor([[0.0, 0.0, SIZE, SIZE], [10.2, 5.5, 30.0, 40.1]]), torch.tensor([1, 0]), detector)
    assert bank[0][0].min() == 0 and bank[0][0].max() == 1 and bank[0][1] == 1
    assert bank[1][0].shape == (3, 36, 20) and bank[1][1] == 0
    assert torch.equal((bank[1][0] * 255).round(), bank[1][0] * 255)  # 8-bit export
    # pixel space, not normalised space: an image that is a rescaled pixel image comes back as it was
    pixels = torch.rand(1, 3, SIZE, SIZE)
    pixels = (pixels - pixels.min()) / (pixels.max() - pixels.min())
    again = object_bank(detector.normalize(pixels), torch.tensor([[0.0, 0.0, SIZE, SIZE]]), torch.tensor([0]), detector)
    assert torch.allclose(again[0][0], pixels[0], atol=0.5 / 255 + 1e-6)


# --------------------------------------------------------------------------- check 4: L_det
def _captured_logits(strategy):
    store = []

    def keep(module, inputs, output):
        output.retain_grad()
        store.append(output)

    return store, strategy.detector.cls_conv.register_forward_hook(keep)


def test_detection_loss_is_new_channels_against_new_gt_only(trained):
    x = torch.rand(2, 3, SIZE, SIZE)
    new_gt = [make_target([[8, 8, 30, 28]], [2]), make_target([[30, 34, 56, 60]], [3])]
    pasted = [make_target([[8, 8, 30, 28], [36, 4, 60, 26]], [2, 0]), make_target([[30, 34, 56, 60], [4, 4, 24, 24]], [3, 1])]
    store, handle = _captured_logits(trained)
    try:
        with_old = trained.step_losses(DetectionBatch(x, pasted))
        sum(with_old[k] for k in ("qfl", "giou", "dfl")).backward()
        without_old = trained.step_losses(DetectionBatch(x, new_gt))
    finally:
        handle.remove()
    for level_logits in store[: len(store) // 2]:
        assert torch.all(level_logits.grad[:, :2] == 0), "L_det reached an old-class channel"
    assert any(level_logits.grad[:, 2:].abs().sum() > 0 for level_logits in store[: len(store) // 2])
    for k in ("qfl", "giou", "dfl"):
        assert torch.equal(with_old[k], without_old[k]), k
    trained.detector.zero_grad()


def test_logit_distillation_in_the_step_reaches_old_class_channels_only(trained):
    x = torch.rand(2, 3, SIZE, SIZE)
    pasted = [make_target([[8, 8, 30, 28], [36, 4, 60, 26]], [2, 0]), make_target([[30, 34, 56, 60], [4, 4, 24, 24]], [3, 1])]
    store, handle = _captured_logits(trained)
    try:
        terms = trained.step_losses(DetectionBatch(x, pasted))
        assert terms["cls_kd"].item() > 0
        terms["cls_kd"].backward()
    finally:
        handle.remove()
    for level_logits in store:
        assert torch.all(level_logits.grad[:, 2:] == 0), "L_cls reached a new-class channel"
    assert any(level_logits.grad[:, :2].abs().sum() > 0 for level_logits in store)
    trained.detector.zero_grad()


def test_adaptive_weight_is_zero_without_new_positives(trained):
    x = torch.rand(2, 3, SIZE, SIZE)
    only_old = [make_target([[8, 8, 30, 28]], [0]), make_target([[4, 4, 24, 24]], [1])]
    terms = trained.step_losses(DetectionBatch(x, only_old))
    assert trained.last_adaptive_weight == 0.0
    assert all(terms[k].item() == 0.0 for k in ("feat_kd", "cls_kd", "box_kd"))
    terms = trained.step_losses(DetectionBatch(x, [make_target([[8, 8, 30, 28], [36, 4, 60, 26]], [2, 0])] * 2))
    assert trained.last_adaptive_weight > 0 and terms["feat_kd"].item() > 0


# --------------------------------------------------------------------------- check 5: L_feat, L_cls
def test_feature_distillation_is_local_to_the_pasted_boxes():
    torch.manual_seed(7)
    new = [torch.randn(2, 8, 8, 8), torch.randn(2, 8, 4, 4), torch.randn(2, 8, 2, 2)]
    old = [torch.randn_like(f) for f in new]
    strides = [8, 16, 32]
    boxes = [torch.tensor([[8.0, 8.0, 24.0, 20.0]]), torch.zeros(0, 4)]
    assert feature_distillation(new, old, [torch.zeros(0, 4)] * 2, strides).item() == 0.0
    value = feature_distillation(new, old, boxes, strides)
    # sampling points lie in cells 0.5..2.5 (x) and 0.5..2 (y) of level 0: bilinear reads cells 0-3 / 0-2
    far = [f.clone() for f in new]
    far[0][0, :, :, 5:] += 10.0
    far[0][0, :, 4:, :] += 10.0
    far[0][1] += 10.0  # the other image has no pasted box
    far[1] += 10.0  # a small box is routed to the finest level only
    assert torch.allclose(feature_distillation(far, old, boxes, strides), value)
    near = [f.clone() for f in new]
    near[0][0, :, 2, 2] += 10.0
    assert not torch.allclose(feature_distillation(near, old, boxes, strides), value)
    diff = torch.linalg.vector_norm(
        __import__("torchvision").ops.roi_align(new[0], [boxes[0]], 3, 1 / 8, 0, True)
        - __import__("torchvision").ops.roi_align(old[0], [boxes[0]], 3, 1 / 8, 0, True))
    assert value.item() == pytest.approx(diff.item(), rel=1e-6)  # Frobenius norm, not squared, not averaged


def test_logit_distillation_uses_exactly_the_old_top_k_on_old_channels():
    torch.manual_seed(8)
    old_logits = torch.randn(2, 84, 2)
    new_logits = torch.randn(2, 84, 4, requires_grad=True)
    k = 5
    loss = logit_distillation(new_logits[..., :2], old_logits, k)
    loss.backward()
    assert torch.all(new_logits.grad[..., 2:] == 0)
    for b in range(2):
        expected = set(old_logits[b].sigmoid().max(-1).values.topk(k).indices.tolist())
        got = set(torch.nonzero(new_logits.grad[b, :, :2].abs().sum(-1)).squeeze(1).tolist())
        assert got == expected == set(top_old_locations(old_logits, k)[b].tolist())
    idx = top_old_locations(old_logits, k)
    by_hand = torch.stack([(new_logits[b, idx[b], :2] - old_logits[b, idx[b]]).pow(2) for b in range(2)]).mean()
    assert loss.item() == pytest.approx(by_hand.item())


def test_box_distillation_vanishes_when_distributions_agree(trained):
    x = torch.rand(2, 3, SIZE, SIZE)
    old_classes = torch.tensor([0, 1])
    with torch.no_grad():
        out = trained.teacher["detector"](x)
    assert box_distillation(out, out, old_classes, 1000, 10.0, 0.005).item() == pytest.approx(0.0, abs=1e-7)
    student = trained.detector(x)
    assert box_distillation(student, out, old_classes, 1000, 10.0, 0.005).item() > 0


# --------------------------------------------------------------------------- end to end per task
def test_task_data_gets_replayed_old_objects(trained):
    cfg = dataclasses.replace(trained.cfg, inversion_steps=2)
    strategy, saved = trained, trained.cfg
    object.__setattr__(strategy, "cfg", cfg)
    try:
        task = _painted(6, seed=2)
        task = DetectionDataset(task.images, [make_target(t["boxes"], t["labels"] + 2) for t in task.targets])
        data = strategy.training_data(EXP1, task)
    finally:
        object.__setattr__(strategy, "cfg", saved)
    assert len(data) == len(task) and len(data.bank) == 2 * cfg.images_per_class
    assert {label for _, label in data.bank} == {0, 1}
    for t, r in zip(task.targets, data.targets):
        assert set(r["labels"][len(t["labels"]):].tolist()) <= {0, 1}


def test_paper_settings_cover_the_absent_setting_with_the_same_recipe():
    settings = STRATEGIES.get("ior").PAPER_SETTINGS
    for split in ("coco-40+40", "coco-50+30", "coco-60+20", "coco-70+10"):
        assert settings[f"{split}-absent"] == settings[split]
        # the published 1x schedule: x0.1 at epochs 8 and 11 of 12, a Config that accepts it
        assert (settings[split]["lr_schedule"], settings[split]["lr_milestones"], settings[split]["epochs"]) == ("multistep", (8, 11), 12)
        STRATEGIES.get("ior").Config(**{k: v for k, v in settings[split].items() if k not in ("epochs", "batch_size")})


# --------------------------------------------------------------------------- options and per-task hooks
@pytest.mark.parametrize("bad", [{"images_per_class": 0}, {"canvas_size": 0}, {"inversion_batch": 0},
                                 {"inversion_steps": -1}, {"max_pastes": -1}, {"placement_tries": -1}, {"jitter": -1},
                                 {"box_side": (0.0, 0.5)}, {"box_side": (0.5, 0.4)}, {"box_side": (0.5, 1.5)},
                                 {"detector": "bogus"}])
def test_invalid_options_are_usage_errors_naming_the_option(bad):
    from clbench.errors import UsageError

    name, value = next(iter(bad.items()))
    shown = repr(value) if isinstance(value, str) else str(value)
    with pytest.raises(UsageError, match="^" + re.escape(f"{name}={shown} is invalid")):
        Config(**bad)


def test_option_edges_are_accepted():
    # no step, paste, retry or jitter at all is a valid (if useless) setting; a box may fill the canvas
    Config(inversion_steps=0, max_pastes=0, placement_tries=0, jitter=0)
    for side in ((0.5, 0.5), (0.6, 1.0), (1.0, 1.0)):
        assert Config(box_side=side).box_side == side


def test_a_new_strategy_has_no_teacher_and_empty_histograms_for_every_class():
    strategy = STRATEGIES.get("ior")(None, 5, cfg=Config(histogram_bins=7), seed=3)
    assert strategy.teacher is None and strategy.seed == 3 and strategy.cfg.histogram_bins == 7
    assert strategy.last_adaptive_weight == 0.0 and isinstance(strategy.last_adaptive_weight, float)
    state = strategy.state_dict()  # buffers: saved with the detector and loaded back on resume
    assert torch.equal(state["aspect_edges"], torch.zeros(5, 8))
    assert torch.equal(state["aspect_counts"], torch.zeros(5, 7))


def test_the_teacher_is_a_frozen_snapshot_taken_before_the_classifier_grows():
    strategy = STRATEGIES.get("ior")(None, 4, cfg=Config(flip=False), seed=0)
    strategy.on_experience_start(EXP0)
    assert strategy.teacher is None and strategy.experience == EXP0 and strategy.detector.num_classes == 2
    strategy.on_experience_start(EXP1)
    teacher = strategy.teacher["detector"]
    assert strategy.experience == EXP1 and strategy.detector.num_classes == 4 and teacher.num_classes == 2
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert teacher is not strategy.detector


def test_each_class_stores_the_histogram_of_its_own_non_ignored_boxes_at_its_task_end(task_end_recorder):
    strategy = STRATEGIES.get("ior")(None, 4, cfg=Config(histogram_bins=4, histogram_trim=(0.0, 1.0)),
                                     aux=[task_end_recorder], seed=0)
    strategy.on_experience_start(EXP0)
    targets = [make_target([[0, 0, 20, 10], [5, 5, 15, 55]], [0, 0], ignore=[False, True]),  # 2 (-5 ignored)
               make_target([[10, 20, 40, 30], [0, 0, 10, 20]], [0, 1]),  # 3 for class 0, -2 for class 1
               make_target(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))]
    strategy.on_experience_end(EXP0, DetectionDataset(torch.zeros(3, 3, SIZE, SIZE), targets))
    assert task_end_recorder.ended == [EXP0]
    # class 0: ratios 2 and 3 over 4 bins of [2, 3]
    assert torch.allclose(strategy.aspect_edges[0], torch.tensor([2.0, 2.25, 2.5, 2.75, 3.0]))
    assert strategy.aspect_counts[0].tolist() == [1, 0, 0, 1]
    # class 1: one ratio, -2: a range of +-0.001 around it
    assert torch.allclose(strategy.aspect_edges[1], torch.linspace(-2.001, -1.999, 5), atol=1e-6)
    assert strategy.aspect_counts[1].sum() == 1
    # classes of later tasks keep empty histograms
    assert strategy.aspect_counts[2:].sum() == 0 and strategy.aspect_edges[2:].abs().sum() == 0


# --------------------------------------------------------------------------- histograms by hand
def test_signed_aspect_ratio_is_w_over_h_for_wide_and_square_boxes_and_minus_h_over_w_for_tall_ones():
    boxes = torch.tensor([[10.0, 20.0, 50.0, 40.0], [5.0, 7.0, 15.0, 47.0], [3.0, 4.0, 9.0, 10.0], [1.0, 2.0, 7.0, 5.0]])
    assert signed_aspect_ratio(boxes).tolist() == [2.0, -4.0, 1.0, 2.0]


def _wide(r):
    return [0.0, 0.0, 10.0 * r, 10.0]


def _tall(r):
    return [0.0, 0.0, 10.0, 10.0 * r]


def test_histogram_keeps_the_ratios_between_the_trim_quantiles_boundaries_included():
    boxes = torch.tensor([_wide(r) for r in (1.0, 2.0, 3.0, 4.0, 5.0)])
    edges, counts = aspect_histogram(boxes, 2, (0.25, 0.75))  # quantiles 2 and 4
    assert torch.allclose(edges, torch.tensor([2.0, 3.0, 4.0]))
    assert counts.tolist() == [1, 2]


def test_histogram_of_one_ratio_spans_a_thousandth_either_side():
    edges, counts = aspect_histogram(torch.tensor([_wide(2.0)] * 3), 2, (0.05, 0.95))
    assert torch.allclose(edges, torch.tensor([1.999, 2.0, 2.001]), atol=1e-6)
    assert counts.sum() == 3
    # a spread of a few hundredths is not widened
    edges, _ = aspect_histogram(torch.tensor([_wide(2.0), _wide(2.05)]), 2, (0.0, 1.0))
    assert torch.allclose(edges, torch.tensor([2.0, 2.025, 2.05]), atol=1e-6)


def test_histogram_widened_around_one_ratio_still_counts_only_the_ratios_inside_the_trim():
    # 18 ratios of 2 between 1.9995 and 2.0005: the 5% / 95% quantiles keep only the 18, the +-0.001
    # widening would reach the two outer ones
    boxes = torch.tensor([[0.0, 0.0, 19.995, 10.0]] + [_wide(2.0)] * 18 + [[0.0, 0.0, 20.005, 10.0]])
    edges, counts = aspect_histogram(boxes, 4, (0.05, 0.95))
    assert edges[0] < 1.9995 and edges[-1] > 2.0005
    assert counts.sum() == 18


def test_histogram_keeps_a_bin_centred_at_minus_two():
    # edges -2.5, -1.5, -0.5, 0.5, 1.5, 2.5: centres -2, -1, 0, 1, 2; only the bin at -1 is folded
    boxes = torch.tensor([_tall(2.5), _tall(1.6), _tall(1.2), _wide(1.2), _wide(2.5)])
    edges, counts = aspect_histogram(boxes, 5, (0.0, 1.0))
    assert edges.tolist() == [-2.5, -1.5, -0.5, 0.5, 1.5, 2.5]
    assert counts.tolist() == [3, 0, 0, 1, 1]


def test_histogram_folds_a_bin_centred_at_minus_one_left_and_keeps_a_bin_centred_at_one():
    # edges -4, -2, 0, 2, 4: centres -3, -1, 1, 3; the bin centred at -1 lies in [-1, 1), the one at 1 does not
    boxes = torch.tensor([_tall(4.0), _tall(1.5), _wide(1.5), _wide(4.0)])
    edges, counts = aspect_histogram(boxes, 4, (0.0, 1.0))
    assert edges.tolist() == [-4.0, -2.0, 0.0, 2.0, 4.0]
    assert counts.tolist() == [2, 0, 1, 1]


def test_histogram_folds_a_bin_centred_at_zero_to_the_right():
    # edges -6, -2, 2, 6: the middle bin (centre 0) holds -1.5 and 1.5 and gives both to its right
    boxes = torch.tensor([_tall(6.0), _tall(1.5), _wide(1.5), _wide(6.0)])
    edges, counts = aspect_histogram(boxes, 3, (0.0, 1.0))
    assert edges.tolist() == [-6.0, -2.0, 2.0, 6.0]
    assert counts.tolist() == [1, 0, 3]


def test_histogram_folds_a_bin_centred_in_minus_one_to_zero_left_and_not_past_the_first_bin():
    # edges -3, -1.4, 0.2, 1.8, 3.4, 5: centres -2.2, -0.6, 1.0, 2.6, 4.2; only the bin at -0.6 is folded
    boxes = torch.tensor([_tall(3.0), _tall(2.0), _tall(1.2), _wide(1.5), _wide(2.0), _wide(5.0)])
    edges, counts = aspect_histogram(boxes, 5, (0.0, 1.0))
    assert torch.allclose(edges, torch.tensor([-3.0, -1.4, 0.2, 1.8, 3.4, 5.0]))
    assert counts.tolist() == [3, 0, 1, 1, 1]
    # edges -1.5, 0.5, 2.5: the first bin (centre -0.5) has no bin on its left and keeps its count
    edges, counts = aspect_histogram(torch.tensor([_tall(1.5), _wide(2.5)]), 2, (0.0, 1.0))
    assert edges.tolist() == [-1.5, 0.5, 2.5] and counts.tolist() == [1, 1]



def _ratios(edges, counts, n=200):
    return torch.tensor([sample_aspect_ratio(torch.tensor(edges), torch.tensor(counts)) for _ in range(n)])


def _spread_over(values, lo, hi):
    """All inside [lo, hi] and reaching into both its lower and its upper quarter."""
    quarter = (hi - lo) / 4
    return bool((values >= lo - 1e-6).all() and (values <= hi + 1e-6).all()
                and values.min() < lo + quarter and values.max() > hi - quarter)


def test_sampled_ratios_are_uniform_inside_the_drawn_bin_cut_to_at_least_one_in_magnitude():
    torch.manual_seed(12)
    # only the middle bin [1.5, 3.5] can be drawn
    assert _spread_over(_ratios([-0.5, 1.5, 3.5, 5.5], [0.0, 2.0, 0.0]), 1.5, 3.5)
    # centre 0.5: the part >= 1 of [-0.5, 1.5]; centre 0 (counted as positive): [1, 2] of [-2, 2]
    assert _spread_over(_ratios([-0.5, 1.5], [1.0]), 1.0, 1.5)
    assert _spread_over(_ratios([-2.0, 2.0], [1.0]), 1.0, 2.0)
    # centre -0.5: the part <= -1 of [-1.5, 0.5]
    assert _spread_over(_ratios([-1.5, 0.5], [1.0]), -1.5, -1.0)
    assert _spread_over(_ratios([-4.0, -2.0], [1.0]), -4.0, -2.0)
    # a bin entirely inside (-1, 1) gives +-1
    assert set(_ratios([0.5, 0.8], [1.0], 20).tolist()) == {1.0}
    assert set(_ratios([-0.8, -0.5], [1.0], 20).tolist()) == {-1.0}


def test_sampled_ratio_bins_are_drawn_by_count():
    torch.manual_seed(13)
    r = _ratios([1.0, 2.0, 3.0, 4.0], [1.0, 0.0, 3.0], 400)
    assert not ((r > 2.0) & (r < 3.0)).any()
    assert 0.68 < (r >= 3.0).float().mean() < 0.82


def test_sampled_boxes_spread_over_the_long_side_range_and_the_canvas():
    """Class 0's only bin lies in [0.5, 0.8] (ratio 1: squares) and holds a single box; class 1's two are in [-2.5, -2] (ratios 2 to 2.5, tall)."""
    cfg = Config(images_per_class=40, canvas_size=64, box_side=(0.3, 0.4))
    edges = torch.tensor([[0.5, 0.65, 0.8], [-3.0, -2.5, -2.0]])
    counts = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    torch.manual_seed(14)
    boxes, labels = sample_labels(edges, counts, [0, 1], cfg)
    assert labels.dtype == torch.long and labels.tolist() == [0] * 40 + [1] * 40
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert torch.allclose(w[:40], h[:40]) and (w > 0).all() and (h > 0).all()
    assert (h[40:] > w[40:]).all() and _spread_over(h[40:] / w[40:], 2.0, 2.5)
    long_side = torch.maximum(w, h)
    assert _spread_over(long_side, 0.3 * 64, 0.4 * 64)
    # the top-left corner is uniform over the positions that keep the box inside the canvas
    assert _spread_over(boxes[:, 0] / (64 - w), 0.0, 1.0) and _spread_over(boxes[:, 1] / (64 - h), 0.0, 1.0)



def test_the_first_task_trains_on_its_own_data_and_later_inversions_go_through_work_steps(trained, monkeypatch):
    first = STRATEGIES.get("ior")(None, 4, cfg=Config(flip=False), seed=0)
    first.on_experience_start(EXP0)
    task = _painted(2, seed=2)
    assert first.training_data(EXP0, task) is task

    class Meter:  # the runner's profiler: it meters the loop it hands out
        def __init__(self):
            self.loops = []

        def work_steps(self, label, n):
            self.loops.append((label, n))
            return iter(range(n))

    meter = Meter()
    monkeypatch.setattr(trained, "cost_meter", meter, raising=False)
    saved = trained.cfg
    object.__setattr__(trained, "cfg", dataclasses.replace(saved, inversion_steps=2, inversion_batch=3))
    try:
        trained.training_data(EXP1, task)
    finally:
        object.__setattr__(trained, "cfg", saved)
    assert meter.loops == [("inversion (batch 3)", 2), ("inversion (batch 1)", 2)]  # 2 old classes x 2 canvases


# --------------------------------------------------------------------------- bank and replay by hand
def test_object_bank_stretches_a_narrow_pixel_range_to_the_full_8_bits(trained):
    detector = trained.detector
    g = torch.Generator().manual_seed(15)
    pixels = 0.2 + 0.4 * torch.rand(2, 3, 8, 10, generator=g)  # a range below 1
    pixels[1] = 0.3  # a constant image has no range: all 0
    bank = object_bank(detector.normalize(pixels), torch.tensor([[1.5, 2.0, 6.2, 7.0], [0.0, 0.0, 10.0, 8.0]]),
                       torch.tensor([1, 0]), detector)
    lo, hi = pixels[0].min(), pixels[0].max()
    expected = torch.round((pixels[0] - lo) / (hi - lo) * 255) / 255
    assert bank[0][0].shape == (3, 5, 6) and torch.allclose(bank[0][0], expected[:, 2:7, 1:7], atol=1.01 / 255)
    assert bank[0][1] == 1 and bank[1][1] == 0
    assert torch.equal(bank[1][0], torch.zeros(3, 8, 10))


def test_the_overlap_rule_holds_both_ratios_at_their_bounds():
    # g: 8 x 10 at (10, 20), p: 10 x 10 at (16, 20); they share 2 x 10: 0.25 of g, 0.2 of p (exact in floats)
    g = torch.tensor([[10.0, 20.0, 18.0, 30.0]])
    p = torch.tensor([16.0, 20.0, 26.0, 30.0])
    assert overlap_ok(g, p, 0.25, 0.2)
    assert not overlap_ok(g, p, 0.24, 0.2) and not overlap_ok(g, p, 0.25, 0.19)
    assert overlap_ok(torch.zeros(0, 4), p, 0.0, 0.0)  # nothing there yet
    # every present box counts: one far away and one too close is too close
    assert not overlap_ok(torch.tensor([[40.0, 40.0, 50.0, 50.0], [10.0, 20.0, 18.0, 30.0]]), p, 0.24, 0.2)
    assert overlap_ok(torch.tensor([[40.0, 40.0, 50.0, 50.0], [10.0, 20.0, 18.0, 30.0]]), p, 0.25, 0.2)
    # boxes under one pixel: ratios of their true areas (a quarter pixel inside is all of it)
    assert not overlap_ok(torch.tensor([[20.0, 24.0, 20.5, 24.5]]), p, 0.3, 0.1)
    assert not overlap_ok(g, torch.tensor([12.0, 24.0, 12.5, 24.5]), 0.3, 0.5)


def _replay_of_one_image(cfg=None):
    g = torch.Generator().manual_seed(16)
    base = DetectionDataset(torch.rand(1, 3, 20, 30, generator=g), [make_target([[2, 2, 6, 6]], [3])])
    bank = [(torch.rand(3, 10, 12, generator=g), 1), (torch.rand(3, 4, 4, generator=g), 0)]
    return ReplayDataset(base, bank, cfg or Config(max_pastes=0)), base, bank


def test_replayed_pixels_take_each_crop_pixel_at_its_offset_even_where_the_box_is_clipped():
    replay, base, bank = _replay_of_one_image()
    assert replay.pastes == [[]] and replay.targets[0] is base.targets[0]
    # clipped at the right and bottom (the crop's top-left 8 x 5), then at the left and top (its part from (7, 6))
    replay.pastes[0] = [Paste(0, (22, 15, 30, 20), (0, 0)), Paste(0, (0, 0, 5, 4), (7, 6))]
    replay.lambdas[0] = 0.25
    img, target = replay[0]
    crop, original = bank[0][0], base.image(0)
    expected = original.clone()
    for (x0, y0, x1, y1), (ox, oy) in (((22, 15, 30, 20), (0, 0)), ((0, 0, 5, 4), (7, 6))):
        for y in range(y0, y1):
            for x in range(x0, x1):
                expected[:, y, x] = 0.25 * original[:, y, x] + 0.75 * crop[:, y - y0 + oy, x - x0 + ox]
    assert torch.allclose(img, expected, atol=1e-6) and torch.allclose(replay.image(0), expected, atol=1e-6)
    assert target is replay.targets[0]


def test_replay_targets_append_the_pasted_boxes_as_old_class_annotations_never_ignored():
    replay, base, bank = _replay_of_one_image(Config(max_pastes=3))
    pastes = replay.pastes[0]
    assert len(pastes) >= 2
    t = replay.targets[0]
    assert t["boxes"].dtype == torch.float32 and t["labels"].dtype == torch.long and t["ignore"].dtype == torch.bool
    assert t["boxes"].tolist() == [[2.0, 2.0, 6.0, 6.0]] + [list(map(float, p.box)) for p in pastes]
    assert t["labels"].tolist() == [3] + [bank[p.crop][1] for p in pastes]
    assert t["ignore"].tolist() == [False] * (1 + len(pastes))


# --------------------------------------------------------------------------- distillation by hand
def _level_by_hand(box, finest_scale, levels):
    area = (box[2] - box[0]) * (box[3] - box[1])
    return min(max(math.floor(math.log2(math.sqrt(area) / finest_scale + 1e-6)), 0), levels - 1)


def _feature_distillation_by_hand(new, old, boxes, strides, roi_size, finest_scale):
    from torchvision.ops import roi_align

    gaps = {}
    for image, image_boxes in enumerate(boxes):
        for box in image_boxes.tolist():
            lv = _level_by_hand(box, finest_scale, len(new))
            roi = torch.tensor([[float(image), *box]])
            a = roi_align(new[lv], roi, roi_size, spatial_scale=1.0 / strides[lv], sampling_ratio=0, aligned=True)
            b = roi_align(old[lv], roi, roi_size, spatial_scale=1.0 / strides[lv], sampling_ratio=0, aligned=True)
            gaps.setdefault(lv, []).append((a - b).flatten())
    # the Frobenius norm over each level's boxes together, summed over the levels
    return sum(torch.cat(g).pow(2).sum().sqrt() for g in gaps.values())


def test_feature_distillation_routes_each_box_to_its_level_by_area():
    torch.manual_seed(17)
    new = [torch.randn(2, 4, 8, 8), torch.randn(2, 4, 4, 4), torch.randn(2, 4, 2, 2)]
    old = [torch.randn_like(f) for f in new]
    strides = [8, 16, 32]
    # at finest scale 8: 16 x 16 -> level 1 (exactly), 15 x 16 -> 0, 32 x 32 -> 2, 64 x 64 -> 3, kept at 2, 10 x 37 -> 1
    boxes = [torch.tensor([[0.0, 8.0, 16.0, 24.0], [4.0, 4.0, 19.0, 20.0]]),
             torch.tensor([[0.0, 0.0, 32.0, 32.0], [0.0, 0.0, 64.0, 64.0], [2.0, 3.0, 12.0, 40.0]])]
    assert [_level_by_hand(b, 8.0, 3) for b in boxes[0].tolist() + boxes[1].tolist()] == [1, 0, 2, 2, 1]
    value = feature_distillation(new, old, boxes, strides, roi_size=2, finest_scale=8.0)
    assert value.item() == pytest.approx(_feature_distillation_by_hand(new, old, boxes, strides, 2, 8.0).item(), rel=1e-5)
    # the default finest scale is 56: a 112 x 112 box is the first one on level 1
    big = [torch.tensor([[0.0, 0.0, 112.0, 112.0]]), torch.zeros(0, 4)]
    assert feature_distillation(new, old, big, strides).item() == pytest.approx(
        _feature_distillation_by_hand(new, old, big, strides, 3, 56.0).item(), rel=1e-5)
    assert _level_by_hand([0.0, 0.0, 112.0, 112.0], 56.0, 3) == 1
    # areas under one pixel keep their own size: at finest scale 0.5 a half-pixel square is on level 0
    tiny = [torch.tensor([[20.0, 20.0, 20.5, 20.5]]), torch.zeros(0, 4)]
    assert _level_by_hand([20.0, 20.0, 20.5, 20.5], 0.5, 3) == 0
    assert feature_distillation(new, old, tiny, strides, 3, 0.5).item() == pytest.approx(
        _feature_distillation_by_hand(new, old, tiny, strides, 3, 0.5).item(), rel=1e-5)


def test_feature_distillation_without_images_or_with_one_level():
    torch.manual_seed(18)
    new, old = [torch.randn(1, 4, 8, 8, requires_grad=True)], [torch.randn(1, 4, 8, 8)]
    assert feature_distillation(new, old, [], [8]).item() == 0.0
    box = [torch.tensor([[8.0, 8.0, 40.0, 40.0]])]
    value = feature_distillation(new, old, box, [8])
    assert value.item() == pytest.approx(_feature_distillation_by_hand(new, old, box, [8], 3, 56.0).item(), rel=1e-5)


def test_logit_distillation_without_old_classes_is_zero_and_with_one_is_its_squared_gap():
    torch.manual_seed(19)
    new_logits = torch.randn(2, 10, 0, requires_grad=True)
    value = logit_distillation(new_logits, torch.randn(2, 10, 0), 3)
    assert value.item() == 0.0 and value.requires_grad
    new_logits, old_logits = torch.randn(2, 10, 1), torch.randn(2, 10, 1)
    top = old_logits[..., 0].topk(3, dim=1).indices  # one class: the largest probability is the largest logit
    by_hand = sum((new_logits[b, i, 0] - old_logits[b, i, 0]) ** 2 for b in range(2) for i in top[b].tolist()) / 6
    assert logit_distillation(new_logits, old_logits, 3).item() == pytest.approx(by_hand.item(), rel=1e-6)


def test_top_old_locations_are_every_location_when_k_exceeds_them():
    torch.manual_seed(20)
    old_logits = torch.randn(2, 6, 3)
    idx = top_old_locations(old_logits, 1000)
    assert idx.shape == (2, 6) and all(sorted(row) == list(range(6)) for row in idx.tolist())
    # ordered by the best old-class probability, largest first
    best = old_logits.max(-1).values
    assert all(best[b, idx[b]].tolist() == sorted(best[b].tolist(), reverse=True) for b in range(2))



def _fits_by_hand(present, box, max_gt, max_paste):
    area = (box[2] - box[0]) * (box[3] - box[1])
    return all(_intersection(g, box) <= max_gt * (g[2] - g[0]) * (g[3] - g[1]) and _intersection(g, box) <= max_paste * area
               for g in present)


def _place_by_hand(crop_hw, present, width, height, tries, max_gt, max_paste):
    """Top-left corners drawn in [0, 0.6 W] x [0, 0.4 H], then bottom-right corners in [0.4 W, W] x
    [0.6 H, H]; the crop is clipped to the image and the first clipped box that keeps the rule wins."""
    ch, cw = crop_hw
    for anchor in ("top left", "bottom right"):
        for _ in range(tries):
            if anchor == "top left":
                left = int(torch.randint(0, math.floor(0.6 * width) + 1, ()))
                top = int(torch.randint(0, math.floor(0.4 * height) + 1, ()))
            else:
                left = int(torch.randint(math.floor(0.4 * width), width + 1, ())) - cw
                top = int(torch.randint(math.floor(0.6 * height), height + 1, ())) - ch
            box = (max(left, 0), max(top, 0), min(left + cw, width), min(top + ch, height))
            if box[0] < box[2] and box[1] < box[3] and _fits_by_hand(present, box, max_gt, max_paste):
                return Paste(-1, box, (box[0] - left, box[1] - top))
    return None


def _same_draws_left():
    return float(torch.rand(()))


@pytest.mark.parametrize("width, height, crop_hw, present, clipped", [
    (40, 30, (12, 18), [[0.0, 0.0, 40.0, 15.0]], False),  # the top half taken: placements from the bottom-right rule
    (40, 30, (12, 18), [[5.0, 3.0, 20.0, 12.0], [25.0, 18.0, 38.0, 29.0]], True),  # top-left corners up to x 24
    (10, 60, (10, 4), [[0.0, 0.0, 10.0, 10.0]], False),  # a tall image: right edges left of top edges
    (40, 30, (12, 18), [[0.0, 0.0, 40.0, 30.0]], False),  # nowhere: None after every try of both rules
])
def test_placements_are_the_first_corner_of_either_rule_that_keeps_the_overlap_rule(width, height, crop_hw, present, clipped):
    cfg = Config(placement_tries=6, max_gt_overlap=0.333, max_paste_overlap=0.111)
    found = []
    for seed in range(12):
        torch.manual_seed(seed)
        got, after = place(crop_hw, torch.tensor(present).reshape(-1, 4), width, height, cfg), _same_draws_left()
        torch.manual_seed(seed)
        assert got == _place_by_hand(crop_hw, present, width, height, 6, 0.333, 0.111), seed
        assert after == _same_draws_left()  # as many draws as the rule takes
        found.append(got)
    placed = [p for p in found if p is not None]
    if present == [[0.0, 0.0, 40.0, 30.0]]:
        assert not placed
    else:
        assert placed
    assert clipped == any(p.box[2] - p.box[0] < crop_hw[1] or p.box[3] - p.box[1] < crop_hw[0] for p in placed)


def test_a_try_whose_clipped_box_is_empty_is_skipped_for_the_next_try():
    """A 2 x 1 image, a 1 x 2 crop and a box over the right pixel: the top-left rule only reaches
    boxes over that pixel, the bottom-right rule also (0, 0, 1, 1), but misses the image at corner x 0 or y 0."""
    cfg = Config(placement_tries=8)
    present = [[1.0, 0.0, 2.0, 1.0]]
    results = []
    for seed in range(10):
        torch.manual_seed(seed)
        got = place((1, 2), torch.tensor(present), 2, 1, cfg)
        torch.manual_seed(seed)
        assert got == _place_by_hand((1, 2), present, 2, 1, 8, 0.3, 0.1), seed
        results.append(got)
    assert Paste(-1, (0, 0, 1, 1), (1, 0)) in results
    # a crop without pixels is never placed
    assert place((5, 0), torch.zeros(0, 4), 64, 64, cfg) is None
    assert place((0, 5), torch.zeros(0, 4), 64, 64, cfg) is None


def _plan_by_hand(targets, sizes, bank, cfg):
    order, plans, lambdas = [], [], []
    for t, (height, width) in zip(targets, sizes):
        lambdas.append(float(torch.distributions.Beta(cfg.blend_beta, cfg.blend_beta).sample()))
        present = t["boxes"].tolist()
        large = any(b[2] - b[0] > 0.75 * width and b[3] - b[1] > 0.75 * height for b in present)
        pastes = []
        for _ in range(0 if large else cfg.max_pastes):
            if not order:
                order = torch.randperm(len(bank)).tolist()
            k = order.pop(0)
            found = _place_by_hand(tuple(bank[k][0].shape[1:]), present, width, height, cfg.placement_tries,
                                   cfg.max_gt_overlap, cfg.max_paste_overlap)
            if found is not None:
                pastes.append(Paste(k, found.box, found.offset))
                present.append(list(found.box))
        plans.append(pastes)
    return plans, lambdas


def test_replay_plans_walk_a_reshuffled_bank_and_skip_only_images_with_a_box_over_three_quarters_both_ways():
    g = torch.Generator().manual_seed(21)
    bank = [(torch.rand(3, 6 + k, 9 - k, generator=g), k % 2) for k in range(3)]
    sizes = [(30, 40), (30, 40), (32, 40), (30, 40), (64, 64), (64, 64), (40, 30), (30, 40), (30, 40)]
    targets = [make_target([[2, 2, 12, 10]], [2]),
               make_target([[0, 0, 30, 28]], [2]),  # exactly 0.75 W wide: pastes
               make_target([[0, 0, 35, 24]], [3]),  # exactly 0.75 H tall: pastes
               make_target([[0, 2, 39, 10]], [3]),  # wide, not tall: pastes
               make_target([[0, 0, 49, 49]], [2]),  # over 0.75 both ways: none, although crops would fit
               make_target([[10, 3, 20, 60]], [3]),  # tall, not wide
               make_target(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)),
               make_target([[10, 0, 35, 28]], [2]),  # tall, not wide (its right edge is past 0.75 W)
               make_target([[0, 10, 39, 30]], [2])]  # wide, not tall (its bottom edge is past 0.75 H)
    cfg = Config(max_pastes=3, placement_tries=5, blend_beta=0.7)
    torch.manual_seed(22)
    plans, lambdas = plan_replay(targets, sizes, bank, cfg)
    torch.manual_seed(22)
    assert (plans, lambdas) == _plan_by_hand(targets, sizes, bank, cfg)
    assert plans[4] == [] and all(plans[i] for i in (1, 2, 3, 5, 7, 8))
    assert sum(len(p) for p in plans) > len(bank)  # the bank was walked more than once
    # the crop of a 0.75-both-ways box that is not over: pastes do fit beside it
    torch.manual_seed(23)
    beside, _ = plan_replay([make_target([[0, 0, 48, 48]], [2])], [(64, 64)], bank, cfg)
    assert beside[0]



# --------------------------------------------------------------------------- inversion by hand
def _tv_by_hand(x):
    n, c, h, w = x.shape
    at = lambda i, k, r, col: float(x[i, k, r, col])  # noqa: E731
    cells = [(i, k) for i in range(n) for k in range(c)]

    def mean_gap(dr, dc, rows, cols):
        gaps = [abs(at(i, k, r + dr, col + dc) - at(i, k, r, col)) for i, k in cells for r in rows for col in cols]
        return sum(gaps) / len(gaps)

    right = mean_gap(0, 1, range(h), range(w - 1))
    down = mean_gap(1, 0, range(h - 1), range(w))
    diagonal = mean_gap(1, 1, range(h - 1), range(w - 1))
    anti_diagonal = mean_gap(1, -1, range(h - 1), range(1, w))
    return right + down + diagonal + anti_diagonal


def test_total_variation_is_the_mean_gap_to_the_right_lower_and_both_diagonal_neighbours():
    x = torch.randn(2, 3, 4, 6, generator=torch.Generator().manual_seed(24))
    assert total_variation_l1(x).item() == pytest.approx(_tv_by_hand(x), rel=1e-5)
    ramp = torch.arange(12.0).view(1, 1, 3, 4)  # +1 right, +4 down: gaps 1, 4, 5 and 3
    assert total_variation_l1(ramp).item() == pytest.approx(13.0)


def _bn_terms_by_hand(detector, x):
    """Per BatchNorm layer, in forward order: ||batch mean - running mean|| + ||batch var - running var||."""
    terms = []

    def note(module, inputs, output):
        v = inputs[0].detach().transpose(0, 1).reshape(inputs[0].shape[1], -1).double()
        mean, var = v.mean(1), ((v - v.mean(1, keepdim=True)) ** 2).mean(1)
        terms.append(float((mean - module.running_mean.double()).norm() + (var - module.running_var.double()).norm()))

    handles = [m.register_forward_hook(note) for m in detector.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    try:
        with torch.no_grad():
            detector(x, normalized=True)
    finally:
        for h in handles:
            h.remove()
    return terms


def test_inversion_loss_terms_by_hand(trained):
    old = trained.teacher["detector"]
    cfg = dataclasses.replace(trained.cfg, main_weight=2.0, bn_weight=3.0, first_bn_weight=5.0, tv_weight=7.0)
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(25))
    boxes, labels = torch.tensor([[8.0, 16.0, 40.0, 36.0], [20.0, 8.0, 40.0, 54.0]]), torch.tensor([0, 1])
    terms = inversion_loss(old, x, boxes, labels, cfg)
    assert set(terms) == {"main", "bn", "first_bn", "tv"}
    with torch.no_grad():
        targets = [make_target([[8.0, 16.0, 40.0, 36.0]], [0]), make_target([[20.0, 8.0, 40.0, 54.0]], [1])]
        detection = sum(old.loss(old(x, normalized=True), targets).terms.values())
    bn = _bn_terms_by_hand(old, x)
    assert len(bn) > 2
    assert terms["main"].item() == pytest.approx(2.0 * detection.item(), rel=1e-5)
    assert terms["bn"].item() == pytest.approx(3.0 * sum(bn), rel=1e-4)
    assert terms["first_bn"].item() == pytest.approx(5.0 * bn[0], rel=1e-4)
    assert terms["tv"].item() == pytest.approx(7.0 * _tv_by_hand(x), rel=1e-5)
    # the images are already in the detector's input space: not normalised again
    with torch.no_grad():
        again = sum(old.loss(old(x), targets).terms.values())
    assert again.item() != pytest.approx(detection.item(), rel=1e-3)


def test_inversion_batches_start_from_clamped_noise_or_the_given_images(trained):
    old = trained.teacher["detector"]
    cfg = dataclasses.replace(trained.cfg, inversion_steps=0, inversion_batch=2, canvas_size=16)
    boxes, labels = torch.tensor([[1.0, 2.0, 9.0, 12.0]] * 5), torch.tensor([0, 1, 0, 1, 0])
    loops = []

    def work_steps(label, n):
        loops.append((label, n))
        return range(n)

    torch.manual_seed(26)
    images = invert(old, boxes, labels, cfg, work_steps=work_steps)
    torch.manual_seed(26)
    noise = [torch.randn(n, 3, 16, 16) for n in (2, 2, 1)]
    assert torch.equal(images, torch.cat(noise).clamp(0, 1))
    assert images.min() == 0 and images.max() == 1
    assert loops == [("inversion (batch 2)", 0)] * 2 + [("inversion (batch 1)", 0)]
    start = torch.rand(5, 3, 16, 16)
    assert torch.equal(invert(old, boxes, labels, cfg, start=start), start)


def test_inversion_refuses_a_detector_that_trains_or_takes_gradients(trained):
    import copy

    message = "^" + re.escape("inversion needs the old detector frozen and in eval mode (BN running statistics as targets)") + "$"
    boxes, labels = torch.tensor([[8.0, 8.0, 30.0, 30.0]]), torch.tensor([0])
    cfg = dataclasses.replace(trained.cfg, inversion_steps=0)
    training = copy.deepcopy(trained.teacher["detector"]).train()
    with pytest.raises(RuntimeError, match=message):
        invert(training, boxes, labels, cfg)
    one_trainable = copy.deepcopy(trained.teacher["detector"])
    next(one_trainable.parameters()).requires_grad_(True)
    with pytest.raises(RuntimeError, match=message):
        invert(one_trainable, boxes, labels, cfg)


def test_inversion_takes_sign_steps_of_the_augmented_loss_on_a_cosine_schedule(trained):
    """Adam with betas (0, 0) steps each pixel by lr_t * g / (|g| + eps); lr_t = lr (1 + cos(pi t / T)) / 2."""
    old = trained.teacher["detector"]
    cfg = dataclasses.replace(trained.cfg, inversion_steps=3, inversion_lr=0.05, canvas_size=32)
    boxes, labels = torch.tensor([[4.0, 6.0, 20.0, 18.0], [10.0, 2.0, 22.0, 28.0]]), torch.tensor([0, 1])
    start = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(27))
    torch.manual_seed(28)
    images = invert(old, boxes, labels, cfg, start=start)
    torch.manual_seed(28)
    x = start.clone()
    for t in range(3):
        x.requires_grad_(True)
        xa, ba = augment_for_inversion(x, boxes, cfg)
        (g,) = torch.autograd.grad(sum(inversion_loss(old, xa, ba, labels, cfg).values()), x)
        x = (x - 0.05 * (1 + math.cos(math.pi * t / 3)) / 2 * g / (g.abs() + 1e-8)).detach()
    assert torch.allclose(images, x, atol=1e-5)
    assert (images - start).abs().max() > 0.09  # the steps moved the pixels: 0.05 + 0.0375 + 0.0125 at most


def test_box_distillation_is_a_quarter_of_the_kl_at_the_old_models_top_k_box_logits(trained):
    from clbench.models.detection.gfl import box_distillation_at

    x = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(29))
    old_classes = torch.tensor([0, 1])
    with torch.no_grad():
        old = trained.teacher["detector"](x)
        new = trained.detector(x)
    for k in (5, 1000):
        peaks = old.reg_logits.flatten(2).max(-1).values  # the most confident side bin per location
        top = [peaks[b].topk(min(k, peaks.shape[1])).indices for b in range(2)]
        assert len(top[0]) == min(k, 84)
        expected = sum(box_distillation_at(new, old, old_classes, top, 3.0, 0.3)) / 4
        got = box_distillation(new, old, old_classes, k, 3.0, 0.3)
        assert got.item() == pytest.approx(expected.item(), rel=1e-6) and got.item() > 0



# --------------------------------------------------------------------------- the step's losses by hand
def _two_task_strategy(**options):
    """An IOR strategy at the start of task 1 whose detector has drifted from its teacher."""
    torch.manual_seed(30)
    strategy = STRATEGIES.get("ior")(None, 4, cfg=Config(**{"flip": False, **options}), seed=0)
    strategy.on_experience_start(EXP0)
    strategy.on_experience_start(EXP1)
    with torch.no_grad():
        for p in strategy.detector.parameters():
            p.add_(0.05 * torch.randn_like(p))
    strategy.train()
    return strategy


def _pasted_batch():
    x = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(31))
    # old boxes 24 x 22 (level 0 at finest scale 16) and 38 x 32 (level 1 at 16, level 0 at 56)
    targets = [make_target([[8, 8, 30, 28], [36, 4, 60, 26], [2, 30, 40, 62]], [2, 0, 1]),
               make_target([[30, 34, 56, 60], [4, 4, 24, 24]], [3, 1])]
    new_only = [make_target([[8, 8, 30, 28]], [2]), make_target([[30, 34, 56, 60]], [3])]
    pasted = [torch.tensor([[36.0, 4.0, 60.0, 26.0], [2.0, 30.0, 40.0, 62.0]]), torch.tensor([[4.0, 4.0, 24.0, 24.0]])]
    return DetectionBatch(x, targets), new_only, pasted


def test_step_losses_are_new_class_gfl_plus_s_times_the_weighted_distillation_terms():
    strategy = _two_task_strategy(roi_size=2, roi_finest_scale=16.0, topk=7, box_kd_temperature=3.0, box_kd_nms=0.3,
                                  feat_weight=0.5, box_kd_weight=0.7)
    batch, new_only, pasted = _pasted_batch()
    terms = strategy.step_losses(batch)
    from clbench.models.detection.gfl import box_distillation_at

    with torch.no_grad():
        out, old = strategy.detector(batch.x), strategy.teacher["detector"](batch.x)
        detection = strategy.detector.loss(out, new_only, channels=(2, 3))
        s = detection.quality_error.item()
        feat = _feature_distillation_by_hand(out.cls_feats, old.cls_feats, pasted, [8, 16, 32], 2, 16.0).item()
        top = old.cls_logits[..., :2].sigmoid().max(-1).values.topk(7, dim=1).indices
        cls = sum((out.cls_logits[b, i, :2] - old.cls_logits[b, i, :2]).pow(2).sum()
                  for b in range(2) for i in top[b].tolist()).item() / (2 * 7 * 2)
        peaks = old.reg_logits.flatten(2).max(-1).values.topk(7, dim=1).indices
        box = sum(box_distillation_at(out, old, torch.tensor([0, 1]), list(peaks), 3.0, 0.3)).item() / 4
    assert set(terms) == {"qfl", "giou", "dfl", "feat_kd", "cls_kd", "box_kd"}
    for k in ("qfl", "giou", "dfl"):
        assert terms[k].item() == pytest.approx(detection.terms[k].item(), rel=1e-5), k
    assert s > 0 and strategy.last_adaptive_weight == pytest.approx(s, rel=1e-6)
    assert feat > 0 and cls > 0 and box > 0
    assert terms["feat_kd"].item() == pytest.approx(s * 0.5 * feat, rel=1e-4)
    assert terms["cls_kd"].item() == pytest.approx(s * cls, rel=1e-4)
    assert terms["box_kd"].item() == pytest.approx(s * 0.7 * box, rel=1e-4)


def test_without_the_adaptive_weight_the_distillation_terms_are_unscaled():
    batch, _, _ = _pasted_batch()
    adaptive = _two_task_strategy()
    scaled = adaptive.step_losses(batch)
    s = adaptive.last_adaptive_weight
    plain = _two_task_strategy(adaptive_weight=False)
    unscaled = plain.step_losses(batch)
    assert plain.last_adaptive_weight == 1.0 and 0 < s < 1
    for k in ("feat_kd", "cls_kd", "box_kd"):
        assert unscaled[k].item() == pytest.approx(scaled[k].item() / s, rel=1e-4), k


def test_the_adaptive_weight_is_logged_per_step_when_a_logger_is_attached(monkeypatch):
    strategy = _two_task_strategy()
    logged = []
    monkeypatch.setattr(type(strategy), "_has_logger", lambda self: True)
    monkeypatch.setattr(type(strategy), "log", lambda self, name, value, **kw: logged.append((name, value, kw)))
    batch, _, _ = _pasted_batch()
    strategy.step_losses(batch)
    assert [(name, kw) for name, _, kw in logged] == [
        ("train/adaptive_weight", {"batch_size": 2, "on_step": True, "on_epoch": False})]
    assert float(logged[0][1]) == strategy.last_adaptive_weight > 0


def test_the_step_trains_on_the_flipped_batch_when_flipping_is_on():
    from clbench.models.detection.gfl import hflip_batch

    strategy = _two_task_strategy(flip=True)
    batch, _, _ = _pasted_batch()
    torch.manual_seed(32)
    flipped = hflip_batch(batch)
    assert not torch.equal(flipped.x, batch.x)
    torch.manual_seed(32)
    terms = strategy.step_losses(batch)
    object.__setattr__(strategy, "cfg", dataclasses.replace(strategy.cfg, flip=False))
    again = strategy.step_losses(flipped)
    for k in terms:
        assert terms[k].item() == pytest.approx(again[k].item(), rel=1e-5), k



# --------------------------------------------------------------------------- inversion augmentation by hand
def _augmented_by_hand(x, boxes, cfg):
    """Same draws in the same order: the shift (dx, dy), the flip, one brightness offset per image,
    then per image whether to erase, its area fraction, its log-uniform aspect in [0.3, 3.3] and its corner."""
    n, c, h, w = x.shape
    dx, dy = (int(v) for v in torch.randint(-cfg.jitter, cfg.jitter + 1, (2,)))
    rows, cols = [(r - dy) % h for r in range(h)], [(col - dx) % w for col in range(w)]
    out = x[:, :, rows][:, :, :, cols]
    moved = [[min(max(b[0] + dx, 0), w), min(max(b[1] + dy, 0), h), min(max(b[2] + dx, 0), w), min(max(b[3] + dy, 0), h)]
             for b in boxes.tolist()]
    flipped = float(torch.rand(())) < cfg.flip_p
    if flipped:
        out = out[:, :, :, list(range(w - 1, -1, -1))]
        moved = [[w - b[2], b[1], w - b[0], b[3]] for b in moved]
    offsets = torch.randn(n, 1, 1, 1)
    out = out + cfg.brightness_std * offsets
    erased = 0
    for i in range(n):
        if float(torch.rand(())) < cfg.erase_p:
            erased += 1
            low, high = cfg.erase_area
            area = (low + (high - low) * float(torch.rand(()))) * h * w
            aspect = 0.3 * (3.3 / 0.3) ** float(torch.rand(()))
            eh, ew = min(h, round(math.sqrt(area * aspect))), min(w, round(math.sqrt(area / aspect)))
            top, left = int(torch.randint(0, h - eh + 1, ())), int(torch.randint(0, w - ew + 1, ()))
            out[i, :, top:top + eh, left:left + ew] = 0
    return out, torch.tensor(moved), flipped, erased


def test_inversion_augmentation_shifts_flips_brightens_and_erases_as_drawn():
    x = torch.randn(3, 3, 20, 30, generator=torch.Generator().manual_seed(33))
    # boxes at the edges: shifts push them out and clamp them
    boxes = torch.tensor([[0.0, 0.0, 30.0, 20.0], [2.0, 3.0, 10.0, 18.0], [25.0, 1.0, 30.0, 6.0]])
    cfg = Config(jitter=5, flip_p=0.5, brightness_std=0.3, erase_p=0.5, erase_area=(0.05, 0.6))
    given = boxes.clone()
    flips, erasures = set(), set()
    for seed in range(16):
        torch.manual_seed(seed)
        got, got_boxes = augment_for_inversion(x, boxes, cfg)
        torch.manual_seed(seed)
        want, want_boxes, flipped, erased = _augmented_by_hand(x, boxes, cfg)
        assert torch.allclose(got, want, atol=1e-6), seed
        assert torch.equal(got_boxes, want_boxes) and got_boxes.dtype == torch.float32, seed
        assert torch.equal(boxes, given)  # the caller's boxes are left as they were
        flips.add(flipped)
        erasures.add(erased)
    assert flips == {True, False} and erasures == {0, 1, 2, 3}


def test_inversion_augmentation_flips_and_erases_only_below_the_drawn_probability():
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(34))
    boxes = torch.tensor([[1.0, 1.0, 5.0, 6.0], [0.0, 0.0, 8.0, 8.0]])
    torch.manual_seed(35)
    torch.randint(-2, 3, (2,))
    u_flip = float(torch.rand(()))
    torch.randn(2, 1, 1, 1)
    u_erase = float(torch.rand(()))
    # a probability equal to the draw does not flip or erase: the draw must fall below it
    cfg = Config(jitter=2, flip_p=u_flip, brightness_std=0.0, erase_p=u_erase)
    torch.manual_seed(35)
    got, got_boxes = augment_for_inversion(x, boxes, cfg)
    torch.manual_seed(35)
    want, want_boxes, flipped, erased = _augmented_by_hand(x, boxes, cfg)
    assert torch.equal(got, want) and torch.equal(got_boxes, want_boxes)
    assert not flipped and erased == 0
