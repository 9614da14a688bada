"""ERD: elastic response selection and the two response losses by hand, the teacher's life cycle,
and a short run on ShapesIOD."""

import json
import math

import pytest
import torch
from clbench.strategies.erd import (
    Config,
    box_response_loss,
    class_response_loss,
    elastic_locations,
)

from clbench.datasets import DetectionBatch, make_target
from clbench.models.detection.gfl import GFLOutput
from clbench.registry import STRATEGIES
from clbench.types import ExperienceInfo

EXP0 = ExperienceInfo(0, (0, 1), (0, 1), 2, 4)
EXP1 = ExperienceInfo(1, (2, 3), (0, 1, 2, 3), 2, 4)


# --------------------------------------------------------------------------- elastic response selection
def test_elastic_selection_takes_what_stands_above_the_image_s_mean_plus_alpha_std():
    one_peak = [0.0] * 8 + [0.5, 1.0]
    scores = torch.tensor([
        one_peak,
        [0.1 * v for v in one_peak],  # same shape, ten times smaller
        [0.5] * 10,  # flat: std 0 (0.5 is exact in float32, so is its mean)
        [0.0] * 7 + [1.0] * 3,  # three equal peaks
    ])
    # by hand (unbiased std over the 10 locations of each image):
    # row 0: mean 0.15, std sqrt(1.025 / 9) = 0.3375 -> alpha 2: 0.8249 {9}; alpha 1: 0.4875 {8, 9}
    # row 1: every statistic x 0.1 -> the same locations (statistics are per image, not per batch)
    # row 2: threshold = 0.5, nothing is strictly above it
    # row 3: mean 0.3, std sqrt(2.1 / 9) = 0.4830 -> alpha 2: 1.266, none; alpha 1: 0.783 {7, 8, 9}
    picked = {alpha: [sorted(s.tolist()) for s in elastic_locations(scores, alpha)] for alpha in (2.0, 1.0)}
    assert picked[2.0] == [[9], [9], [], []]
    assert picked[1.0] == [[8, 9], [8, 9], [], [7, 8, 9]]
    # one statistic over the whole batch instead would leave row 1 (all <= 0.1) with nothing
    pooled = scores.mean() + 2 * scores.std()
    assert not bool((scores[1] > pooled).any())


# --------------------------------------------------------------------------- response losses
def test_class_response_loss_by_hand_and_only_at_the_sites():
    old = torch.tensor([[[0.0, 0.0], [1.0, 2.0], [5.0, 5.0], [0.0, -1.0]],
                        [[3.0, 3.0], [3.0, 3.0], [3.0, 3.0], [3.0, 3.0]]])
    new = torch.zeros(2, 4, 2)
    new[0, 3] = 1.0
    new.requires_grad_(True)
    sites = [torch.tensor([1, 3]), torch.tensor([], dtype=torch.long)]
    loss = class_response_loss(new, old, sites)
    # image 0: gaps (0-1)^2, (0-2)^2, (1-0)^2, (1+1)^2 -> mean 10/4 = 2.5; image 1 has no site -> 0
    assert loss.item() == pytest.approx(1.25)
    loss.backward()
    touched = torch.nonzero(new.grad.abs().sum(-1)).tolist()
    assert touched == [[0, 1], [0, 3]]


def _output(cls_logits, reg_logits, centers) -> GFLOutput:
    n = len(centers)
    return GFLOutput([torch.zeros(1)], cls_logits, reg_logits, torch.tensor(centers, dtype=torch.float32),
                     torch.full((n,), 8.0), torch.zeros(n, dtype=torch.long), (64, 64))


def _kl(p, q) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def _softmax(z, t):
    e = [math.exp(v / t) for v in z]
    return [v / sum(e) for v in e]


@pytest.mark.parametrize("temperature", [1.0, 10.0])
def test_box_response_loss_by_hand(temperature):
    """R = 1 (two bins per side), stride 8, two old classes. The old model's sides are all
    [0, ln 3] (expected 0.75 stride = 6 px), so its boxes are 12 px squares at the centres:
    location 1 overlaps location 0 (IoU 0.5) with the same class and a lower score -> suppressed;
    location 3 overlaps location 0 with another class -> kept (class-wise NMS); 2 is far away."""
    ln3 = math.log(3.0)
    centers = [[16, 16], [20, 16], [48, 48], [18, 16]]
    old_cls = torch.tensor([[[2.0, -5.0], [1.0, -5.0], [-5.0, 0.0], [-5.0, 3.0]]] * 2)
    old_reg = torch.tensor([0.0, ln3]).expand(2, 4, 4, 2).clone()
    new_cls = torch.tensor([[[0.0, -5.0], [9.0, 9.0], [-5.0, 0.0], [-5.0, math.log(1 / 3)]]] * 2)  # w0 .5, w3 .25
    new_reg = old_reg.clone()
    new_reg[:, 0] = torch.tensor([0.0, 0.0])
    new_reg[:, 1] = torch.tensor([5.0, -5.0])  # far off, but suppressed: must not count
    new_reg[:, 3] = torch.tensor([ln3, 0.0])
    new, old = _output(new_cls, new_reg, centers), _output(old_cls, old_reg, centers)
    sites = [torch.arange(4), torch.tensor([], dtype=torch.long)]  # image 1 selects nothing
    value = box_response_loss(new, old, torch.tensor([0, 1]), sites, temperature, nms_iou=0.005)

    p_old = _softmax([0.0, ln3], temperature)
    per_side = {0: _kl(p_old, _softmax([0.0, 0.0], temperature)) / 2,  # mean over the 2 bins
                3: _kl(p_old, _softmax([ln3, 0.0], temperature)) / 2}
    image0 = temperature**2 * 4 * (0.5 * per_side[0] + 0.25 * per_side[3]) / 4  # 4 sides, (1/4) sum_side
    # float32 KL of near-equal distributions (T = 10) keeps about 5 digits
    assert value.item() == pytest.approx(image0 / 2, rel=1e-4)  # mean over the 2 images
    if temperature == 1.0:
        assert value.item() == pytest.approx(0.0506832, rel=1e-5)  # (0.5*0.130812 + 0.25*0.549306) / 2 / 2


# --------------------------------------------------------------------------- per task
@pytest.fixture(scope="module")
def strategy():
    torch.manual_seed(0)
    return STRATEGIES.get("erd")(None, 4, cfg=Config(flip=False), seed=0)


def _batch(labels) -> DetectionBatch:
    g = torch.Generator().manual_seed(1)
    return DetectionBatch(torch.rand(2, 3, 64, 64, generator=g), [make_target([[10, 12, 34, 30]], [labels[0]]),
                                                                  make_target([[30, 28, 56, 60]], [labels[1]])])


def test_first_task_has_no_teacher_and_no_distillation(strategy):
    strategy.on_experience_start(EXP0)
    assert strategy.teacher is None
    assert set(strategy.step_losses(_batch([0, 1]))) == {"qfl", "giou", "dfl"}


def test_the_teacher_is_frozen_in_eval_mode_and_distilled_on_old_channels_only(strategy):
    strategy.on_experience_start(EXP0)
    strategy.on_experience_start(EXP1)
    teacher = strategy.teacher["detector"]
    assert teacher.num_classes == 2 and strategy.detector.num_classes == 4  # snapshot before the growth
    assert not any(p.requires_grad for p in teacher.parameters())
    strategy.train()
    assert not teacher.training and strategy.detector.training
    before = {k: v.clone() for k, v in teacher.state_dict().items()}

    batch = _batch([2, 3])
    terms = strategy.step_losses(batch)
    assert set(terms) == {"qfl", "giou", "dfl", "cls_kd", "box_kd"}
    weight = strategy.detector.cls_conv.weight
    # the detection loss trains the new-class channels only: no gradient reaches the old rows
    (qfl_grad,) = torch.autograd.grad(terms["qfl"], weight, retain_graph=True)
    assert torch.all(qfl_grad[:2] == 0) and qfl_grad[2:].abs().sum() > 0
    # the class response loss pulls the old rows only
    (kd_grad,) = torch.autograd.grad(terms["cls_kd"], weight, retain_graph=True)
    assert kd_grad[:2].abs().sum() > 0 and torch.all(kd_grad[2:] == 0)

    # cls_kd is the squared gap at exactly the teacher's mean + 2 std locations (computed here by hand)
    with torch.no_grad():
        old_out, new_out = teacher(batch.x), strategy.detector(batch.x)
        confidence = old_out.cls_logits.sigmoid().max(-1).values
        expected = []
        for b in range(2):
            sites = confidence[b] > confidence[b].mean() + 2 * confidence[b].std()
            assert 0 < int(sites.sum()) < len(sites)
            expected.append((new_out.cls_logits[b, sites, :2] - old_out.cls_logits[b, sites]).pow(2).mean())
    assert terms["cls_kd"].item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-5)

    optimizer = torch.optim.SGD([p for p in strategy.parameters() if p.requires_grad], lr=0.1)
    sum(terms.values()).backward()
    optimizer.step()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


# --------------------------------------------------------------------------- end to end
def test_a_short_run_on_shapes_stores_a_detection_record(tmp_path):
    from clbench.cli import main

    code = main(["run", "--strategy", "erd", "--scenario", "shapes-2+2", "--accelerator", "cpu", "--quiet",
                 "--set", "epochs=1", "limit_train_batches=2", "batch_size=4", "--output-dir", str(tmp_path)])
    assert code == 0
    (path,) = tmp_path.rglob("*.json")
    data = json.loads(path.read_text())
    assert data["status"] == "completed" and data["strategy"] == "erd" and data["backbone"] == "tiny_gfl"
    assert data["strategy_config"]["cls_alpha"] == 2.0 and data["strategy_config"]["box_kd_temperature"] == 10.0
    first, last = data["detection"]["per_task"]
    assert set(last["ap_per_class"]) == {"0", "1", "2", "3"}
    assert math.isnan(first["old"]) and all(0.0 <= last[k] <= 1.0 for k in ("old", "new", "all"))
