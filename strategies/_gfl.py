"""`GFLStrategy`: the family base of the GFL detectors (IOR, ERD, fine-tuning).

The detector is the Config's `detector`: "tiny" (TinyGFL, the CPU default and the `shapes-*`
detector) or "r50_fpn" (GFL R50-FPN, the IOR and ERD papers' detector, what `--paper-settings`
gives on the COCO splits; `clbench.models.detection.gfl.GFLResNet50FPN`). The optimisation step
adds to `CLStrategy`'s what the papers' mmdetection 1x schedule needs: gradient accumulation
(`accumulate_grad_batches`: 2 images x 8 batches per step stand for 8 GPUs x 2 images) and a
linear warm-up (`warmup_iters` optimiser steps from `warmup_ratio` x lr, every task).
"""

from __future__ import annotations

import torch
from clbench.strategies._detection import DetectionStrategy
from torch import nn

from clbench.datasets import DetectionBatch
from clbench.models.detection.gfl import GFLConfig, build_gfl, hflip_batch
from clbench.models.detection.padding import valid_sizes_for
from clbench.types import ExperienceInfo


# --------------------------------------------------------------------------- strategy base
class GFLStrategy(DetectionStrategy):
    """A detection strategy on a GFL detector (TinyGFL or GFL R50-FPN): the classifier covers the
    seen classes and grows at the start of every task (old rows kept); inference masks unseen
    classes' logits."""

    Config = GFLConfig
    detector_name = "tiny_gfl"  # the default detector's name; results record `model_name(cfg)`
    MODEL_NAMES = {"tiny": "tiny_gfl", "r50_fpn": "r50_fpn_gfl"}

    @classmethod
    def model_name(cls, cfg) -> str:
        return cls.MODEL_NAMES.get(getattr(cfg, "detector", "tiny"), cls.detector_name)

    @classmethod
    def run_flag_settings(cls, cfg, pretrained: bool, weights: str | None, download: bool) -> dict:
        """`--weights FILE` -> `backbone_weights=FILE` (a torchvision ResNet-50 state_dict);
        `--pretrained` -> `backbone_weights=imagenet` where the Config says `none` (a file or
        imagenet already named stays); `--download` -> `download_weights=true` (the ImageNet file
        is fetched into torch.hub's cache only then). Only GFL R50-FPN has pretrained weights:
        with the tiny detector the flags are refused."""
        if not (pretrained or weights or download):
            return {}
        if cfg.detector != "r50_fpn":
            if pretrained or weights:
                from clbench.errors import UsageError

                raise UsageError(f"--pretrained/--weights apply to the GFL R50-FPN detector; detector={cfg.detector!r} "
                                 f"(TinyGFL) has no pretrained weights; expected --set detector=r50_fpn (or --paper-settings "
                                 f"on a COCO split)")
            return {}
        out: dict = {}
        if weights:
            out["backbone_weights"] = weights
        elif pretrained and cfg.backbone_weights == "none":
            out["backbone_weights"] = "imagenet"
        if download:
            out["download_weights"] = True
        return out

    @classmethod
    def model_weights(cls, cfg) -> list[str]:
        """GFL R50-FPN's backbone file (`backbone_weights`: torch.hub's ImageNet copy or a given file);
        TinyGFL reads none."""
        if cfg.detector != "r50_fpn":
            return []
        from clbench.models.detection.resnet_fpn import backbone_weights_file

        path = backbone_weights_file(cfg.backbone_weights, cfg.download_weights)
        return [] if path is None else [str(path)]

    def build_detector(self, num_classes: int) -> nn.Module:
        # the class conv starts empty and grows with the seen classes
        return build_gfl(0, self.cfg)

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
        n = self.cfg.inference_batch or len(x)
        sizes = valid_sizes_for(x)  # a padded batch's valid sizes (set by `detect`), None if unpadded
        return [d for i in range(0, len(x), n)
                for d in self.detector.detect(x[i:i + n], classes=seen, image_sizes=None if sizes is None else sizes[i:i + n])]

    # ----------------------------------------------------------- optimisation
    def training_step(self, batch: DetectionBatch, batch_idx: int) -> torch.Tensor:
        """`CLStrategy.training_step` with gradient accumulation and warm-up: the gradients of
        `accumulate_grad_batches` consecutive batches (a shorter group at the end of an epoch) are
        averaged into one optimiser step."""
        k = self.cfg.accumulate_grad_batches
        if k == 1 and self.cfg.warmup_iters == 0:
            return super().training_step(batch, batch_idx)
        total = self.total_loss(batch, batch_idx)
        optimizer = self.optimizers()
        n = self.trainer.num_training_batches if self._trainer is not None else float("inf")
        first = batch_idx - batch_idx % k
        group = int(min(k, n - first))
        if batch_idx == first:
            optimizer.zero_grad()
        self.manual_backward(total / group)
        if batch_idx + 1 == first + group:
            self._warm_up(optimizer)
            optimizer.step()
        return total.detach()

    def _warm_up(self, optimizer) -> None:
        """mmdetection's linear warm-up: at optimiser step i < warmup_iters of a fit, every group's
        scheduled rate times `r + (1 - r) i / warmup_iters` (r = warmup_ratio); the scheduled rate
        from then on."""
        cfg = self.cfg
        if cfg.warmup_iters == 0:
            return
        step = self.trainer.global_step if self._trainer is not None else cfg.warmup_iters
        if step > cfg.warmup_iters:
            return
        factor = 1.0 if step == cfg.warmup_iters else cfg.warmup_ratio + (1 - cfg.warmup_ratio) * step / cfg.warmup_iters
        passed = sum(1 for m in getattr(cfg, "lr_milestones", ()) if self.current_epoch >= m) \
            if getattr(cfg, "lr_schedule", "constant") == "multistep" else 0
        for g in optimizer.param_groups:
            base = g.setdefault("initial_lr", g["lr"])
            g["lr"] = base * cfg.lr_step_gamma**passed * factor
