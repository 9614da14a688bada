"""ER-ACE: Experience Replay with Asymmetric Cross-Entropy (Caccia et al., ICLR 2022; Mammoth protocol).

From the second experience on, the current batch's cross-entropy only competes among
the classes present in the batch (and classes newer than any seen so far): logits of
already-seen classes absent from the batch are set to the dtype's minimum, so the
incoming data cannot push old classes' logits down.  A separate replay batch adds a
plain cross-entropy over all classes.  The buffer is a reservoir of raw inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from clbench.strategies import er
from clbench.strategies._replay import Replay

from clbench.models.backbones import CIFAR_RESNET18
from clbench.registry import register_strategy
from clbench.types import Batch


@dataclass(frozen=True)
class Config(er.Config):
    pass


@register_strategy("er_ace")
class ERACE(Replay):
    """ER-ACE: asymmetric cross-entropy (incoming batch masks absent old classes) plus replay CE."""

    Config = Config
    DEFAULTS = {"cifar*": CIFAR_RESNET18, "tinyimagenet-*": CIFAR_RESNET18}  # Mammoth's ResNet-18 (3x3 stem)
    PAPER_SETTINGS = {  # CLFD's Table 1 runs (Mammoth protocol, buffer 125)
        "cifar10-5": {**er.MAMMOTH_PROTOCOL, "lr": 0.03, "epochs": 50, "replay_batch_size": 32, "buffer_size": 125},
        "tinyimagenet-10": {**er.MAMMOTH_PROTOCOL, "lr": 0.03, "epochs": 50, "replay_batch_size": 32, "buffer_size": 125},
    }
    PUBLISHED = {
        "cifar10-5": {"metric": "final_avg_acc", "value": 0.5612, "source": "CLFD paper (NeurIPS 2024), Table 1, "
                      "S-CIFAR-10 Class-IL, buffer 125"},
        "tinyimagenet-10": {"metric": "final_avg_acc", "value": 0.1109, "source": "CLFD paper (NeurIPS 2024), Table 1, "
                            "S-Tiny-ImageNet Class-IL, buffer 125"},
    }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen_labels = torch.zeros(self.num_classes, dtype=torch.bool)  # every label met in a batch so far

    def step_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        self.seen_labels[batch.y.unique().cpu()] = True
        out = self.current_output(batch)
        logits = out.logits
        if not self.experience.is_first:
            keep = asymmetric_mask(batch.y, self.seen_labels, logits.shape[1]).to(logits.device)
            logits = logits.masked_fill(~keep, torch.finfo(logits.dtype).min)
        losses = {"ce": F.cross_entropy(logits, batch.y)}
        if not self.experience.is_first:
            replay = self.draw()
            if replay:
                losses["replay_ce"] = F.cross_entropy(self.replay_output(replay["x"]).logits, replay["y"])
        return losses

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {**super().extra_state(), "seen_labels": self.seen_labels.clone()}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        super().load_extra_state(state)
        self.seen_labels = state["seen_labels"].clone()


def asymmetric_mask(y: torch.Tensor, seen: torch.Tensor, width: int) -> torch.Tensor:
    """Columns that stay in the current batch's softmax: labels present in the batch, and (Mammoth)
    every class from the largest label seen so far upwards; the rest (seen, absent) are masked."""
    keep = torch.zeros(width, dtype=torch.bool)
    keep[y.unique().cpu()] = True
    seen_idx = torch.nonzero(seen[:width]).flatten()
    if len(seen_idx):
        keep[int(seen_idx.max()):] = True
    return keep[None, :].expand(len(y), width)
