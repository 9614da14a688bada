"""GFL fine-tuning: the lower bound of incremental detection on a GFL detector (no memory, no distillation).

Each task grows the class conv to the seen classes (old rows kept) and trains the whole detector
with the ordinary GFL loss (QFL + GIoU + DFL, ATSS) on the task's own annotations. Every seen-class
channel is trained, so old classes only ever appear as negatives and are forgotten: what IOR and
the other methods are measured against. Detector and settings: `clbench.models.detection.gfl`
(TinyGFL by default; `--paper-settings` on the COCO splits: GFL R50-FPN with the 1x recipe IOR's and
ERD's codes use, so this bound sits under both).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from clbench.strategies._gfl import GFLStrategy

from clbench.datasets import DetectionBatch, restrict
from clbench.models.detection.gfl import GFL_R50_FPN_1X, GFLConfig
from clbench.registry import register_strategy


@dataclass(frozen=True)
class Config(GFLConfig):
    pass


@register_strategy("gfl_finetune")
class GFLFinetune(GFLStrategy):
    """A GFL detector fine-tuned on each task's data (lower bound)."""

    Config = Config
    PAPER_SETTINGS = {  # the IOR and ERD codes' GFL R50-FPN 1x recipe (12 epochs, SGD, 16 images per step)
        setting: dict(GFL_R50_FPN_1X)
        for split in ("coco-40+40", "coco-50+30", "coco-60+20", "coco-70+10")
        for setting in (split, f"{split}-absent")
    }

    def step_losses(self, batch: DetectionBatch) -> dict[str, torch.Tensor]:
        batch = self.training_batch(batch)
        targets = [restrict(t, self.experience.classes) for t in batch.targets]
        return self.detector.loss(self.detector(batch.x), targets, channels=self.experience.seen_classes).terms
