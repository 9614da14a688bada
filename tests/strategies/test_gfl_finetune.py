"""GFL fine-tuning: the grown classifier keeps old rows and the old channels are trained as negatives."""

import torch

from clbench.datasets import make_target
from clbench.registry import STRATEGIES
from clbench.types import ExperienceInfo


def test_finetune_grows_and_trains_old_channels_as_negatives():
    torch.manual_seed(0)
    strategy = STRATEGIES.get("gfl_finetune")(None, 4, seed=0)
    strategy.on_experience_start(ExperienceInfo(0, (0, 1), (0, 1), 2, 4))
    old_rows = strategy.detector.cls_conv.weight.detach().clone()
    strategy.on_experience_start(ExperienceInfo(1, (2, 3), (0, 1, 2, 3), 2, 4))
    assert strategy.detector.num_classes == 4
    assert torch.equal(strategy.detector.cls_conv.weight[:2], old_rows)
    from clbench.datasets import DetectionBatch

    batch = DetectionBatch(torch.rand(2, 3, 64, 64), [make_target([[10, 10, 30, 30]], [2])] * 2)
    terms = strategy.step_losses(batch)
    assert set(terms) == {"qfl", "giou", "dfl"}
    sum(terms.values()).backward()
    # fine-tuning pushes the old classes' scores down: their rows receive gradient
    assert strategy.detector.cls_conv.weight.grad[:2].abs().sum() > 0
    strategy.eval()
    dets = strategy.predict_detections(batch.x)
    assert all(set(d["labels"].tolist()) <= {0, 1, 2, 3} for d in dets)
