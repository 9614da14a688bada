"""Multi-teacher distillation (aux-components.md section 1.5).

L_mt = mean over samples of sum_k w_k(x) * [tau^2 KL(p_{t_k} || p_s) + gamma * L_feat(f_s, f_{t_k})],
sum_k w_k(x) = 1.

1. Teachers: at the start of every experience after the first, a frozen snapshot of the model
   (the model as it was after the previous experience) joins the list; the `teachers` most
   recent are kept. Teacher k distils only the classes it had seen (its old classes).
2. Per-sample weights, cheapest first:
   - `equal`: 1/K;
   - `confidence`: w_k proportional to exp(-CE(z_{t_k}, y) / T_w) over the teachers that know the
     sample's class (a teacher cannot be right about a class it never saw);
   - `task_owner`: weight 1 for the snapshot taken right after the sample's experience was learned
     (a replayed sample's experience comes from its class); when that snapshot was dropped, the
     oldest kept one (the nearest in time). Samples of the current experience have no owner and
     are not distilled.
   The spec's `rl` policy (MTKD-RL's learned weighting agent) is not built.
3. L_feat is the per-sample mean squared error between the pooled embeddings (gamma = 5, MTKD-RL's
   feature weight; 0 turns it off); tau = 4 (MTKD-RL's default).
The distilled samples are chosen as for the other distillation add-ons (`samples`, default "all":
current and replayed samples).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clbench.auxiliary.base import checked, choice, non_negative, positive
from clbench.auxiliary.distill import FORECAST, PreviousTeacher, kd_per_sample
from clbench.base import teacher_outputs
from clbench.registry import register_aux

POLICIES = ("equal", "confidence", "task_owner")


def teacher_weights(policy: str, teacher_logits: list[torch.Tensor], known: list[int], y: torch.Tensor,
                    owner: torch.Tensor | None = None, temperature: float = 1.0) -> torch.Tensor:
    """w [B, K]: each row sums to 1, or is all zero for a sample no teacher may distil.

    known[k]: how many leading classes teacher k had seen; owner: per sample, the index k of its
    owning teacher or -1 (task_owner only)."""
    b, k = len(y), len(teacher_logits)
    if policy == "equal":
        return torch.full((b, k), 1.0 / k, device=y.device)
    if policy == "task_owner":
        w = torch.zeros(b, k, device=y.device)
        has = owner >= 0
        w[has, owner[has]] = 1.0
        return w
    scores = []
    for logits, n in zip(teacher_logits, known):
        knows = y < n
        ce = F.cross_entropy(logits[:, :n], y.clamp(max=n - 1), reduction="none")
        scores.append(torch.where(knows, -ce / temperature, torch.full_like(ce, -torch.inf)))
    scores = torch.stack(scores, dim=1)
    nobody = torch.isinf(scores).all(dim=1, keepdim=True)
    return torch.where(nobody, torch.zeros_like(scores), torch.softmax(scores.masked_fill(nobody, 0.0), dim=1))


@register_aux("multi_teacher")
class MultiTeacher(PreviousTeacher):
    """Distillation from the last K experience snapshots, weighted per sample (equal, confidence or task owner)."""

    refuses = {FORECAST: "it distils class probabilities of the classes each teacher saw, weighted by class "
                         "confidence or ownership, and a forecast has no classes; use logit_mse"}

    def __init__(self, weight: float = 1.0, teachers: int = 2, policy: str = "equal", temperature: float = 4.0,
                 feature_weight: float = 5.0, confidence_temperature: float = 1.0, samples: str = "all"):
        super().__init__(weight, samples=samples, teachers=teachers, policy=policy, temperature=temperature,
                         feature_weight=feature_weight, confidence_temperature=confidence_temperature)
        checked("multi_teacher", "teachers", teachers, lambda v: v >= 1, "a positive integer", integer=True)
        self.max_teachers = teachers
        self.policy = choice("multi_teacher", "policy", policy, POLICIES)
        self.temperature = positive("multi_teacher", "temperature", temperature)
        self.confidence_temperature = positive("multi_teacher", "confidence_temperature", confidence_temperature)
        self.feature_weight = non_negative("multi_teacher", "feature_weight", feature_weight)
        # newest first; modules and buffers, so they move with the strategy and survive --resume
        self.teachers = nn.ModuleList()

    def setup(self, strategy) -> None:
        if not hasattr(self, "class_experience"):
            k = self.max_teachers
            # per class: the experience that brought it (-1: not yet); per teacher: the classes it
            # had seen and the experience it had just learned
            self.register_buffer("class_experience", torch.full((strategy.num_classes,), -1, dtype=torch.long))
            self.register_buffer("teacher_known", torch.zeros(k, dtype=torch.long))
            self.register_buffer("teacher_after", torch.full((k,), -1, dtype=torch.long))

    @property
    def snapshots(self) -> list[tuple[nn.Module, int, int]]:
        """(snapshot, classes it had seen, experience it had just learned), newest first."""
        return [(t, int(self.teacher_known[k]), int(self.teacher_after[k])) for k, t in enumerate(self.teachers)]

    def on_experience_start(self, strategy, exp) -> None:
        new = torch.tensor(list(exp.classes), dtype=torch.long)
        self.class_experience[new[self.class_experience[new] < 0]] = exp.index
        if not exp.is_first:
            self.teachers.insert(0, strategy.frozen_copy())
            del self.teachers[self.max_teachers:]
            self.teacher_known.copy_(torch.cat([self.teacher_known.new_tensor([len(exp.past_classes)]), self.teacher_known[:-1]]))
            self.teacher_after.copy_(torch.cat([self.teacher_after.new_tensor([exp.index - 1]), self.teacher_after[:-1]]))
        self.old_classes = len(exp.past_classes)

    def owners(self, y: torch.Tensor) -> torch.Tensor:
        """Per sample, the index of the snapshot taken right after its experience (-1: none yet)."""
        kept = len(self.teachers)
        after = self.teacher_after[:kept].to(y.device)
        experience = self.class_experience.to(y.device)[y]
        match = experience[:, None] == after[None, :]
        owner = torch.where(match.any(dim=1), match.long().argmax(dim=1), torch.full_like(y, kept - 1))
        # the current experience's samples (or a class never seen): nobody owns them yet
        return torch.where((experience < 0) | (experience > after[0]), torch.full_like(y, -1), owner)

    def loss(self, batch, out, strategy):
        if not len(self.teachers):
            return None
        rows = self.distilled(batch, out, strategy)
        if rows is None:
            return None
        x, y, student = rows
        teachers = [teacher_outputs(snapshot, x) for snapshot in self.teachers]
        known = self.teacher_known[: len(teachers)].tolist()
        owner = self.owners(y) if self.policy == "task_owner" else None
        w = teacher_weights(self.policy, [t.logits for t in teachers], known, y, owner, self.confidence_temperature)
        per_teacher = []
        for teacher, n in zip(teachers, known):
            term = kd_per_sample(student.logits[:, :n], teacher.logits[:, :n], self.temperature)
            if self.feature_weight and student.features is not None:
                term = term + self.feature_weight * (student.features - teacher.features).pow(2).flatten(1).mean(dim=1)
            per_teacher.append(term)
        return (w * torch.stack(per_teacher, dim=1)).sum(dim=1).mean()

    def report(self):
        return {"teachers": self.max_teachers, "policy": self.policy}
