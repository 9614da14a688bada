"""TUNA: task-specific and universal adapters (Wang, Zhou, Ye; ICCV 2025; code LAMDA-CL/ICCV2025-TUNA).

The base of DAF, SAEF and SGDS, and their baseline. Per task (`clbench.ptm.TunaStrategy`): the
task's adapter continues from the previous task's and is trained with the cosine head by the
CosFace-form loss on the current classes (s = 20, margin m); it is then stored; class Gaussians
are measured under it and, for t > 0, the head is aligned on Gaussian samples of all seen
classes. The universal adapter is the sign-elected max-magnitude merge of all task adapters
(per element: the sign of the sum, then the largest magnitude among the adapters agreeing
with it).

Inference: every task adapter gives softmax(s cosines) over the seen classes; the one of
minimum entropy is chosen; the score is its softmax plus the universal adapter's; argmax.
`universal="latest"` reproduces the released code, whose universal branch runs the latest,
continually trained adapter instead of the merged one (its logged numbers come from that);
the paper's merged adapter is the default. The optional orthogonality term on the adapters'
up-projections is not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clbench.errors import UsageError
from clbench.ptm import TunaConfig, TunaStrategy
from clbench.registry import register_strategy
from clbench.strategies.saef import sign_elected_merge


@dataclass(frozen=True)
class TUNAConfig(TunaConfig):
    universal: str = "merged"  # or "latest": the released code's behaviour

    def __post_init__(self):
        super().__post_init__()
        if self.universal not in ("merged", "latest"):
            raise UsageError(f"universal={self.universal!r} is invalid; expected one of: merged, latest")


@register_strategy("tuna")
class TUNA(TunaStrategy):
    """Task adapters chosen by minimum entropy at test time, plus a universal adapter merged from all of them."""

    Config = TUNAConfig
    contract_overrides = {"bottleneck": 4, "align_epochs": 1, "align_per_class": 8}
    keeps_task_adapters = True

    def universal_adapter(self) -> torch.Tensor:
        adapters = self.task_adapters
        return adapters[-1] if self.cfg.universal == "latest" else sign_elected_merge(adapters)

    @torch.no_grad()
    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        adapters = self.task_adapters
        if len(adapters) == 0:
            return super().predict_logits(x)  # before the first task ends: the adapter in training
        predictions = [self.expert_prediction(theta, x) for theta in adapters]
        chosen = torch.stack([h for _, h in predictions]).argmin(0)  # minimum entropy, per sample
        specific = torch.stack([q for q, _ in predictions])[chosen, torch.arange(len(x))]
        universal, _ = self.expert_prediction(self.universal_adapter(), x)
        return specific + universal
