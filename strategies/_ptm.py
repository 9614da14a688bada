"""Mechanics shared by the TUNA family of pre-trained-model methods (TUNA, DAF, SAEF, SGDS).

- `cosface_loss`: TUNA's training loss on the logits of the current task's classes,
  L = -log( e^{s(z_y - m)} / (e^{s(z_y - m)} + sum_{k in C_t, k != y} e^{s z_k}) ), the z being
  the cosines of a `CosineLinear(scale=None)` head (TUNA's bias-free head normalises both sides).
- `ClassGaussians`: per-class mean and covariance (+ 1e-4 I) of features, measured once,
  in the class's own task, and Gaussian samples of them for classifier alignment.
- `alignment_labels`: the label schedule of one classifier-alignment epoch (a fixed number
  of samples per seen class); the features are drawn inside the steps, fresh every epoch.
- `TunaStrategy`: the train / statistics / alignment pipeline around one adapter set, which
  DAF and SGDS extend with their own phases and losses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from clbench.base import CLStrategy
from clbench.config import (
    non_negative_integers,
    non_negative_numbers,
    positive_integers,
    positive_numbers,
)
from clbench.datasets import InMemoryDataset
from clbench.models.adapters import AdapterRouter, AdapterSet, AdapterTuningConfig
from clbench.models.freeze import eval_mode
from clbench.models.heads import CosineLinear
from clbench.models.prototypes import ClassGaussians, ClassMeans, cosface_loss
from clbench.types import Batch, ExperienceInfo, Output, Phase


def alignment_labels(classes: Sequence[int], per_class: int) -> InMemoryDataset:
    """`per_class` entries of every class (the inputs are placeholders: steps draw the features)."""
    y = torch.as_tensor(list(classes), dtype=torch.long).repeat_interleave(per_class)
    return InMemoryDataset(torch.zeros(len(y), 1), y)


# TUNA's released training values, which DAF, SAEF and SGDS take as their reconstructed settings: CIFAR-100 B0Inc5 and ImageNet-R B0Inc20; classifier alignment draws 5 x batch samples per class
# and trains at ca_lr 0.005
# where the PILOT-family baselines' published numbers are (the method notes' sources)
EASE_TABLE = "EASE paper (Zhou et al., CVPR 2024), Table 1, CIFAR-100 B0Inc5, ViT-B/16-IN21K"
MOS_TABLE = "MOS paper (Sun et al.), Table 1, ImageNet-R B0Inc20, ViT-B/16-IN21K"

# (PILOT's class order: numpy seed 1993; one GPU; SGD momentum 0.9, weight decay 5e-4, cosine; alignment 30 epochs)
_TUNA_COMMON = {"class_order": "paper", "optimizer": "sgd", "momentum": 0.9, "weight_decay": 5e-4, "lr_schedule": "cosine",
                "align_epochs": 30}
TUNA_PAPER_SETTINGS = {
    "cifar100-20": {**_TUNA_COMMON, "epochs": 15, "lr": 0.01, "batch_size": 16, "global_batch_size": 16,
                    "align_per_class": 80, "align_lr": 0.005},
    "imagenet-r-10": {**_TUNA_COMMON, "epochs": 10, "lr": 0.02, "batch_size": 32, "global_batch_size": 32,
                      "align_per_class": 160, "align_lr": 0.005},
}


@dataclass(frozen=True)
class TunaConfig(AdapterTuningConfig):
    """TUNA's recipe: adapter bottleneck 16, scale s = 20, margin m, classifier alignment."""

    bottleneck: int = 16
    scale: float = 20.0
    margin: float = 0.0
    align_epochs: int = 30  # 0: no alignment
    align_per_class: int = 80  # TUNA: 5 x batch size
    align_lr: float = 0.01

    def __post_init__(self):
        super().__post_init__()
        positive_numbers(self, "scale", "align_lr")
        non_negative_numbers(self, "margin")
        non_negative_integers(self, "align_epochs")
        positive_integers(self, "align_per_class")


class TunaStrategy(CLStrategy):
    """The pipeline TUNA's family shares, around one adapter set in a frozen ViT:

    train (adapter + cosine head, CosFace-form loss on the current classes)
    -> the method's own phases (`method_phases`)
    -> statistics (class Gaussians of the new classes under the adapter, eval mode, no augmentation)
    -> alignment (t > 0: the head on fresh Gaussian samples of all seen classes, its own SGD
       with momentum 0.9, weight decay 5e-4, cosine schedule, `align_lr`).
    Inference: s * cosines of the head over the adapted [CLS] feature.
    """

    Config = TunaConfig
    contract_scenario = "digits32-5"
    contract_backbone = "clbench_vit_tiny"
    needs_vit_backbone = True
    # True: each task starts with a pass that measures the new classes' mean frozen-PTM [CLS]
    # feature (no adapter), for methods that decide from semantic similarity (SGDS, SAEF)
    measures_ptm_prototypes: ClassVar[bool] = False
    # True: the adapter as each task leaves it is kept (`task_adapters`), and `expert_prediction`
    # runs any stored or merged adapter vector (TUNA, SAEF)
    keeps_task_adapters: ClassVar[bool] = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.backbone.requires_grad_(False)
        self.adapter = AdapterSet.for_vit(self.backbone, self.cfg.bottleneck, dropout=self.cfg.adapter_dropout)
        self.router = AdapterRouter(self.backbone)
        self.gaussians = ClassGaussians(self.num_classes, self.backbone.num_features)
        self.alignment_generator = torch.Generator().manual_seed(self.seed + 29)
        if self.keeps_task_adapters:  # holds the adapter vector being evaluated
            self.expert = AdapterSet.for_vit(self.backbone, self.cfg.bottleneck, dropout=0.0).requires_grad_(False)
        if self.measures_ptm_prototypes:
            self.ptm_means = ClassMeans(self.num_classes, self.backbone.num_features)

    @property
    def prototypes(self) -> torch.Tensor:
        """Mean frozen-PTM [CLS] feature of every class measured so far (float64; zero rows otherwise)."""
        return self.ptm_means.means

    def make_head(self, in_features: int) -> CosineLinear:
        return CosineLinear(in_features, scale=None)  # cosine logits; the loss scales them by s

    def features(self, x: torch.Tensor, unit_mask: torch.Tensor | None = None) -> torch.Tensor:
        with self.router.using(self.adapter, unit_mask):
            return self.backbone(x)

    def forward(self, x: torch.Tensor) -> Output:
        f = self.features(x)
        return Output(self.cfg.scale * self.head(f), f)

    def eval_features(self, x: torch.Tensor) -> torch.Tensor:
        with eval_mode(self.backbone, self.adapter), torch.no_grad():
            return self.features(x)

    # ---- task adapters, kept once the number of tasks is known
    def on_experience_start(self, exp: ExperienceInfo) -> None:
        super().on_experience_start(exp)
        if self.keeps_task_adapters and exp.is_first:
            device = self.gaussians.mean.device
            dim = parameters_to_vector(self.adapter.parameters()).numel()
            self.register_buffer("task_adapter_vectors", torch.zeros(exp.num_experiences, dim, device=device))
            self.register_buffer("task_adapter_count", torch.zeros((), dtype=torch.long, device=device))

    def on_experience_end(self, exp: ExperienceInfo, train_set) -> None:
        super().on_experience_end(exp, train_set)
        if self.keeps_task_adapters:
            self.task_adapter_vectors[exp.index] = parameters_to_vector(self.adapter.parameters()).detach()
            self.task_adapter_count.fill_(exp.index + 1)

    @property
    def task_adapters(self) -> torch.Tensor:
        """The adapter vectors of the tasks finished so far (one row per task)."""
        if not hasattr(self, "task_adapter_count"):
            return torch.zeros(0)
        return self.task_adapter_vectors[: int(self.task_adapter_count)]

    def stored_state(self) -> list[torch.Tensor]:
        """The stored task adapters (one adapter's values per finished task), counted by the profiler."""
        adapters = self.task_adapters
        return [*super().stored_state(), *([adapters] if len(adapters) else [])]

    def load_expert(self, theta: torch.Tensor) -> None:
        """Put the adapter vector `theta` (a stored or merged adapter) into the evaluation adapter set."""
        vector_to_parameters(theta.to(self.expert.adapters[0].up_bias.dtype), list(self.expert.parameters()))

    def expert_prediction(self, theta: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """With the adapter vector `theta`: softmax of s times the head's cosines over all seen
        classes, and its entropy in nats (the same classes and scale for every adapter)."""
        self.load_expert(theta)
        with torch.no_grad(), self.router.using(self.expert):
            q = torch.softmax(self.cfg.scale * self.head(self.backbone(x)), dim=1)
        return q, -(q * torch.log(q.clamp_min(1e-12))).sum(1)

    # ---- the phases of a task
    def method_phases(self, exp: ExperienceInfo) -> list[Phase]:
        return []

    def phases(self, exp: ExperienceInfo) -> list[Phase]:
        phases = [Phase("prototypes", epochs=1)] if self.measures_ptm_prototypes else []
        phases += [Phase("train"), *self.method_phases(exp), Phase("statistics", epochs=1)]
        if not exp.is_first and self.cfg.align_epochs > 0:
            phases.append(Phase("align", epochs=self.cfg.align_epochs, batch_size=self.cfg.align_per_class,
                                extras={"augment": False}))
        return phases

    def phase_data(self, phase: Phase, data):
        if phase.name == "align":
            return alignment_labels(self.experience.seen_classes, self.cfg.align_per_class)
        return data

    def train_loss(self, batch: Batch) -> torch.Tensor:
        """CosFace-form loss of the current classes (methods that route samples override)."""
        logits = self.head(self.features(batch.x))
        return cosface_loss(logits, batch.y, self.experience.classes, self.cfg.scale, self.cfg.margin)

    def step_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        if self.phase.name == "align":
            sampled = self.gaussians.sample(batch.y, self.alignment_generator).to(self.device)
            return {"align": cosface_loss(self.head(sampled), batch.y, self.experience.seen_classes, self.cfg.scale)}
        return {"cosface": self.train_loss(batch)}

    def training_step(self, batch: Batch, batch_idx: int):
        if self.phase.name == "statistics":
            self.gaussians.add(self.eval_features(batch.x), batch.y)
            return None
        if self.phase.name == "prototypes":
            with eval_mode(self.backbone), torch.no_grad():
                self.ptm_means.add(self.backbone(batch.x), batch.y)  # no adapter: the pre-trained model's [CLS]
            return None
        return super().training_step(batch, batch_idx)

    def configure_optimizers(self):
        if self.phase.name == "train":
            return super().configure_optimizers()
        if self.phase.name == "align":
            head = torch.optim.SGD(self.head.parameters(), lr=self.cfg.align_lr, momentum=0.9, weight_decay=5e-4, foreach=True)
            return self.scheduled(head, "cosine")
        return None

    def on_fit_start(self) -> None:
        if self.phase.name == "align":
            self.gaussians.prepare_sampling()

    def on_fit_end(self) -> None:
        super().on_fit_end()
        if self.phase.name == "statistics":
            self.gaussians.finish()

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {**super().extra_state(), "alignment_generator": self.alignment_generator.get_state()}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        super().load_extra_state(state)
        self.alignment_generator.set_state(state["alignment_generator"])
