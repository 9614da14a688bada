"""APER, "AdaPt and mERge" (Zhou et al., IJCV 2024, arXiv 2303.07338), with an AdaptFormer adapter.

1. First task only: an AdaptFormer adapter in every block of the frozen pre-trained ViT
   (`clbench.models.adapters`, bottleneck 64) is tuned with cross-entropy over the first task's
   classes, through a linear head used for this alone. PILOT's recipe: SGD lr 0.01,
   momentum 0.9, weight decay 5e-4, batch 48, 20 epochs, cosine schedule.
2. Then the adapter is frozen for good and that head, which served the tuning only, dropped.
3. Every image is embedded twice, by the pre-trained model and by the adapted one:
   phi(x) = [f_PTM(x); f_adapted(x)], 2d wide.
4. The classifier is SimpleCIL's over phi: cosine similarity to per-class prototypes, each the
   mean embedding of its class's training images (evaluation preprocessing, eval mode),
   computed once, in the class's own task. The prototypes (classes x 2d) are counted by the
   profiler in `total_params` (SimpleCIL's `stored_state`).

Only the adapter variant is implemented (the paper's VPT, SSF and full fine-tuning variants are
not). The run needs a timm ViT backbone (`clbench_vit_tiny` on `digits32-*`;
`vit_base_patch16_224.augreg_in21k --pretrained` for the published benchmarks).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from clbench.strategies.simplecil import SimpleCIL

from clbench.base import CLStrategy
from clbench.strategies._ptm import EASE_TABLE, MOS_TABLE
from clbench.models.adapters import AdapterTuningConfig, FirstTaskAdaptation
from clbench.models.backbones import PILOT_VIT_B16_IN21K, ptm_defaults
from clbench.registry import register_strategy
from clbench.types import Batch, ExperienceInfo, Phase


@register_strategy("aper")
class APER(SimpleCIL):
    """Adapter tuned on the first task, then frozen; cosine prototypes over [pre-trained; adapted] features."""

    Config = AdapterTuningConfig
    DEFAULTS = ptm_defaults(PILOT_VIT_B16_IN21K)  # PILOT's ViT-B/16-IN21K, 224 px, no normalisation; tiny ViT on tiny data
    learns_by_gradient: ClassVar[bool] = True
    contract_scenario = "digits32-5"
    contract_backbone = "clbench_vit_tiny"
    needs_vit_backbone = True
    contract_overrides = {"bottleneck": 8}
    PAPER_SETTINGS = {  # PILOT's adapter recipe; class order numpy seed 1993; one GPU
        name: {"class_order": "paper", "epochs": 20, "batch_size": 48, "global_batch_size": 48, "optimizer": "sgd",
               "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "lr_schedule": "cosine", "bottleneck": 64}
        # PILOT's IN-R B0Inc20 and CIFAR B0Inc10, and the CIFAR B0Inc5 split of the EASE table (APER's own logs)
        for name in ("imagenet-r-10", "cifar100-10", "cifar100-20")
    }
    PUBLISHED = {
        "cifar100-20": {"metric": "final_avg_acc", "value": 0.8515, "source": f"{EASE_TABLE} (APER+Adapter)"},
        "imagenet-r-10": {"metric": "final_avg_acc", "value": 0.6795, "source": f"{MOS_TABLE} (APER+Adapter)"},
    }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.adaptation = FirstTaskAdaptation(self.backbone, self.num_classes, self.cfg.bottleneck, self.cfg.adapter_dropout)

    def embedding_width(self) -> int:
        return 2 * self.backbone.num_features

    # ---- 1. the first task tunes the adapter through its own head
    def on_experience_start(self, exp: ExperienceInfo) -> None:
        super().on_experience_start(exp)
        self.adaptation.start(exp)

    def phases(self, exp: ExperienceInfo) -> list[Phase]:
        prototypes = super().phases(exp)
        return ([Phase("adapt")] + prototypes) if exp.is_first else prototypes

    def step_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {"ce": self.adaptation.loss(batch.x, batch.y)}

    def training_step(self, batch: Batch, batch_idx: int):
        if self.phase.name == "adapt":
            return CLStrategy.training_step(self, batch, batch_idx)
        return super().training_step(batch, batch_idx)  # accumulate prototypes

    def configure_optimizers(self):
        return CLStrategy.configure_optimizers(self) if self.phase.name == "adapt" else None

    # ---- 2. then adapter and head are frozen
    def on_experience_end(self, exp: ExperienceInfo, train_set) -> None:
        super().on_experience_end(exp, train_set)
        if exp.is_first:
            self.adaptation.freeze()

    # ---- 3. phi(x) = [f_PTM(x); f_adapted(x)], the embedding SimpleCIL's prototypes and cosine use
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.adaptation.features(x, adapted=False), self.adaptation.features(x)], dim=1)
