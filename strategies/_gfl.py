"""`GFLStrategy`: the family base of the GFL detectors (IOR, ERD, fine-tuning)."""

from __future__ import annotations

import torch
from clbench.strategies._detection import DetectionStrategy
from torch import nn

from clbench.datasets import DetectionBatch
from clbench.models.detection.gfl import GFLConfig, TinyGFL, hflip_batch
from clbench.types import ExperienceInfo


# --------------------------------------------------------------------------- strategy base
class GFLStrategy(DetectionStrategy):
    """A detection strategy on TinyGFL: the classifier covers the seen classes and grows at the
    start of every task (old rows kept); inference masks unseen classes' logits."""

    Config = GFLConfig
    detector_name = "tiny_gfl"

    def build_detector(self, num_classes: int) -> nn.Module:
        # the class conv starts empty and grows with the seen classes
        return TinyGFL(0, self.cfg)

    def on_experience_start(self, exp: ExperienceInfo) -> None:
        super().on_experience_start(exp)
        self.detector.grow_classes(len(exp.seen_classes))

    def training_batch(self, batch: DetectionBatch) -> DetectionBatch:
        return hflip_batch(batch) if self.cfg.flip else batch

    def predict_detections(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        seen = self.experience.seen_classes if self.experience is not None else ()
        if not seen:
            empty = x.new_zeros(0)
            return [{"boxes": x.new_zeros(0, 4), "scores": empty, "labels": empty.long()} for _ in range(len(x))]
        return self.detector.detect(x, classes=seen)
