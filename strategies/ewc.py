"""Online EWC (Kirkpatrick et al. 2017; online form of Schwarz et al. 2018, as in Mammoth's oEWC).

Loss: CE + lambda * sum_i F_i (theta_i - theta*_i)^2.  At the end of each experience a
"fisher" phase (inside `trainer.fit`, so the profiler sees it) accumulates
F_new = mean_n p(y_n|x_n) * (grad log p(y_n|x_n))^2 from per-sample gradients, then
F <- gamma * F + F_new and theta* <- the current weights.  Parameters added later (new
head rows) have no anchor and are unpenalised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clbench.base import CLStrategy
from clbench.config import StrategyConfig, non_negative_numbers
from clbench.errors import UsageError
from clbench.registry import register_strategy
from clbench.types import Batch, ExperienceInfo, Phase


@dataclass(frozen=True)
class Config(StrategyConfig):
    ewc_lambda: float = 10.0
    gamma: float = 1.0
    fisher_samples: int | None = None  # cap on samples used for the Fisher estimate (None: all)

    def __post_init__(self):
        super().__post_init__()
        if self.fisher_samples is not None and self.fisher_samples < 1:
            raise UsageError(f"fisher_samples={self.fisher_samples} is invalid; expected a positive integer (or none: all)")
        non_negative_numbers(self, "ewc_lambda", "gamma")


@register_strategy("ewc")
class EWC(CLStrategy):
    """Online elastic weight consolidation with a per-sample diagonal Fisher."""

    Config = Config
    PAPER_SETTINGS = {
        "cifar10-5": {"lr": 0.03, "momentum": 0.0, "ewc_lambda": 10.0, "gamma": 1.0, "epochs": 50},
        "tinyimagenet-10": {"lr": 0.03, "momentum": 0.0, "ewc_lambda": 25.0, "gamma": 1.0, "epochs": 100},
    }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}
        self._fisher_new: dict[str, torch.Tensor] = {}
        self._fisher_count = 0

    def phases(self, exp: ExperienceInfo) -> list[Phase]:
        return [Phase("train"), Phase("fisher", epochs=1)]

    def step_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        out = self.remember(self(batch.x))
        return {"ce": F.cross_entropy(out.logits, batch.y), "ewc": self.cfg.ewc_lambda * self.penalty()}

    def training_step(self, batch: Batch, batch_idx: int):
        if self.phase.name == "fisher":
            self.accumulate_fisher(batch)
            return None  # no backward, no optimiser step: the Fisher pass only reads gradients
        return super().training_step(batch, batch_idx)

    def penalty(self) -> torch.Tensor:
        total = torch.zeros((), device=self.device)
        for name, p in self.named_parameters():
            if name in self.anchor:
                anchor, fisher = self.anchor[name].to(p.device), self.fisher[name].to(p.device)
                overlap = tuple(slice(0, s) for s in anchor.shape)
                total = total + (fisher * (p[overlap] - anchor) ** 2).sum()
        return total

    def accumulate_fisher(self, batch: Batch) -> None:
        limit = self.cfg.fisher_samples
        params = {n: p for n, p in self.named_parameters() if p.requires_grad}
        was_training = self.training
        self.eval()
        for i in range(len(batch)):
            if limit is not None and self._fisher_count >= limit:
                break
            log_p = F.log_softmax(self(batch.x[i : i + 1]).logits, dim=1)[0, batch.y[i]]
            grads = torch.autograd.grad(log_p, list(params.values()), allow_unused=True)
            weight = log_p.detach().exp()
            for (name, _), g in zip(params.items(), grads):
                if g is not None:
                    acc = self._fisher_new.get(name)
                    self._fisher_new[name] = weight * g.detach() ** 2 + (0 if acc is None else acc)
            self._fisher_count += 1
        self.train(was_training)

    def on_experience_end(self, exp: ExperienceInfo, train_set) -> None:
        for name, f_sum in self._fisher_new.items():
            f_new = (f_sum / max(self._fisher_count, 1)).cpu()
            old = self.fisher.get(name)
            if old is not None:
                grown = torch.zeros_like(f_new)
                grown[tuple(slice(0, s) for s in old.shape)] = self.cfg.gamma * old
                f_new = f_new + grown
            self.fisher[name] = f_new
        self.anchor = {n: p.detach().cpu().clone() for n, p in self.named_parameters() if n in self.fisher}
        self._fisher_new, self._fisher_count = {}, 0
        super().on_experience_end(exp, train_set)

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {**{f"fisher.{n}": t for n, t in self.fisher.items()}, **{f"anchor.{n}": t for n, t in self.anchor.items()}}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        self.fisher = {k[len("fisher."):]: v for k, v in state.items() if k.startswith("fisher.")}
        self.anchor = {k[len("anchor."):]: v for k, v in state.items() if k.startswith("anchor.")}
