"""PrePrompt: predictive prompting for class-incremental learning (Huang et al., arXiv 2505.08586;
code github.com/libo-huang/preprompt, which this implementation follows where paper and code differ).

A frozen ViT classifies the image with its own unprompted [CLS] feature and a route head; the
predicted class gives the task whose prompt is used (no key-query matching); a second pass with
that task's prefix prompt feeds the label head. Old data being gone, the label head is
re-balanced after each task on old-class features synthesised by translating current-class
features onto the stored old-class means.

Per task t:
1. P_t <- P_{t-1} (t > 0); fresh optimisers.
2. Each minibatch updates the route head with CE of its logits on the unprompted feature, masked
   to the task's classes, and the prompts with the label head with CE on the prompted feature
   (masked the same way) through P~_t = (1 - m) P_t + m stopgrad(mean_{j<t} P_j) (m = 0.01, t > 0).
   Both are Adam steps with gradient norms clipped to 1.0; the route head and the label head
   learn at a tenth of the prompts' rate.
3. After the epochs (t > 0): P_t <- (1 - m) P_t + m mean_{j<t} P_j.
4. Class statistics with the true task's prompt (eval mode, no augmentation): mean and diagonal
   variance of each new class's features; the raw features of this task are kept until step 5.
5. Calibration (t > 0), the label head only: each old class c gets the cloud of its cosine-nearest
   current class j, shifted by mu_c - mu_j and labelled c; with the current classes' own features
   this is D. Each of `calibration_epochs` epochs shuffles D and runs n_old minibatches (n_old =
   old classes) of 5 x 24 = 120 samples (|D| / n_old when D is smaller), CE masked to the seen
   classes, SGD momentum 0.9 with a cosine schedule.
Inference: route head on the unprompted feature (masked to the seen classes) -> predicted
class -> its task's prompt (no momentum mix) -> label head, masked to the seen classes (the
official evaluation does not mask classes not yet seen; clbench evaluates by the standard CIL
protocol). Two backbone passes per image, both counted by the profiler.

Schedules: the prompt/label step follows `lr_schedule`, by default the official scripts' step
decay (x0.1 every 30 epochs; cosine on ImageNet-R, see PAPER_SETTINGS); the route head keeps its
rate; calibration is cosine.
Diagnostic: after each experience, the share of each seen test experience's samples
whose predicted task is their true one, in the result's `diagnostics`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from clbench.base import CLStrategy, EvaluationNotes
from clbench.config import (
    StrategyConfig,
    non_negative_integers,
    positive_integers,
    positive_numbers,
    unit_interval,
)
from clbench.datasets import InMemoryDataset
from clbench.errors import UsageError
from clbench.models.adapters import vit_blocks
from clbench.models.backbones import ORIG_VIT_B16_IN21K, ptm_defaults
from clbench.models.freeze import eval_mode
from clbench.models.prompts import PrefixRouter, mask_to
from clbench.registry import register_strategy
from clbench.types import Batch, ExperienceInfo, Output, Phase

OFFICIAL_LR_SCALE = 24 / 256  # the official scripts scale every lr by the per-device batch
# what the official scripts share: natural class order, 24 per GPU on 8 GPUs, Adam at 0.03 x 24/256 for the prompts
# (x 0.1 for the heads), weight decay 0, x0.1 every 30 epochs, prompts in blocks 0-4, m = 0.01, calibration 30 x 120
OFFICIAL = {"class_order": "natural", "batch_size": 24, "global_batch_size": 192, "optimizer": "adam",
            "lr": 0.03 * OFFICIAL_LR_SCALE, "weight_decay": 0.0, "head_lr_scale": 0.1, "lr_schedule": "step",
            "lr_step_epochs": 30, "lr_step_gamma": 0.1, "prompt_blocks": 5, "prompt_momentum": 0.01, "grad_clip": 1.0,
            "calibration_epochs": 30, "calibration_batch": 120}


@dataclass(frozen=True)
class PrePromptConfig(StrategyConfig):
    optimizer: str = "adam"
    lr: float = 0.03 * OFFICIAL_LR_SCALE  # the prompts'
    momentum: float = 0.9
    head_lr_scale: float = 0.1  # route and label heads learn at lr x 0.1
    # the label head's own scale (None: head_lr_scale); CUB's script puts it in the prompts' group (1.0)
    label_head_lr_scale: float | None = None
    prompt_length: int = 5
    prompt_blocks: int = 5
    prompt_momentum: float = 0.01  # m
    grad_clip: float = 1.0
    calibration_epochs: int = 30
    calibration_batch: int = 120  # 5 x 24
    calibration_lr: float = 0.01 * OFFICIAL_LR_SCALE  # ca_lr x 24/256
    # the official scripts' default for the prompt/label step (x0.1 every 30 epochs); ImageNet-R uses cosine
    lr_schedule: str = "step"

    def __post_init__(self):
        super().__post_init__()
        positive_integers(self, "prompt_length", "prompt_blocks", "calibration_batch")
        unit_interval(self, "prompt_momentum")
        positive_numbers(self, "grad_clip", "calibration_lr")  # a clip at 0 would zero every gradient
        non_negative_integers(self, "calibration_epochs")  # 0: no calibration
        scales = {"head_lr_scale": self.head_lr_scale, "label_head_lr_scale": self.label_head_lr_scale}
        for name, value in scales.items():
            if value is not None and not value > 0:
                raise UsageError(f"{name}={value} is invalid; expected a positive number")


def translated_features(old_means: torch.Tensor, current_means: torch.Tensor,
                        current_clouds: list[torch.Tensor]) -> list[torch.Tensor]:
    """For each old class: the cloud of its cosine-nearest current class, minus that class's mean,
    plus the old class's mean."""
    nearest = (F.normalize(old_means, dim=1) @ F.normalize(current_means, dim=1).T).argmax(1)
    return [current_clouds[j] - current_means[j] + old_means[c] for c, j in enumerate(nearest.tolist())]


class _CalibrationEpoch(InMemoryDataset):
    """Positions 0..n_old*batch-1 of D's per-epoch permutation; the steps fetch the features. The
    positions are integers: float32 holds whole numbers exactly only up to 2**24."""

    def __init__(self, size: int, batch_size: int):
        super().__init__(torch.arange(size, dtype=torch.long).unsqueeze(1), torch.zeros(size, dtype=torch.long))
        self.batch_size = batch_size


@register_strategy("preprompt")
class PrePrompt(CLStrategy):
    """Route head on the unprompted feature picks the task prompt; label head on the prompted feature; feature-translation calibration."""

    Config = PrePromptConfig
    # the original ViT-B/16-IN21K (ViT-B_16.npz), 224 px, mean = std = 0.5, natural class order
    DEFAULTS = ptm_defaults({**ORIG_VIT_B16_IN21K, "class_order": "natural"})
    contract_scenario = "digits32-5"
    contract_backbone = "clbench_vit_tiny"
    contract_overrides = {"prompt_length": 2, "prompt_blocks": 2, "calibration_epochs": 1, "calibration_batch": 16}
    needs_vit_backbone = True
    PAPER_SETTINGS = {  # the official scripts: 8 GPUs x 24 = a global batch of 192 (accumulated on fewer devices)
        "cifar100-10": {**OFFICIAL, "epochs": 50, "prompt_length": 5, "calibration_lr": 0.1432 * OFFICIAL_LR_SCALE},
        "imagenet-r-10": {**OFFICIAL, "epochs": 150, "prompt_length": 10, "lr_schedule": "cosine",
                          "calibration_lr": 0.003 * OFFICIAL_LR_SCALE},
        # CUB's script has one parameter group: the label head learns at the prompts' rate
        "cub-10": {**OFFICIAL, "epochs": 50, "prompt_length": 20, "calibration_lr": 0.01 * OFFICIAL_LR_SCALE,
                   "label_head_lr_scale": 1.0},
    }
    PUBLISHED = {  # A_last = mean of the per-task accuracies after the last task (HiDe-Prompt convention)
        name: {"metric": "final_avg_acc", "value": value,
               "source": f"official README results table (the paper's tables were not available), {what}, ViT-B/16-IN21K, A_last"}
        for name, value, what in (("cifar100-10", 0.9374, "CIFAR-100 10 tasks"), ("imagenet-r-10", 0.7509, "ImageNet-R 10 tasks"),
                                  ("cub-10", 0.8827, "CUB-200 10 tasks"))
    }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.backbone.requires_grad_(False)
        d = self.backbone.num_features
        depth = len(vit_blocks(self.backbone))
        if self.cfg.prompt_blocks > depth:  # the paper's 5 prompted blocks need a ViT at least that deep
            raise UsageError(f"prompt_blocks={self.cfg.prompt_blocks} is invalid for this backbone: it is more than the ViT's "
                             f"depth ({depth}); expected 1..{depth}, e.g. --set prompt_blocks={depth}")
        self.router = PrefixRouter(self.backbone, self.cfg.prompt_blocks)
        self.head = nn.Linear(d, self.num_classes)  # the label head
        self.route_head = nn.Linear(d, self.num_classes)
        self.register_buffer("task_of_class", torch.full((self.num_classes,), -1, dtype=torch.long))
        self.register_buffer("class_means", torch.zeros(self.num_classes, d))
        self.register_buffer("class_variances", torch.zeros(self.num_classes, d))
        self.prompts: nn.Parameter | None = None
        self.calibration_generator = torch.Generator().manual_seed(self.seed + 53)
        self._clouds: dict[int, list[torch.Tensor]] = {}
        self._calibration_set: tuple[torch.Tensor, torch.Tensor] | None = None
        self._order: torch.Tensor | None = None
        self.predicted_tasks = EvaluationNotes()  # tau_hat per sample, in the evaluation after each task

    def make_head(self, in_features: int) -> nn.Module:
        return nn.Identity()  # replaced by the label head once the class count is known

    def prepare_for_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.prompts is None and "prompts" in state:  # created by the first task (its size is the task count)
            self.prompts = nn.Parameter(torch.empty_like(state["prompts"], device=self.class_means.device))

    # ---- prompts: (blocks, key/value, task slot, length, heads, head_dim), U(-1, 1)
    def on_experience_start(self, exp: ExperienceInfo) -> None:
        super().on_experience_start(exp)
        if exp.is_first:
            shape = (self.cfg.prompt_blocks, 2, exp.num_experiences, self.cfg.prompt_length,
                     self.router.heads, self.router.head_dim)
            self.prompts = nn.Parameter(torch.empty(shape, device=self.class_means.device).uniform_(-1, 1))
        else:
            with torch.no_grad():  # 1. P_t <- P_{t-1}
                self.prompts[:, :, exp.index] = self.prompts[:, :, exp.index - 1]
        self.task_of_class[list(exp.classes)] = exp.index
        self._clouds = {}

    def on_experience_end(self, exp: ExperienceInfo, train_set) -> None:
        super().on_experience_end(exp, train_set)
        self.predicted_tasks.clear()  # the evaluation follows: its forwards are what `diagnose` reads

    def prefix(self, slots: torch.Tensor, mixed: bool = False) -> torch.Tensor:
        """Each sample's prompt (blocks, 2, batch, length, heads, head_dim); `mixed` adds step 2's
        momentum mix of the current slot with the earlier ones' mean."""
        prompts = self.prompts
        if mixed and self.experience.index > 0:  # training: an experience is running
            t = self.experience.index
            m = self.cfg.prompt_momentum
            current = (1 - m) * prompts[:, :, t] + m * prompts[:, :, :t].mean(2).detach()
            return current.unsqueeze(2).expand(-1, -1, len(slots), -1, -1, -1)
        return prompts[:, :, slots]

    def unprompted(self, x: torch.Tensor) -> torch.Tensor:
        with self.router.using(None):
            return self.backbone(x)

    def prompted(self, x: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        with self.router.using(prefix):
            return self.backbone(x)

    # ---- inference: route -> task -> prompt -> label
    def forward(self, x: torch.Tensor) -> Output:
        seen = self._seen()
        slots = self.predicted_task(x)
        if not self.training:
            self.predicted_tasks.add(slots)
        features = self.prompted(x, self.prefix(slots))
        return Output(mask_to(self.head(features), seen), features)

    def _seen(self) -> list[int]:
        if self.experience is not None:
            return list(self.experience.seen_classes)
        # no experience set (a strategy loaded for inference): the classes it has a task for, i.e. has learnt
        return (self.task_of_class >= 0).nonzero().flatten().tolist()

    def predicted_task(self, x: torch.Tensor) -> torch.Tensor:
        """tau_hat: the task of the class the route head predicts on the unprompted feature."""
        return self.task_of_class[mask_to(self.route_head(self.unprompted(x)), self._seen()).argmax(1)]

    def diagnose(self, exp: ExperienceInfo, loaders, device) -> dict | None:
        """The task-prediction diagnostic: how often tau_hat (noted by the evaluation's forwards) is the
        sample's true task, per seen test experience."""
        predicted = self.predicted_tasks.of_seen(loaders, exp)
        if predicted is None:
            return None
        task_of_class = self.task_of_class.cpu()
        row = []
        for tau_hat, loader in zip(predicted, loaders):
            # an empty test set yields no batch: its labels are the empty start
            true = task_of_class[torch.cat([torch.zeros(0, dtype=torch.long), *(batch.y for batch in loader)])]
            row.append(float((tau_hat == true).float().mean()) if len(true) else float("nan"))
        return {"task_prediction_accuracy": row}

    def phases(self, exp: ExperienceInfo) -> list[Phase]:
        phases = [Phase("train"), Phase("statistics", epochs=1)]
        if not exp.is_first and self.cfg.calibration_epochs > 0:
            phases.append(Phase("calibrate", epochs=self.cfg.calibration_epochs, extras={"augment": False}))
        return phases

    # ---- 2. the route update and the label update
    def step_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        if self.phase.name == "calibrate":
            x, y = self._calibration_batch(batch)
            return {"calibration": F.cross_entropy(mask_to(self.head(x), self.experience.seen_classes), y)}
        classes = self.experience.classes
        with torch.no_grad():
            plain = self.unprompted(batch.x)
        route = F.cross_entropy(mask_to(self.route_head(plain), classes), batch.y)
        slots = torch.full((len(batch),), self.experience.index, device=batch.y.device)
        features = self.prompted(batch.x, self.prefix(slots, mixed=True))
        label = F.cross_entropy(mask_to(self.head(features), classes), batch.y)
        return {"route": route, "label": label}

    ACCUMULATES_GRADIENTS = True  # its steps follow `accumulation` (the official 8 x 24 global batch)

    def training_step(self, batch: Batch, batch_idx: int):
        if self.phase.name == "statistics":
            return self._measure(batch)
        if self.phase.name == "calibrate":
            return super().training_step(batch, batch_idx)
        # the two losses reach disjoint parameters (route head | prompts and label head): one
        # backward, then each optimiser clips its own gradients and steps, as the two updates do
        # a global batch over several batches (`accumulation`) clips and steps once, on the summed gradients
        total = self.total_loss(batch, batch_idx)
        optimizers = self.optimizers()
        zero, step, k = self.accumulation(batch_idx)
        if zero:
            for optimizer in optimizers:
                optimizer.zero_grad()
        self.manual_backward(total if k == 1 else total / k)
        if step:
            for optimizer in optimizers:
                params = [p for group in optimizer.param_groups for p in group["params"]]
                torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
                optimizer.step()
        return total.detach()

    def configure_optimizers(self):
        cfg = self.cfg
        if self.phase.name == "train":
            route = torch.optim.Adam(self.route_head.parameters(), lr=cfg.lr * cfg.head_lr_scale)
            label = torch.optim.Adam([{"params": [self.prompts], "lr": cfg.lr},
                                      {"params": self.head.parameters(), "lr": cfg.lr * self.label_head_lr_scale}])
            schedule = self.lr_schedule(label)  # the prompt/label step's; the route head's rate stays
            return [route, label] if schedule is None else ([route, label], [schedule])
        if self.phase.name == "calibrate":
            head = torch.optim.SGD(self.head.parameters(), lr=cfg.calibration_lr, momentum=0.9)
            return self.scheduled(head, "cosine")
        return None

    @property
    def label_head_lr_scale(self) -> float:
        scale = self.cfg.label_head_lr_scale
        return self.cfg.head_lr_scale if scale is None else scale

    # ---- 3. momentum write-back at the end of training
    def on_fit_end(self) -> None:
        super().on_fit_end()
        t = self.experience.index
        if self.phase.name == "train" and t > 0:
            m = self.cfg.prompt_momentum
            with torch.no_grad():
                self.prompts[:, :, t] = (1 - m) * self.prompts[:, :, t] + m * self.prompts[:, :, :t].mean(2)
        elif self.phase.name == "statistics":
            for c, parts in self._clouds.items():
                cloud = torch.cat(parts)
                self.class_means[c], self.class_variances[c] = cloud.mean(0), cloud.var(0, unbiased=False)

    # ---- 4. statistics with the true task's prompt
    def _measure(self, batch: Batch) -> None:
        slots = torch.full((len(batch),), self.experience.index, device=batch.y.device)
        with eval_mode(self.backbone), torch.no_grad():
            features = self.prompted(batch.x, self.prefix(slots))
        for c in batch.y.unique().tolist():
            self._clouds.setdefault(c, []).append(features[batch.y == c])

    # ---- 5. calibration data: translated old clouds and the current clouds
    def phase_data(self, phase: Phase, data):
        if phase.name != "calibrate":
            return data
        # the classes the statistics pass met: all of them, unless a run limits its batches
        current = [c for c in self.experience.classes if c in self._clouds]
        old = list(self.experience.past_classes)
        clouds = [torch.cat(self._clouds[c]) for c in current]
        shifted = translated_features(self.class_means[old], self.class_means[current], clouds)
        x = torch.cat(shifted + clouds)
        y = torch.cat([torch.full((len(s),), c, dtype=torch.long) for c, s in zip(old, shifted)]
                      + [torch.full((len(cl),), c, dtype=torch.long) for c, cl in zip(current, clouds)])
        self._calibration_set = (x, y.to(x.device))
        batch = max(1, min(self.cfg.calibration_batch, len(x) // len(old)))
        return _CalibrationEpoch(len(old) * batch, batch)

    def on_train_epoch_start(self) -> None:
        if self.phase.name == "calibrate":  # each epoch shuffles D
            self._order = torch.randperm(len(self._calibration_set[0]), generator=self.calibration_generator)

    def _calibration_batch(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self._order[batch.x[:, 0].long().cpu()].to(self._calibration_set[0].device)
        return self._calibration_set[0][rows], self._calibration_set[1][rows]

    # ---- resume
    def extra_state(self) -> dict[str, torch.Tensor]:
        return {**super().extra_state(), "calibration_generator": self.calibration_generator.get_state()}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        super().load_extra_state(state)
        self.calibration_generator.set_state(state["calibration_generator"])
