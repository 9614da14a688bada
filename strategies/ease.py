"""EASE, "Expandable Subspace Ensemble" (Zhou et al., CVPR 2024; code sun-hailong/CVPR24-EASE, also in LAMDA-PILOT).

1. Every task trains a NEW AdaptFormer adapter set (`clbench.models.adapters`, bottleneck 64, every
   block) in the frozen pre-trained ViT, with cross-entropy over the task's classes through a
   head of its own; earlier adapters stay frozen. Subspace i is the ViT's [CLS] embedding with
   adapter i: phi_i(x). PILOT/official recipe: SGD lr 0.025, momentum 0.9, weight decay 5e-4,
   batch 48, 20 epochs per task, cosine schedule.
2. After training, one pass over the task's data (evaluation preprocessing, eval mode, no
   gradient) gives every new class c a prototype in every subspace so far:
   P_c^s = mean of phi_s(x) over its training images, s = 0..t.
3. Old classes have no data in the new subspace. An old class i of task k gets
   P_i^s = sum_j w_ij P_j^s,  w_ij = softmax_j( cos(P_i^k, P_j^k) ),
   j running over classes that have data prototypes in subspace s, the similarities measured in
   the old class's own subspace k.
4. Inference: the logit of class c learned in task i is
   cos(phi_i(x), P_c^i) + (alpha / n) sum_{s != i} cos(phi_s(x), P_c^s),  alpha = 0.1.

Details reconstructed from the released code (LAMDA-PILOT `models/ease.py`, `utils/inc_net.py`,
`backbone/linears.py`, `backbone/vit_ease.py`, `exps/ease*.json`; the official repo has the same
learner), where the paper leaves them open:
- The old subspace is the old class's own task's subspace k (above).
- `recalc_similarity=True` (the released configs' `recalc_sim`): after every task, each old
  task k's prototypes in every later subspace s (k < s <= t) are recomputed with j over all
  classes of tasks s..t. False (`solve_similarity`): only the newest subspace is filled, with
  j over the current task's classes; entries made in earlier tasks are kept.
- The cosine has no temperature or scale: softmax of the plain cosines, over j (dim 1).
- A class's prototype in its own subspace, and in every earlier one, is its data mean, never
  synthesised; only subspaces newer than the class are complemented.
- The reweighting divides alpha by the 0-based index of the latest task, i.e. by the number of
  OTHER subspaces (t - 1 with t tasks so far), not by t: `alpha_divisor="others"` (default).
  `alpha_divisor="tasks"` divides by t, as the paper's formula reads. After the first task there is
  one subspace and no off-diagonal term.
- The training head is a cosine classifier over the task's classes with a learnable scale
  initialised to 1 (the code's `EaseCosineLinear` proxy head), trained with the adapter (weight
  decay on both); it is discarded after the task. A new adapter starts from AdaptFormer's init
  (W_down Kaiming-uniform, W_up and biases zero), not from the previous task's adapter.
- The inference classifier's own scale (sigma, never trained, 1) is left out: logits are the
  weighted cosines.
Not implemented: the released code's ablation switches `use_init_ptm`/`beta` (an extra
subspace of the plain PTM; off in the released configs), `use_diagonal`, `use_old_data` and
`moni_adam`.

clbench mechanics: finished adapters are kept as flat vectors (`task_adapter_vectors`, one row
per task, never written again) and run through an evaluation adapter set; prototypes are a
`subspaces x classes x d` buffer. Both grow by one row per task and take the saved shape when a
checkpoint is loaded, so `--resume` works; the profiler counts both in `total_params`
(`stored_state`). The prototype pass runs as Lightning steps (profiled as training cost);
inference costs one ViT forward per subspace.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from clbench.base import CLStrategy
from clbench.strategies._ptm import EASE_TABLE, MOS_TABLE
from clbench.config import non_negative_numbers
from clbench.errors import UsageError
from clbench.models.adapters import AdapterRouter, AdapterSet, AdapterTuningConfig
from clbench.models.backbones import PILOT_VIT_B16_IN21K, ptm_defaults
from clbench.models.freeze import eval_mode
from clbench.models.heads import CosineLinear
from clbench.models.prototypes import ClassMeans
from clbench.registry import register_strategy
from clbench.types import Batch, ExperienceInfo, Output, Phase

ALPHA_DIVISORS = ("others", "tasks")
# the released configs: CIFAR B0Inc5 (exps/ease.json) and ImageNet-R B0Inc20 (exps/ease_inr.json)
_CIFAR = {"class_order": "paper", "epochs": 20, "batch_size": 48, "global_batch_size": 48, "optimizer": "sgd", "lr": 0.025, "momentum": 0.9, "weight_decay": 5e-4, "lr_schedule": "cosine",
          "bottleneck": 64, "alpha": 0.1}


@dataclass(frozen=True)
class EASEConfig(AdapterTuningConfig):
    """PILOT/official EASE recipe: SGD lr 0.025, momentum 0.9, weight decay 5e-4, cosine; bottleneck 64; alpha 0.1."""

    lr: float = 0.025
    alpha: float = 0.1
    alpha_divisor: str = "others"  # "others": the released code's alpha/(t-1); "tasks": alpha/t
    recalc_similarity: bool = True  # the released configs' recalc_sim

    def __post_init__(self):
        super().__post_init__()
        non_negative_numbers(self, "alpha")
        if self.alpha_divisor not in ALPHA_DIVISORS:
            raise UsageError(f"alpha_divisor={self.alpha_divisor!r} is invalid; expected one of: {', '.join(ALPHA_DIVISORS)}")


def transferred_prototypes(old_own: torch.Tensor, new_own: torch.Tensor, new_target: torch.Tensor) -> torch.Tensor:
    """Old classes' prototypes in a subspace where they have no data: row i is sum_j w_ij new_target[j],
    w_ij = softmax_j(cos(old_own[i], new_own[j])), both measured in the old classes' own subspace."""
    weights = torch.softmax(F.normalize(old_own, dim=1) @ F.normalize(new_own, dim=1).T, dim=1)
    return weights @ new_target


def complemented(prototypes: torch.Tensor, class_task: torch.Tensor, current: int, recalc: bool = True) -> torch.Tensor:
    """`prototypes` (subspaces x classes x d) with every old class's rows in subspaces newer than its
    task filled by `transferred_prototypes`; `class_task[c]` is class c's task (-1: not seen)."""
    out = prototypes.clone()
    for k in range(current):
        old = (class_task == k).nonzero().squeeze(1)
        for s in range(k + 1, current + 1) if recalc else [current]:
            new = (class_task >= s).nonzero().squeeze(1)  # classes with data prototypes in subspace s
            out[s, old] = transferred_prototypes(prototypes[k, old], prototypes[k, new], prototypes[s, new])
    return out


def ensemble_logits(features: Sequence[torch.Tensor], prototypes: torch.Tensor, class_task: torch.Tensor,
                    alpha: float, divisor: str = "others") -> torch.Tensor:
    """logit_c = cos(phi_i(x), P_c^i) + (alpha / n) sum_{s != i} cos(phi_s(x), P_c^s), i = class_task[c];
    n = subspaces - 1 ("others", the released code) or subspaces ("tasks")."""
    n_sub = len(features)
    cosines = torch.stack([F.normalize(f, dim=1) @ F.normalize(prototypes[s].to(f.dtype), dim=1).T
                           for s, f in enumerate(features)])  # subspaces x batch x classes
    n = max(n_sub - 1, 1) if divisor == "others" else n_sub
    own = class_task.unsqueeze(0) == torch.arange(n_sub, device=class_task.device).unsqueeze(1)  # subspaces x classes
    weight = torch.where(own, torch.ones((), dtype=cosines.dtype, device=cosines.device),
                         torch.full((), alpha / n, dtype=cosines.dtype, device=cosines.device))
    return (weight.unsqueeze(1) * cosines).sum(0)


@register_strategy("ease")
class EASE(CLStrategy):
    """A new adapter (subspace) per task; prototypes in every subspace, old classes' complemented by similarity; weighted cosine ensemble."""

    Config = EASEConfig
    DEFAULTS = ptm_defaults(PILOT_VIT_B16_IN21K)  # PILOT's ViT-B/16-IN21K, 224 px, no normalisation; tiny ViT on tiny data
    contract_scenario = "digits32-5"
    contract_backbone = "clbench_vit_tiny"
    needs_vit_backbone = True
    contract_overrides = {"bottleneck": 8}
    PAPER_SETTINGS = {
        "cifar100-20": dict(_CIFAR),  # CIFAR B0Inc5, the paper's Table 1 split
        "imagenet-r-10": {**_CIFAR, "lr": 0.05, "batch_size": 16, "global_batch_size": 16, "weight_decay": 0.005},  # IN-R B0Inc20
    }
    PUBLISHED = {
        "cifar100-20": {"metric": "final_avg_acc", "value": 0.8580, "source": EASE_TABLE},
        "imagenet-r-10": {"metric": "final_avg_acc", "value": 0.7617, "source": MOS_TABLE},
    }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.backbone.requires_grad_(False)
        self.router = AdapterRouter(self.backbone)
        self.adapter = self.new_adapter()  # the adapter of the task in training
        self.expert = self.new_adapter().requires_grad_(False)  # runs a finished task's adapter
        d, n_params = self.backbone.num_features, parameters_to_vector(self.adapter.parameters()).numel()
        self.register_buffer("task_adapter_vectors", torch.zeros(0, n_params))  # one row per finished task
        self.register_buffer("prototypes", torch.zeros(0, self.num_classes, d))  # subspaces x classes x d
        self.register_buffer("class_task", torch.full((self.num_classes,), -1, dtype=torch.long))
        self.register_buffer("task_position", torch.full((self.num_classes,), -1, dtype=torch.long), persistent=False)
        self.task_head: CosineLinear | None = None
        self._pass_means: list[ClassMeans] = []

    def make_head(self, in_features: int):
        return torch.nn.Identity()  # the prototypes are the classifier

    def new_adapter(self) -> AdapterSet:
        return AdapterSet.for_vit(self.backbone, self.cfg.bottleneck, dropout=self.cfg.adapter_dropout)

    @property
    def num_subspaces(self) -> int:
        return len(self.task_adapter_vectors)

    def stored_state(self) -> list[torch.Tensor]:
        """The finished tasks' adapters and the prototypes (subspaces x classes x d), the classifier:
        inference runs every one of them, so the profiler counts them in `total_params` and
        `stored_state_bytes` like the model's parameters."""
        stored = [self.task_adapter_vectors, self.prototypes] if self.num_subspaces else []
        return [*super().stored_state(), *stored]

    # ---- subspaces: the frozen ViT with one task's adapter
    @torch.no_grad()
    def load_expert(self, s: int) -> AdapterSet:
        """The evaluation adapter set holding task s's adapter (a copy: no storage is shared with the vectors)."""
        vector_to_parameters(self.task_adapter_vectors[s].clone(), list(self.expert.parameters()))
        return self.expert

    def subspace_features(self, x: torch.Tensor, s: int) -> torch.Tensor:
        """phi_s(x) in eval mode without gradients; s == num_subspaces is the adapter in training."""
        adapters = self.adapter if s == self.num_subspaces else self.load_expert(s)
        with eval_mode(self.backbone, adapters), torch.no_grad(), self.router.using(adapters):
            return self.backbone(x)

    # ---- 1. a new adapter and a head over the task's classes
    def on_experience_start(self, exp: ExperienceInfo) -> None:
        super().on_experience_start(exp)
        if not exp.is_first:
            self.adapter = self.new_adapter().to(self.task_position.device)
        self.task_position.fill_(-1)
        self.task_position[list(exp.classes)] = torch.arange(len(exp.classes), device=self.task_position.device)
        self._pass_means = []

    def phases(self, exp: ExperienceInfo) -> list[Phase]:
        return [Phase("train"), Phase("prototypes", epochs=1)]

    def setup(self, stage: str) -> None:
        # the head lives for the train fit only, so finished tasks' state has none (and resumes without one)
        if self.phase.name == "train":
            self.task_head = CosineLinear(self.backbone.num_features, len(self.experience.classes), scale=1.0)

    def on_fit_end(self) -> None:
        super().on_fit_end()
        self.task_head = None

    def step_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        with self.router.using(self.adapter):
            features = self.backbone(batch.x)
        return {"ce": F.cross_entropy(self.task_head(features), self.task_position[batch.y])}

    def configure_optimizers(self):
        return super().configure_optimizers() if self.phase.name == "train" else None

    # ---- 2. prototypes of the new classes in every subspace, from the task's data
    def training_step(self, batch: Batch, batch_idx: int):
        if self.phase.name != "prototypes":
            return super().training_step(batch, batch_idx)
        if not self._pass_means:
            d = self.backbone.num_features
            self._pass_means = [ClassMeans(self.num_classes, d).to(batch.x.device) for _ in range(self.num_subspaces + 1)]
        for s, means in enumerate(self._pass_means):
            means.add(self.subspace_features(batch.x, s), batch.y)
        return None

    # ---- 3. freeze the adapter, store it, complement the old classes' prototypes
    def on_experience_end(self, exp: ExperienceInfo, train_set) -> None:
        super().on_experience_end(exp, train_set)
        self.task_head = None
        self.adapter.requires_grad_(False)
        vector = parameters_to_vector(self.adapter.parameters()).detach().unsqueeze(0)
        self.task_adapter_vectors = torch.cat([self.task_adapter_vectors, vector.to(self.task_adapter_vectors)])
        new = list(exp.classes)
        prototypes = torch.cat([self.prototypes, self.prototypes.new_zeros(1, *self.prototypes.shape[1:])])
        for s, means in enumerate(self._pass_means):
            prototypes[s, new] = means.means[new].to(prototypes)
        self.class_task[new] = exp.index
        self.prototypes = complemented(prototypes, self.class_task, exp.index, self.cfg.recalc_similarity)
        self._pass_means = []

    # ---- 4. inference: the weighted cosine ensemble over all subspaces
    def forward(self, x: torch.Tensor) -> Output:
        if self.num_subspaces == 0:  # before the first task ends
            return Output(x.new_zeros(len(x), self.num_classes))
        features = [self.subspace_features(x, s) for s in range(self.num_subspaces)]
        logits = ensemble_logits(features, self.prototypes, self.class_task, self.cfg.alpha, self.cfg.alpha_divisor)
        return Output(logits, torch.cat(features, dim=1))

    def report(self) -> dict:
        return {**super().report(), "subspaces": self.num_subspaces}
