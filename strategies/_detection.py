"""`DetectionStrategy`: the family base of incremental object detectors."""

from __future__ import annotations

from typing import ClassVar, Sequence

import pytorch_lightning as pl
import torch
from torch import nn

from clbench.base import CLStrategy
from clbench.datasets import DetectionBatch
from clbench.models.freeze import frozen_snapshot


# --------------------------------------------------------------------------- strategy contract
class DetectionStrategy(CLStrategy):
    """Base of every incremental-detection method.

    The experience loop, optimiser, finiteness checks and logging are `CLStrategy`'s; what
    differs: the model is a detector the method builds from its Config (`build_detector`; the
    runner passes no classification backbone), batches are `DetectionBatch`es, and evaluation
    calls `detect`, which returns seen-class detections only.
    """

    task_type: ClassVar[str] = "detection"
    # names the model in results (where classification runs name their backbone)
    detector_name: ClassVar[str] = "detector"
    accepts_aux: ClassVar[set[str] | None] = set()
    contract_scenario: ClassVar[str] = "shapes-2+2"
    input_channels: ClassVar[int | None] = 3

    def __init__(self, backbone: nn.Module | None, num_classes: int, cfg=None, aux: Sequence[nn.Module] = (), seed: int = 0):
        pl.LightningModule.__init__(self)  # CLStrategy's own __init__ builds a classification head
        self.cfg = cfg if cfg is not None else self.Config()
        self.init_loop_state(num_classes, aux, seed)
        self.detector = self.build_detector(num_classes)

    def build_detector(self, num_classes: int) -> nn.Module:
        """The method's detector; it grows or masks its own classifier per task."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor):
        return self.detector(x)

    # ----------------------------------------------------------- inference
    def predict_detections(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Per image `{"boxes", "scores", "labels"}` of the method's inference rule."""
        raise NotImplementedError

    @torch.no_grad()
    def detect(self, x: torch.Tensor, seen: Sequence[int]) -> list[dict[str, torch.Tensor]]:
        """`predict_detections` with outputs of unseen classes dropped (methods also mask the
        logits of unseen classes before post-processing; this guarantees it for every method)."""
        seen_t = torch.as_tensor(list(seen), dtype=torch.long, device=x.device)
        out = []
        for p in self.predict_detections(x):
            keep = torch.isin(p["labels"].long(), seen_t)
            out.append({k: v[keep] for k, v in p.items()})
        return out

    def predict(self, x: torch.Tensor):
        return self.predict_detections(x)

    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        raise TypeError(f"{type(self).__name__} is a detection strategy: use detect(), not predict_logits()")

    def step_losses(self, batch: DetectionBatch) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def frozen_copy(self, **more: nn.Module) -> nn.Module:
        """A teacher snapshot of the detector (and of `more` modules), eval mode, gradients off."""
        return frozen_snapshot({"detector": self.detector, **more})
