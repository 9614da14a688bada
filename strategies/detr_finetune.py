"""Fine-tuning baseline for query-based incremental detection: P²IOD's lower bound.

The same frozen pretrained DETR as P²IOD (TinyDETR, `clbench.models.detection.detr`, or with
`detector="deformable_detr"` the papers' Deformable DETR R50), with its class head (all classes
of the stream from the start, unseen-class logits masked) and box head (lower learning rate)
trained on each task's own annotations by the set loss: no prompts, no pseudo-labels, no
fusion. By default every seen class's row is trained (old objects in new images are
unlabelled, so old rows learn to call them background: the forgetting P²IOD is measured
against); `freeze_old_rows=True` keeps old rows fixed as P²IOD does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from clbench.strategies._detr import FrozenBaseDetrConfig, FrozenBaseDetrStrategy

from clbench.datasets import DetectionBatch
from clbench.models.detection.detr import normalised_targets
from clbench.registry import register_strategy


@dataclass(frozen=True)
class Config(FrozenBaseDetrConfig):
    freeze_old_rows: bool = False


@register_strategy("detr_finetune")
class DetrFinetune(FrozenBaseDetrStrategy):
    """Class and box heads of a frozen pretrained DETR fine-tuned on each task in turn."""

    Config = Config

    def step_losses(self, batch: DetectionBatch) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            encoded = self.detector.encode(batch.x)  # the frozen base's image features
        out = self.detector.decode(*encoded)
        return self.seen_loss(out, normalised_targets(batch.targets, batch.x.shape[-2:]))
