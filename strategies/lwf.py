"""Learning without Forgetting (Li & Hoiem, ECCV 2016; Mammoth's implementation of the loss).

At the start of each experience after the first, a frozen copy of the model becomes
the teacher (and, with `warmup`, the new head rows are first trained alone on frozen
features).  Loss: CE over the seen classes + alpha * KD, where
KD = -mean_n sum_c p_c log q_c over the PAST classes, with p (teacher) and q (student)
softmaxes sharpened by temperature T.  The teacher's logits are computed on the fly for
each batch; without augmentation this equals Mammoth's logits stored before the task.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clbench.base import CLStrategy
from clbench.config import StrategyConfig, non_negative_numbers, positive_numbers
from clbench.models.freeze import teacher_logits
from clbench.registry import register_strategy
from clbench.strategies.er import MAMMOTH_PROTOCOL
from clbench.types import Batch, ExperienceInfo, Phase


@dataclass(frozen=True)
class Config(StrategyConfig):
    alpha: float = 1.0
    temperature: float = 2.0
    warmup: bool = False  # train only the new head rows on frozen features first (Mammoth)

    def __post_init__(self):
        super().__post_init__()
        positive_numbers(self, "temperature")
        non_negative_numbers(self, "alpha")


@register_strategy("lwf")
class LwF(CLStrategy):
    """Distils the previous model's outputs on past classes into the current one."""

    Config = Config
    PAPER_SETTINGS = {  # Mammoth's best args (its protocol: er.MAMMOTH_PROTOCOL, with weight decay 5e-4), T = 2
        "cifar10-5": {**MAMMOTH_PROTOCOL, "lr": 0.01, "weight_decay": 5e-4, "alpha": 3.0, "temperature": 2.0,
                      "warmup": True, "epochs": 50},
        "tinyimagenet-10": {**MAMMOTH_PROTOCOL, "lr": 0.01, "weight_decay": 5e-4, "alpha": 1.0, "temperature": 2.0,
                            "warmup": True, "epochs": 100},
    }
    PUBLISHED = {  # the DER paper's Table 2 values, as CLFD's Table 1 carries them over
        "cifar10-5": {"metric": "final_avg_acc", "value": 0.1961, "source": "CLFD paper (NeurIPS 2024), Table 1 "
                      "(= DER paper Table 2), S-CIFAR-10 Class-IL"},
        "tinyimagenet-10": {"metric": "final_avg_acc", "value": 0.0846, "source": "CLFD paper (NeurIPS 2024), Table 1 "
                            "(= DER paper Table 2), S-Tiny-ImageNet Class-IL"},
    }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = None

    def on_experience_start(self, exp: ExperienceInfo) -> None:
        # the snapshot is taken before the head grows: it knows only the past classes
        self.teacher = None if exp.is_first else self.frozen_copy()
        super().on_experience_start(exp)

    def phases(self, exp: ExperienceInfo) -> list[Phase]:
        if self.cfg.warmup and not exp.is_first:
            return [Phase("warmup"), Phase("train")]
        return [Phase("train")]

    def step_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        out = self.remember(self(batch.x))
        losses = {"ce": F.cross_entropy(out.logits, batch.y)}
        if self.teacher is not None and self.phase.name == "train":
            past = len(self.experience.past_classes)
            old = teacher_logits(self.teacher, batch.x)[:, :past]
            losses["kd"] = self.cfg.alpha * distillation(out.logits[:, :past], old, self.cfg.temperature)
        return losses

    def trainable_parameters(self):
        if self.phase.name == "warmup":  # the whole head is optimised, but only new rows get gradients
            return list(self.head.parameters())
        return super().trainable_parameters()

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.phase.name == "warmup":
            past = len(self.experience.past_classes)
            for p in self.head.parameters():
                if p.grad is not None and p.dim() >= 1 and p.shape[0] == self.head.out_features:
                    p.grad[:past] = 0


def distillation(student_logits: torch.Tensor, teacher_logits_: torch.Tensor, temperature: float) -> torch.Tensor:
    """-mean_n sum_c p_c log q_c with p, q = softmax(logits / T)."""
    p = F.softmax(teacher_logits_ / temperature, dim=1)
    log_q = F.log_softmax(student_logits / temperature, dim=1)
    return -(p * log_q).sum(dim=1).mean()
