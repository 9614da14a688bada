"""APER, "AdaPt and mERge" (Zhou et al., IJCV 2024, arXiv 2303.07338), with an AdaptFormer adapter.

1. First task only: an AdaptFormer adapter in every block of the frozen pre-trained ViT
   (`clbench.adapters`, bottleneck 64) is tuned with cross-entropy over the first task's
   classes, through a linear head used for this alone. PILOT's recipe: SGD lr 0.01,
   momentum 0.9, weight decay 5e-4, batch 48, 20 epochs, cosine schedule.
2. Then the adapter is frozen for good (as is that head).
3. Every image is embedded twice, by the pre-trained model and by the adapted one:
   phi(x) = [f_PTM(x); f_adapted(x)], 2d wide.
4. The classifier is SimpleCIL's over phi: cosine similarity to per-class prototypes, each the
   mean embedding of its class's training images (evaluation preprocessing, eval mode),
   computed once, in the class's own task.

Only the adapter variant is implemented (the paper's VPT, SSF and full fine-tuning variants are
not). The run needs a timm ViT backbone (`clbench_vit_tiny` on `digits32-*`;
`vit_base_patch16_224.augreg_in21k --pretrained` for the published benchmarks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from clbench.adapters import AdapterRouter, AdapterSet
from clbench.base import CLStrategy
from clbench.config import StrategyConfig
from clbench.registry import register_strategy
from clbench.strategies.simplecil import SimpleCIL
from clbench.types import Batch, ExperienceInfo, Phase


@dataclass(frozen=True)
class APERConfig(StrategyConfig):
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_schedule: str = "cosine"
    bottleneck: int = 64
    adapter_dropout: float = 0.1


@register_strategy("aper")
class APER(SimpleCIL):
    """Adapter tuned on the first task, then frozen; cosine prototypes over [pre-trained; adapted] features."""

    Config = APERConfig
    learns_by_gradient: ClassVar[bool] = True
    contract_scenario = "digits32-5"
    contract_backbone = "clbench_vit_tiny"
    contract_overrides = {"bottleneck": 8}
    PAPER_SETTINGS = {
        name: {"epochs": 20, "batch_size": 48, "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4,
               "lr_schedule": "cosine", "bottleneck": 64}
        for name in ("imagenet-r-10", "cifar100-10")  # PILOT's IN-R B0Inc20 and CIFAR B0Inc10
    }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.adapter_set = AdapterSet.for_vit(self.backbone, self.cfg.bottleneck, dropout=self.cfg.adapter_dropout)
        self.router = AdapterRouter(self.backbone)
        self.first_task_head: nn.Linear | None = None
        self.register_buffer("first_task_label", torch.full((self.num_classes,), -1, dtype=torch.long))

    def embedding_width(self) -> int:
        return 2 * self.backbone.num_features

    # ---- 1. the first task tunes the adapter through its own head
    def on_experience_start(self, exp: ExperienceInfo) -> None:
        super().on_experience_start(exp)
        if exp.is_first:
            self.first_task_head = nn.Linear(self.backbone.num_features, len(exp.classes))
            self.first_task_label[list(exp.classes)] = torch.arange(len(exp.classes))

    def phases(self, exp: ExperienceInfo) -> list[Phase]:
        prototypes = super().phases(exp)
        return ([Phase("adapt")] + prototypes) if exp.is_first else prototypes

    def step_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        with self.router.using(self.adapter_set):
            features = self.backbone(batch.x)
        return {"ce": F.cross_entropy(self.first_task_head(features), self.first_task_label[batch.y])}

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
            for p in [*self.adapter_set.parameters(), *self.first_task_head.parameters()]:
                p.requires_grad_(False)

    # ---- 3. phi(x) = [f_PTM(x); f_adapted(x)], the embedding SimpleCIL's prototypes and cosine use
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        was_training = self.backbone.training
        self.backbone.eval(), self.adapter_set.eval()
        try:
            with torch.no_grad():
                plain = self.backbone(x)
                with self.router.using(self.adapter_set):
                    adapted = self.backbone(x)
            return torch.cat([plain, adapted], dim=1)
        finally:
            self.backbone.train(was_training), self.adapter_set.train(was_training)
