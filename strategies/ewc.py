"""Online EWC (Kirkpatrick et al. 2017; online form of Schwarz et al. 2018, as in Mammoth's oEWC).

Loss: CE + lambda * sum_i F_i (theta_i - theta*_i)^2.  At the end of each experience a
"fisher" phase (inside `trainer.fit`, so the profiler sees it) accumulates
F_new = mean_n p(y_n|x_n) * (grad log p(y_n|x_n))^2 from per-sample gradients, then
F <- gamma * F + F_new and theta* <- the current weights.  Parameters added later (new
head rows) have no anchor and are unpenalised.

Per-sample gradients are vectorised with `torch.func` (`functional_call` + `vmap(grad(.))`
over the batch, in chunks that bound the memory of the stacked gradients): the same
empirical Fisher as one autograd call per sample, in one batched pass.  The estimate runs
in eval mode (BatchNorm reads its running statistics, dropout is off), which is what lets
vmap run.  A network that vmap cannot batch (a forward with data-dependent Python control
flow such as `.item()`, in-place writes to buffers, random ops, or BatchNorm left in
training mode by a custom `eval`) falls back to the per-sample loop, once per strategy,
with a warning.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

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
    distributed_sums = ("_fisher_new", "_fisher_count")  # DDP: each rank's Fisher terms, summed over ranks
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
        self.vectorised_fisher = True  # False after vmap failed once on this network: the per-sample loop

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
        """Add p(y|x) * (grad log p(y|x))^2 of each sample of `batch` (up to `fisher_samples` in all)."""
        limit = self.cfg.fisher_samples
        n = len(batch) if limit is None else max(0, min(len(batch), limit - self._fisher_count))
        if n == 0:
            return
        x, y = batch.x[:n], batch.y[:n]
        params = {name: p for name, p in self.named_parameters() if p.requires_grad}
        was_training = self.training
        self.eval()
        try:
            with torch.enable_grad():
                terms = None
                if self.vectorised_fisher:
                    try:
                        terms = vectorised_fisher_sum(self, params, x, y)
                    except (RuntimeError, NotImplementedError) as err:
                        self.vectorised_fisher = False
                        warnings.warn(f"EWC: per-sample gradients cannot be vectorised on this network ({err}); "
                                      "falling back to one autograd call per sample", RuntimeWarning, stacklevel=2)
                if terms is None:
                    terms = looped_fisher_sum(self, params, x, y)
        finally:
            self.train(was_training)
        for name, term in terms.items():
            acc = self._fisher_new.get(name)
            self._fisher_new[name] = term if acc is None else acc + term
        self._fisher_count += n

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


# Stacked per-sample gradients of one vmap chunk hold (chunk x parameters) numbers: this bounds them.  On CPU,
# vmapped convolutions run as grouped convolutions that get slower per sample as the chunk grows (ResNet-18 on one
# thread: 3 samples per chunk beat 12 and 48), so the CPU budget is small (128 MiB in float32); elsewhere 512 MiB.
FISHER_CHUNK_ELEMENTS = {"cpu": 2**25}
FISHER_CHUNK_ELEMENTS_DEFAULT = 2**27


def vectorised_fisher_sum(model: torch.nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor,
                          y: torch.Tensor) -> dict[str, torch.Tensor]:
    """sum_n p(y_n|x_n) * (grad log p(y_n|x_n))^2 per parameter, the per-sample gradients from
    `vmap(grad(.))` over `functional_call(model, ...)` (the model in eval mode)."""
    detached = {name: p.detach() for name, p in params.items()}

    def log_likelihood(p, xi, yi):
        log_probs = F.log_softmax(functional_call(model, p, (xi[None],)).logits[0], dim=0)
        log_p = log_probs.gather(0, yi.reshape(1))[0]  # indexing with the batched label would be data-dependent
        return log_p, log_p

    per_sample = vmap(grad(log_likelihood, has_aux=True), in_dims=(None, 0, 0))
    numel = max(1, sum(p.numel() for p in params.values()))
    chunk = max(1, FISHER_CHUNK_ELEMENTS.get(x.device.type, FISHER_CHUNK_ELEMENTS_DEFAULT) // numel)
    total = {name: torch.zeros_like(p) for name, p in detached.items()}
    for start in range(0, len(x), chunk):
        grads, log_p = per_sample(detached, x[start : start + chunk], y[start : start + chunk])
        weight = log_p.detach().exp()
        for name, g in grads.items():
            g = g.detach().reshape(len(g), -1)
            total[name] += (weight @ (g * g)).view_as(total[name])  # sum_n w_n g_n^2 as one product
    return total


def looped_fisher_sum(model: torch.nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor,
                      y: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same sum with one autograd call per sample (the fallback, and the reference in tests)."""
    total: dict[str, torch.Tensor] = {}
    for i in range(len(x)):
        log_p = F.log_softmax(model(x[i : i + 1]).logits, dim=1)[0, y[i]]
        grads = torch.autograd.grad(log_p, list(params.values()), allow_unused=True)
        weight = log_p.detach().exp()
        for name, g in zip(params, grads):
            if g is not None:
                term = weight * g.detach() ** 2
                total[name] = term if name not in total else total[name] + term
    return total
