"""`DetectionStrategy`: the family base of incremental object detectors."""

from __future__ import annotations

from typing import ClassVar, Sequence

import pytorch_lightning as pl
import torch
from torch import nn

from clbench.base import CLStrategy
from clbench.datasets import DetectionBatch
from clbench.models.detection.padding import padded_batch
from clbench.models.freeze import frozen_snapshot


# --------------------------------------------------------------------------- strategy contract
class DetectionStrategy(CLStrategy):
    """Base of every incremental-detection method.

    The experience loop, optimiser, finiteness checks and logging are `CLStrategy`'s; what
    differs: the model is a detector the method builds from its Config (`build_detector`; the
    runner passes no classification backbone), batches are `DetectionBatch`es, and evaluation
    calls `detect`, which returns seen-class detections only.

    Padded batches (images of different sizes, `DetectionBatch.image_sizes`): every training step
    and every `detect` runs inside `clbench.models.detection.padding.padded_batch`, so detector
    forwards, `normalised_targets` and `detections` on the batch's padded shape use each image's
    valid size even where a method passes only `batch.x` (see that module); methods should pass
    `batch.image_sizes` explicitly where an API takes it.
    """

    task_type: ClassVar[str] = "detection"
    # names the model in results (where classification runs name their backbone) when the Config
    # does not say which detector it builds; `model_name(cfg)` is what results record
    detector_name: ClassVar[str] = "detector"
    accepts_aux: ClassVar[set[str] | None] = set()
    contract_scenario: ClassVar[str] = "shapes-2+2"
    input_channels: ClassVar[int | None] = 3

    def __init__(self, backbone: nn.Module | None, num_classes: int, cfg=None, aux: Sequence[nn.Module] = (), seed: int = 0):
        pl.LightningModule.__init__(self)  # CLStrategy's own __init__ builds a classification head
        self.cfg = cfg if cfg is not None else self.Config()
        self.init_loop_state(num_classes, aux, seed)
        self.detector = self.build_detector(num_classes)

    @classmethod
    def model_name(cls, cfg) -> str:
        """The name results record for the detector `cfg` builds (`r50_fpn_gfl`,
        `deformable_detr_r50`, ...); the family bases override it."""
        return cls.detector_name

    @classmethod
    def run_flag_settings(cls, cfg, pretrained: bool, weights: str | None, download: bool) -> dict:
        """The Config fields the run flags `--pretrained`, `--weights FILE` and `--download` stand
        for with this family's detector (empty: the flags do not apply); see `DetectionTask.build_model`."""
        return {}

    @classmethod
    def model_weights(cls, cfg) -> list[str]:
        """The local pretrained-weight files the detector `cfg` builds will read, fetched first where
        `cfg` allows a download (`--download`, `clbench download`). The runner calls it before any
        data is read, so a missing file stops the run at once with one line naming it; the family
        bases override it (none here: a detector without pretrained weights)."""
        return []

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
    def detect(self, x: torch.Tensor, seen: Sequence[int], image_sizes: torch.Tensor | None = None) -> list[dict[str, torch.Tensor]]:
        """`predict_detections` with outputs of unseen classes dropped (methods also mask the
        logits of unseen classes before post-processing; this guarantees it for every method).
        `image_sizes` (`[B, 2]` height, width): each image's valid area of a padded `x`; boxes
        come back in the pixels of that image, inside its valid area."""
        seen_t = torch.as_tensor(list(seen), dtype=torch.long, device=x.device)
        out = []
        with padded_batch(x, image_sizes):
            found = self.predict_detections(x)
        for p in found:
            keep = torch.isin(p["labels"].long(), seen_t)
            out.append({k: v[keep] for k, v in p.items()})
        return out

    def predict(self, x: torch.Tensor):
        return self.predict_detections(x)

    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        raise TypeError(f"{type(self).__name__} is a detection strategy: use detect(), not predict_logits()")

    def step_losses(self, batch: DetectionBatch) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def total_loss(self, batch: DetectionBatch, batch_idx: int) -> torch.Tensor:
        # the batch's valid sizes reach detector calls that only get `batch.x` (padding module)
        with padded_batch(batch.x, getattr(batch, "image_sizes", None)):
            return super().total_loss(batch, batch_idx)

    def frozen_copy(self, **more: nn.Module) -> nn.Module:
        """A teacher snapshot of the detector (and of `more` modules), eval mode, gradients off."""
        return frozen_snapshot({"detector": self.detector, **more})
