"""TinyGFL (clbench/gfl.py): losses by hand, box coding, ATSS, the growing classifier, training."""

import math

import pytest
import torch

from clbench.datasets import make_target
from clbench.models.detection.gfl import (
    GFLConfig,
    TinyGFL,
    atss_assign,
    boxes_to_distances,
    distances_to_boxes,
    distribution_focal_loss,
    expected_distance,
    quality_focal_loss,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_quality_focal_loss_by_hand():
    # one location, two classes; sigmoid(0) = 0.5
    logits = torch.tensor([[0.0, 0.0]])
    loss = quality_focal_loss(logits, torch.tensor([1]), torch.tensor([0.8]), beta=2.0)
    # class 1 is the positive with target 0.8: BCE(0.5, 0.8) = log 2, modulated by |0.8 - 0.5|^2
    assert loss[0, 1].item() == pytest.approx(math.log(2) * 0.09, rel=1e-6)
    # class 0 is a negative: BCE(0.5, 0) = log 2, modulated by 0.5^2
    assert loss[0, 0].item() == pytest.approx(math.log(2) * 0.25, rel=1e-6)
    # a background location (label -1) is a negative for every class
    z = torch.tensor([[2.0, -1.0]])
    bg = quality_focal_loss(z, torch.tensor([-1]), torch.tensor([0.0]), beta=2.0)
    p = torch.sigmoid(z)
    assert torch.allclose(bg, -torch.log(1 - p) * p**2)


def test_distribution_focal_loss_by_hand():
    # softmax([0, log 3, 0]) = [1/5, 3/5, 1/5]; target 0.5 sits halfway between bins 0 and 1
    logits = torch.tensor([[0.0, math.log(3.0), 0.0]])
    loss = distribution_focal_loss(logits, torch.tensor([0.5]))
    assert loss.item() == pytest.approx(0.5 * math.log(5) + 0.5 * math.log(5 / 3), rel=1e-6)
    # target 0.25 on a uniform distribution: (0.75 + 0.25) * log 3
    assert distribution_focal_loss(torch.zeros(1, 3), torch.tensor([0.25])).item() == pytest.approx(math.log(3))


def test_box_coding_round_trip():
    centers = torch.tensor([[12.0, 20.0], [40.0, 8.0]])
    boxes = torch.tensor([[2.0, 5.0, 30.0, 26.0], [33.0, 0.0, 47.5, 9.0]])
    assert torch.allclose(distances_to_boxes(boxes_to_distances(boxes, centers), centers), boxes)
    # a distribution peaked on bin k decodes to distance k
    logits = torch.full((1, 4, 9), -30.0)
    for side, k in enumerate([0, 3, 5, 8]):
        logits[0, side, k] = 30.0
    assert torch.allclose(expected_distance(logits), torch.tensor([[0.0, 3.0, 5.0, 8.0]]), atol=1e-4)


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    return TinyGFL(2, GFLConfig())


def test_output_shapes_and_grid(detector):
    out = detector(torch.rand(2, 3, 64, 64))
    # strides 8/16/32 on a 64 px image: 8x8 + 4x4 + 2x2 locations
    assert out.cls_logits.shape == (2, 84, 2)
    assert out.reg_logits.shape == (2, 84, 4, 9)
    assert [f.shape[-1] for f in out.cls_feats] == [8, 4, 2]
    assert out.centers[0].tolist() == [4.0, 4.0] and out.centers[64].tolist() == [8.0, 8.0]
    assert out.strides.unique().tolist() == [8.0, 16.0, 32.0]


def test_atss_positives_lie_inside_their_box(detector):
    out = detector(torch.rand(1, 3, 64, 64))
    gt = torch.tensor([[8.0, 8.0, 30.0, 28.0], [40.0, 36.0, 60.0, 60.0]])
    assigned = atss_assign(detector.anchors(out), out.levels, gt, topk=9)
    assert (assigned >= 0).any()
    for g in range(2):
        mine = out.centers[assigned == g]
        assert len(mine) > 0
        assert ((mine >= gt[g, :2]) & (mine <= gt[g, 2:])).all()
    assert (atss_assign(detector.anchors(out), out.levels, gt[:0]) == -1).all()


def test_grow_classes_keeps_old_rows():
    torch.manual_seed(1)
    d = TinyGFL(2).eval()
    x = torch.rand(1, 3, 64, 64)
    before = d(x).cls_logits
    old_w = d.cls_conv.weight.detach().clone()
    d.grow_classes(5)
    assert d.cls_conv.weight.shape[0] == 5
    assert torch.equal(d.cls_conv.weight[:2], old_w)
    after = d(x).cls_logits
    assert torch.allclose(after[..., :2], before, atol=1e-6)
    # new rows start at the prior probability 0.01 (bias) with small weights
    assert torch.allclose(d.cls_conv.bias[2:], torch.full((3,), -math.log(99.0)))
    # a state dict with another class count resizes the classifier on load (resume, teachers)
    fresh = TinyGFL(0)
    fresh.load_state_dict(d.state_dict())
    assert fresh.num_classes == 5 and torch.equal(fresh.cls_conv.weight, d.cls_conv.weight)


def test_loss_ignores_ignored_boxes_and_rejects_foreign_classes(detector):
    out = detector(torch.rand(1, 3, 64, 64))
    ignored = make_target([[8, 8, 30, 28]], [0], [True])
    loss = detector.loss(out, [ignored])
    assert loss.num_positives == 0 and loss.quality_error.item() == 0.0
    with pytest.raises(ValueError, match="outside the trained channels"):
        detector.loss(out, [make_target([[8, 8, 30, 28]], [1])], channels=[0])


def test_detect_masks_other_classes(detector):
    detector.eval()
    with torch.no_grad():
        detector.cls_conv.bias.fill_(5.0)  # every location scores high for both classes
    try:
        dets = detector.detect(torch.rand(2, 3, 64, 64), classes=[1])
    finally:
        with torch.no_grad():
            detector.cls_conv.bias.fill_(-math.log(99.0))
    assert all(len(d["labels"]) > 0 and (d["labels"] == 1).all() for d in dets)
    assert all(len(d["labels"]) <= 100 for d in dets)
    assert all(((d["boxes"] >= 0) & (d["boxes"] <= 64)).all() for d in dets)


def test_training_reduces_the_loss():
    torch.manual_seed(0)
    d = TinyGFL(2)
    x = torch.rand(4, 3, 64, 64)
    targets = [make_target([[10, 10, 30, 34], [40, 5, 60, 20]], [0, 1]) for _ in range(4)]
    x[:, :, 10:34, 10:30] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]
    x[:, :, 5:20, 40:60] = torch.tensor([0.0, 0.0, 1.0])[:, None, None]
    opt = torch.optim.AdamW(d.parameters(), lr=2e-3)
    losses = []
    for _ in range(15):
        loss = d.loss(d(x), targets)
        total = sum(loss.terms.values())
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(total.item())
    assert loss.num_positives > 0
    assert losses[-1] < 0.7 * losses[0]


def test_gradient_accumulation_and_warm_up():
    """accumulate_grad_batches=2 over 3 batches: one SGD step on the mean gradient of batches 0 and 1,
    one on batch 2's alone (a shorter last group); warm-up scales the rate by r + (1 - r) i / n."""
    from types import SimpleNamespace

    from clbench.datasets import DetectionBatch
    from clbench.registry import STRATEGIES
    from clbench.types import ExperienceInfo

    torch.manual_seed(0)
    cls = STRATEGIES.get("gfl_finetune")
    cfg = cls.Config(flip=False, optimizer="sgd", lr=0.1, momentum=0.0, weight_decay=0.0, accumulate_grad_batches=2,
                     warmup_iters=2, warmup_ratio=0.5)
    strategy = cls(None, 2, cfg=cfg)
    strategy.on_experience_start(ExperienceInfo(0, (0, 1), (0, 1), 1, 2))
    batches = [DetectionBatch(torch.rand(1, 3, 64, 64), [make_target([[8.0, 8.0, 40.0, 30.0 + 4 * i]], [i % 2])])
               for i in range(3)]
    params = [p for p in strategy.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]

    def gradient(batch):
        for p in params:
            p.grad = None
        strategy.total_loss(batch, 0).backward()
        return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]

    g0, g1 = gradient(batches[0]), gradient(batches[1])
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.0)
    trainer = SimpleNamespace(num_training_batches=3, global_step=0, current_epoch=0, loggers=[])
    strategy._trainer = trainer
    strategy.optimizers = lambda: optimizer
    strategy.manual_backward = lambda loss: loss.backward()
    try:
        for p in params:
            p.grad = None
        strategy.training_step(batches[0], 0)
        assert all(torch.equal(p, s) for p, s in zip(params, start))  # no step after the first batch
        strategy.training_step(batches[1], 1)
        # warm-up step 0: lr 0.1 x 0.5
        for p, s, a, b in zip(params, start, g0, g1):
            assert torch.allclose(p, s - 0.05 * (a + b) / 2, atol=1e-6)
        trainer.global_step = 1
        middle = [p.detach().clone() for p in params]
        g2 = gradient(batches[2])
        for p in params:
            p.grad = None
        strategy.training_step(batches[2], 2)  # a group of one; warm-up step 1: lr 0.1 x 0.75
        for p, m, c in zip(params, middle, g2):
            assert torch.allclose(p, m - 0.075 * c, atol=1e-6)
        trainer.global_step = 2
        strategy._warm_up(optimizer)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
    finally:
        strategy._trainer = None
