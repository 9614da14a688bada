"""Distillation add-ons from a previous-experience teacher (aux-components.md section 1).

`logit_kd`: L = tau^2 * KL(p_t || p_s), p = softmax(z / tau), batch mean, over the
classes seen before the current experience (new head units have no teacher).
`feature_kd`: L = mean squared error between the student's and the teacher's pooled
features (the embedding that feeds the head).
Both snapshot the model at the start of every experience after the first, and the
teacher's forward runs without gradients on the current batch (it is real training
cost, so the profiler counts it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clbench.auxiliary.base import Aux
from clbench.registry import register_aux


class _PreviousTeacher(Aux):
    family = "distill"

    def __init__(self, weight: float = 1.0, **hparams):
        super().__init__(weight, **hparams)
        self.teacher = None
        self.old_classes = 0

    def on_experience_start(self, strategy, exp) -> None:
        # runs after the head grew: keep only the rows of classes the teacher knew
        self.teacher = None if exp.is_first else strategy.frozen_copy()
        self.old_classes = len(exp.past_classes)

    def teacher_output(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            features = self.teacher["backbone"](x)
            return self.teacher["head"](features), features


@register_aux("logit_kd")
class LogitKD(_PreviousTeacher):
    """Logit distillation tau^2 * KL(teacher || student) on past classes from the previous-experience model."""

    def __init__(self, weight: float = 1.0, temperature: float = 2.0):
        super().__init__(weight, temperature=temperature)
        if temperature <= 0:
            from clbench.errors import UsageError

            raise UsageError(f"logit_kd temperature={temperature} is invalid; expected a positive number")
        self.temperature = float(temperature)

    def loss(self, batch, out, strategy):
        if self.teacher is None or self.old_classes == 0:
            return None
        t_logits, _ = self.teacher_output(batch.x)
        return logit_kd(out.logits[:, : self.old_classes], t_logits[:, : self.old_classes], self.temperature)


@register_aux("feature_kd")
class FeatureKD(_PreviousTeacher):
    """Feature mimicry: MSE between student and previous-experience teacher embeddings."""

    def loss(self, batch, out, strategy):
        if self.teacher is None or out.features is None:
            return None
        _, t_features = self.teacher_output(batch.x)
        return F.mse_loss(out.features, t_features)


def logit_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    log_p_s = F.log_softmax(student / temperature, dim=1)
    p_t = F.softmax(teacher / temperature, dim=1)
    return temperature**2 * F.kl_div(log_p_s, p_t, reduction="batchmean")
