"""Multi-teacher distillation.

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
   - `rl`: MTKD-RL's learned weighting (see `WeightingAgent` and `MultiTeacher.agent_weighted`).
     Per sample and teacher an agent reads the teacher's state (teacher-student cosine of the
     embeddings, the per-sample KD term, the teacher's cross-entropy, the teacher's embedding and
     logits) and outputs two weights in (0, 1), one for the teacher's KD term and one for its
     feature term; like the released code, the weights are not normalised to sum to 1 and the
     agent is not used in its first epoch (all weights 1). Its reward per sample is the
     step's negative loss, standardised over the batch and clipped to [0, 1]; the agent is trained
     to raise the weights it chose in proportion to that reward (binary cross-entropy towards 1,
     weighted by the reward) every `agent_steps` steps and at each epoch's end, with its own SGD
     (`agent_lr` 0.1, as released). [recon] The released agent's network (`PolicyTrans`) was not available: here each
     teacher slot has an MLP (state -> 64 -> 2, sigmoid). [recon] In continual learning the
     first epoch of every experience is the warm-up (a new snapshot has joined), and a teacher's
     cross-entropy on a class it never saw is log(number of classes it saw), a uniform guess.
3. L_feat is the per-sample mean squared error between the pooled embeddings (gamma = 5, MTKD-RL's
   feature weight; 0 turns it off); tau = 4 (MTKD-RL's default).
The distilled samples are chosen as for the other distillation add-ons (`samples`, default "all":
current and replayed samples).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from clbench.auxiliary.distill import FORECAST, DistillConfig, PreviousTeacher, kd_per_sample
from clbench.config import non_negative_numbers, one_of, positive_integers, positive_numbers
from clbench.models.freeze import teacher_outputs
from clbench.registry import register_aux
from clbench.types import Output

POLICIES = ("equal", "confidence", "task_owner", "rl")


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


def standardised_rewards(sample_loss: torch.Tensor) -> torch.Tensor:
    """MTKD-RL's reward per sample: -loss standardised over the batch, clipped to [0, 1] (all zero
    when the batch has fewer than two samples or no spread)."""
    reward = -sample_loss.detach()
    if reward.numel() < 2 or not reward.std() > 0:
        return torch.zeros_like(reward)
    return ((reward - reward.mean()) / reward.std()).clamp(0.0, 1.0)


class WeightingAgent(nn.Module):
    """Per teacher slot, an MLP from the teacher's state [B, state_dim] to its (KD, feature) weights
    in (0, 1). [recon] The shape of MTKD-RL's released agent is unknown; see the module docstring."""

    def __init__(self, teachers: int, state_dim: int, hidden: int = 64):
        super().__init__()
        self.slots = nn.ModuleList(
            nn.Sequential(nn.Linear(state_dim, hidden), nn.ReLU(), nn.Linear(hidden, 2)) for _ in range(teachers))

    def forward(self, states: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(KD weights [B, K], feature weights [B, K]) for the K teachers whose states are given."""
        w = torch.stack([torch.sigmoid(slot(state)) for slot, state in zip(self.slots, states)], dim=1)
        return w[..., 0], w[..., 1]


def teacher_state(student: Output, teacher: Output, known: int, num_classes: int, y: torch.Tensor,
                  temperature: float) -> torch.Tensor:
    """What the agent reads about one teacher, per sample: [cos(f_s, f_t), tau^2 KL(p_t || p_s), the
    teacher's cross-entropy, f_t, the teacher's logits of the classes it saw (zero-padded to
    `num_classes`)]; detached."""
    logits = teacher.logits[:, :known]
    kd = kd_per_sample(student.logits[:, :known], logits, temperature)
    knows = y < known
    ce = F.cross_entropy(logits, y.clamp(max=known - 1), reduction="none")
    ce = torch.where(knows, ce, torch.full_like(ce, math.log(known)))
    if student.features is not None and teacher.features is not None:
        features = teacher.features.flatten(1)
        cos = F.cosine_similarity(student.features.flatten(1), features, dim=1)
    else:
        cos, features = torch.zeros_like(ce), ce.new_zeros(len(ce), 0)
    padded = F.pad(logits, (0, num_classes - known))
    return torch.cat([cos[:, None], kd[:, None], ce[:, None], features, padded], dim=1).detach()


@dataclass(frozen=True)
class MultiTeacherConfig(DistillConfig):
    teachers: int = 2  # the most recent snapshots kept
    policy: str = "equal"  # equal | confidence | task_owner | rl
    temperature: float = 4.0
    feature_weight: float = 5.0  # gamma (0: no feature term)
    confidence_temperature: float = 1.0  # T_w of the confidence policy
    samples: str = "all"
    agent_steps: int = 1000  # rl: steps between agent updates
    agent_lr: float = 0.1  # rl: the agent's SGD learning rate

    def __post_init__(self):
        super().__post_init__()
        positive_integers(self, "teachers", "agent_steps")
        one_of(self, "policy", POLICIES)
        positive_numbers(self, "temperature", "confidence_temperature", "agent_lr")
        non_negative_numbers(self, "feature_weight")


@register_aux("multi_teacher")
class MultiTeacher(PreviousTeacher):
    """Distillation from the last K experience snapshots, weighted per sample (equal, confidence, task
    owner, or MTKD-RL's learned agent)."""

    refuses = {FORECAST: "it distils class probabilities of the classes each teacher saw, weighted by class "
                         "confidence or ownership, and a forecast has no classes; use logit_mse"}

    Config = MultiTeacherConfig

    def __init__(self, cfg: MultiTeacherConfig | None = None, /, **values):
        super().__init__(cfg, **values)
        c = self.cfg
        self.max_teachers, self.policy, self.temperature = c.teachers, c.policy, c.temperature
        self.confidence_temperature, self.feature_weight = c.confidence_temperature, c.feature_weight
        self.agent_steps, self.agent_lr = c.agent_steps, c.agent_lr
        # newest first; modules and buffers, so they move with the strategy and survive --resume
        self.teachers = nn.ModuleList()
        self.agent: WeightingAgent | None = None
        self.pending: list[tuple[list[torch.Tensor], torch.Tensor]] = []  # (states, rewards) not yet learned from
        self._epoch = 0

    def setup(self, strategy) -> None:
        if not hasattr(self, "class_experience"):
            k = self.max_teachers
            # per class: the experience that brought it (-1: not yet); per teacher: the classes it
            # had seen and the experience it had just learned
            self.register_buffer("class_experience", torch.full((strategy.num_classes,), -1, dtype=torch.long))
            self.register_buffer("teacher_known", torch.zeros(k, dtype=torch.long))
            self.register_buffer("teacher_after", torch.full((k,), -1, dtype=torch.long))
        if self.policy == "rl" and self.agent is None:
            self.num_classes = strategy.num_classes
            self.agent = WeightingAgent(self.max_teachers, 3 + strategy.backbone.num_features + strategy.num_classes)
            self.register_buffer("agent_updates", torch.zeros((), dtype=torch.long))  # saved with --resume state

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
        self._epoch = 0

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
        kd, feat = [], []
        for teacher, n in zip(teachers, known):
            kd.append(kd_per_sample(student.logits[:, :n], teacher.logits[:, :n], self.temperature))
            if self.feature_weight and student.features is not None:
                feat.append((student.features - teacher.features).pow(2).flatten(1).mean(dim=1))
        kd = torch.stack(kd, dim=1)
        feat = torch.stack(feat, dim=1) if feat else torch.zeros_like(kd)
        if self.policy == "rl":
            return self.agent_weighted(kd, feat, student, teachers, known, y, strategy)
        owner = self.owners(y) if self.policy == "task_owner" else None
        w = teacher_weights(self.policy, [t.logits for t in teachers], known, y, owner, self.confidence_temperature)
        return (w * (kd + self.feature_weight * feat)).sum(dim=1).mean()

    def agent_weighted(self, kd, feat, student, teachers, known, y, strategy) -> torch.Tensor:
        """MTKD-RL's step: the agent's weights (all 1 in an experience's first epoch), the weighted
        loss, and the reward of this step's samples stored for the agent's next update."""
        epoch = strategy.current_epoch
        if epoch != self._epoch:  # the previous epoch ended: learn from what it left
            self.update_agent()
            self._epoch = epoch
        states = [teacher_state(student, t, n, self.num_classes, y, self.temperature) for t, n in zip(teachers, known)]
        with torch.no_grad():  # run in the warm-up too, so every step does the same work (the profiler samples steps)
            w_kd, w_feat = self.agent(states)
        if epoch == 0:
            w_kd, w_feat = torch.ones_like(kd), torch.ones_like(feat)
        per_sample = (w_kd * kd + self.feature_weight * w_feat * feat).sum(dim=1)
        sample_loss = F.cross_entropy(student.logits.detach(), y, reduction="none") + per_sample.detach()
        self.pending.append((states, standardised_rewards(sample_loss)))
        if len(self.pending) >= self.agent_steps:
            self.update_agent()
        return per_sample.mean()

    def update_agent(self) -> None:
        """One SGD step of the agent per stored step: binary cross-entropy of its weights towards 1,
        each sample weighted by its reward. Its gradients are dropped afterwards, so the strategy's
        own optimiser (which holds every parameter of the module tree) never moves it."""
        if not self.pending:
            return
        optimizer = torch.optim.SGD(self.agent.parameters(), lr=self.agent_lr)  # plain SGD: no state to keep
        with torch.enable_grad():
            for states, reward in self.pending:
                w_kd, w_feat = self.agent(states)
                weight = reward[:, None].expand_as(w_kd)
                loss = (F.binary_cross_entropy(w_kd, torch.ones_like(w_kd), weight=weight)
                        + F.binary_cross_entropy(w_feat, torch.ones_like(w_feat), weight=weight))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        self.agent.zero_grad(set_to_none=True)
        self.agent_updates += len(self.pending)
        self.pending = []

    def on_experience_end(self, strategy, exp) -> None:
        if self.policy == "rl":
            self.update_agent()

    def report(self):
        out = super().report()
        if self.policy == "rl":
            out["agent_updates"] = int(self.agent_updates)
        return out
