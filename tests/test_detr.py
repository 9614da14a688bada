"""TinyDETR: Hungarian matching, the set loss against hand computation, the self-attention
prompt hook, top-k inference and loading a base."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from clbench.strategies._detr import load_base, pretrain_shapes_base

from clbench.errors import UsageError
from clbench.models.detection.detr import (
    DetrOutput,
    SetLossWeights,
    TinyDETR,
    detections,
    hungarian_match,
    layer_loss,
    mask_classes,
    normalised_targets,
    set_loss,
)

T = torch.tensor


pytestmark = pytest.mark.usefixtures("one_thread")


def _giou(a, b):
    """Generalised IoU of two xyxy boxes, from the definition."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (hull - union) / hull


def _xyxy(cxcywh):
    cx, cy, w, h = cxcywh
    return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]


def _focal_cost(z, alpha=0.25, gamma=2.0):
    p = 1 / (1 + math.exp(-z))
    return alpha * (1 - p) ** gamma * -math.log(p + 1e-8) - (1 - alpha) * p ** gamma * -math.log(1 - p + 1e-8)


def test_matcher_picks_the_minimum_cost_assignment_by_brute_force():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 4, 3, generator=g) * 2
    boxes = torch.rand(1, 4, 4, generator=g) * 0.4 + 0.3
    target = {"labels": T([2, 0]), "boxes": T([[0.3, 0.4, 0.2, 0.3], [0.6, 0.5, 0.3, 0.2]])}
    cost = [[2 * _focal_cost(float(logits[0, q, int(target["labels"][j])]))
             + 5 * float((boxes[0, q] - target["boxes"][j]).abs().sum())
             - 2 * _giou(_xyxy(boxes[0, q].tolist()), _xyxy(target["boxes"][j].tolist())) for j in range(2)] for q in range(4)]
    best = min(itertools.permutations(range(4), 2), key=lambda qs: sum(cost[q][j] for j, q in enumerate(qs)))
    (rows, cols), = hungarian_match(logits, boxes, [target])
    assert {int(q): int(j) for q, j in zip(rows, cols)} == {q: j for j, q in enumerate(best)}


def test_matcher_on_a_hand_case_and_an_empty_image():
    # query 0 sits on target 1 and says its class; query 1 sits on target 0 and says its class
    logits = T([[[-5.0, 5.0], [5.0, -5.0], [-5.0, -5.0]]])
    boxes = T([[[0.7, 0.7, 0.2, 0.2], [0.3, 0.3, 0.2, 0.2], [0.5, 0.5, 0.9, 0.9]]])
    target = {"labels": T([0, 1]), "boxes": T([[0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]])}
    empty = {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}
    (rows, cols), (er, ec) = hungarian_match(logits.repeat(2, 1, 1), boxes.repeat(2, 1, 1), [target, empty])
    assert dict(zip(rows.tolist(), cols.tolist())) == {0: 1, 1: 0}
    assert len(er) == len(ec) == 0


def test_layer_loss_equals_the_hand_computation():
    alpha, gamma = 0.25, 2.0
    logits = T([[[1.5, -0.5], [-2.0, 0.3]]])  # 1 image, 2 queries, 2 classes
    boxes = T([[[0.1, 0.1, 0.2, 0.2], [0.8, 0.8, 0.1, 0.1]]])  # query 0 is near the target
    target = {"labels": T([0]), "boxes": T([[0.2, 0.2, 0.2, 0.2]])}
    terms = layer_loss(logits, boxes, [target], SetLossWeights(alpha=alpha, gamma=gamma))
    focal = 0.0
    for q in range(2):
        for c in range(2):
            t = 1.0 if (q, c) == (0, 0) else 0.0
            p = 1 / (1 + math.exp(-float(logits[0, q, c])))
            ce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
            p_t = p * t + (1 - p) * (1 - t)
            focal += (alpha * t + (1 - alpha) * (1 - t)) * (1 - p_t) ** gamma * ce
    assert terms["focal"].item() == pytest.approx(focal, rel=1e-5)
    assert terms["l1"].item() == pytest.approx(0.1 + 0.1 + 0 + 0, rel=1e-5)
    # xyxy (0, 0, .2, .2) against (.1, .1, .3, .3): IoU 1/7, hull .09, union .07
    assert _giou([0, 0, 0.2, 0.2], [0.1, 0.1, 0.3, 0.3]) == pytest.approx(1 / 7 - 0.02 / 0.09)
    assert terms["giou"].item() == pytest.approx(1 - (1 / 7 - 0.02 / 0.09), rel=1e-5)


def test_set_loss_sums_weighted_terms_over_decoder_layers_and_divides_by_targets():
    g = torch.Generator().manual_seed(1)
    logits, boxes = torch.randn(3, 2, 5, 3, generator=g), torch.rand(3, 2, 5, 4, generator=g) * 0.3 + 0.2
    targets = [{"labels": T([1, 2]), "boxes": T([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.3]])},
               {"labels": T([0]), "boxes": T([[0.5, 0.4, 0.2, 0.3]])}]
    total = set_loss(DetrOutput(logits, boxes, torch.zeros(3, 2, 5, 1)), targets)
    per_layer = [layer_loss(logits[l], boxes[l], targets) for l in range(3)]
    assert total["focal"].item() == pytest.approx(sum(t["focal"].item() for t in per_layer), rel=1e-5)
    assert total["l1"].item() == pytest.approx(5 * sum(t["l1"].item() for t in per_layer), rel=1e-5)
    assert total["giou"].item() == pytest.approx(2 * sum(t["giou"].item() for t in per_layer), rel=1e-5)
    # the focal term is a sum over queries and classes divided by the 3 targets: doubling the
    # batch with the same images keeps it
    doubled = layer_loss(logits[0].repeat(2, 1, 1), boxes[0].repeat(2, 1, 1), targets * 2)
    assert doubled["focal"].item() == pytest.approx(per_layer[0]["focal"].item(), rel=1e-5)


def test_ignored_boxes_are_never_targets_and_boxes_are_normalised():
    t = {"boxes": T([[8.0, 16.0, 24.0, 48.0], [0.0, 0.0, 10.0, 10.0]]), "labels": T([3, 1]), "ignore": T([False, True])}
    (n,) = normalised_targets([t], (64, 32))  # H = 64, W = 32
    assert n["labels"].tolist() == [3]
    assert torch.allclose(n["boxes"], T([[0.5, 0.5, 0.5, 0.5]]))


def test_masked_classes_get_no_loss_and_no_gradient():
    logits = torch.randn(1, 1, 4, 3, requires_grad=True)
    out = DetrOutput(mask_classes(logits, [0, 1]), torch.full((1, 1, 4, 4), 0.5), torch.zeros(1, 1, 4, 1))
    target = [{"labels": T([1]), "boxes": T([[0.5, 0.5, 0.2, 0.2]])}]
    loss = set_loss(out, target)
    loss["focal"].backward()
    assert torch.isfinite(loss["focal"])
    assert logits.grad[..., 2].abs().sum() == 0 and logits.grad[..., :2].abs().sum() > 0


@pytest.fixture(scope="module")
def detr():
    torch.manual_seed(0)
    return TinyDETR(num_classes=4).eval()


def test_prompts_enter_only_the_decoder_self_attention(detr):
    x = torch.rand(2, 3, 64, 64)
    seen = {}

    def record(name):
        def hook(module, args, kwargs):
            seen.setdefault(name, []).append((args[0].shape[1], args[1].shape[1], args[2].shape[1]))
        return hook

    handles = [layer.self_attn.register_forward_pre_hook(record(f"self{l}"), with_kwargs=True) for l, layer in enumerate(detr.decoder)]
    handles += [layer.cross_attn.register_forward_pre_hook(record(f"cross{l}"), with_kwargs=True) for l, layer in enumerate(detr.decoder)]
    memory, pos = detr.encode(x)
    prompts = [(torch.randn(2, 3, 64), torch.randn(2, 3, 64)) for _ in range(3)]
    with torch.no_grad():
        plain = detr.decode(memory, pos)
        prompted = detr.decode(memory, pos, prompts)
    for h in handles:
        h.remove()
    tokens = memory.shape[1]
    assert tokens == 64  # stride 8 at 64 px
    for l in range(3):
        assert seen[f"self{l}"] == [(12, 12, 12), (12, 15, 15)]  # queries, keys, values: Q + P keys with prompts
        assert seen[f"cross{l}"] == [(12, tokens, tokens)] * 2
    assert plain.states.shape == (3, 2, 12, 64) and plain.logits.shape == (3, 2, 12, 4)
    assert not torch.allclose(plain.states, prompted.states)
    assert torch.equal(detr(x).states, detr.decode(memory, pos).states)


def test_detections_take_top_scores_over_allowed_classes_in_pixels():
    logits = T([[[0.0, 3.0, 9.0], [2.0, -1.0, 9.0]]])
    boxes = T([[[0.5, 0.5, 0.5, 0.5], [0.25, 0.25, 0.5, 0.5]]])
    (d,) = detections(logits, boxes, (64, 128), [0, 1], top_k=3)
    assert d["labels"].tolist() == [1, 0, 0]  # class 2 is not allowed
    assert torch.allclose(d["scores"], torch.sigmoid(T([3.0, 2.0, 0.0])))
    assert torch.allclose(d["boxes"][0], T([32.0, 16.0, 96.0, 48.0]))
    assert torch.allclose(d["boxes"][1], T([0.0, 0.0, 64.0, 32.0]))


def test_load_base_keeps_a_fresh_class_head_and_names_a_missing_file(tmp_path, detr):
    path = tmp_path / "base.pt"
    torch.save(detr.state_dict(), path)
    torch.manual_seed(5)
    other = TinyDETR(num_classes=4)
    head = other.class_head.weight.clone()
    load_base(other, path)
    for (k, a), b in zip(detr.state_dict().items(), other.state_dict().values()):
        if k != "class_head.bias":  # the prior bias is a constant
            assert torch.equal(a, b) != k.startswith("class_head."), k
    assert torch.equal(other.class_head.weight, head)
    with pytest.raises(UsageError, match="nowhere.pt"):
        load_base(other, tmp_path / "nowhere.pt")


def test_shapes_base_is_trained_once_per_settings_and_cached(tmp_path, monkeypatch):
    import clbench.scenarios.shapes as shapes

    settings = {"images": 8, "epochs": 1, "size": 64, "seed": 3, "batch_size": 8}
    path = pretrain_shapes_base(settings, cache_dir=tmp_path, verbose=False)
    trained = torch.load(path, weights_only=True)
    torch.manual_seed(3)
    fresh = TinyDETR(num_classes=8).state_dict()
    assert not torch.equal(trained["box_head.4.weight"], fresh["box_head.4.weight"])
    # a second call with the same settings reads the file: no data is generated, nothing trains
    monkeypatch.setattr(shapes, "generate_shapes", lambda *a, **k: pytest.fail("the cached base was retrained"))
    assert pretrain_shapes_base(dict(settings), cache_dir=tmp_path) == path
    other = {**settings, "seed": 4}
    monkeypatch.undo()
    assert pretrain_shapes_base(other, cache_dir=tmp_path, verbose=False) != path
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, pretrain_shapes_base(other, cache_dir=tmp_path).name])
