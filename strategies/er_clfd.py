"""CLFD-ER: experience replay in CLFD's frequency domain (Liu et al., NeurIPS 2024); see `clfd.py`.

Each step: CE on the current batch (class-wise masked, k-WTA) + CE on a separate replay
batch of stored codes (augmented in the code domain, k-WTA, no class mask), one SGD step
on the sum, then the non-augmented current images are encoded and reservoir-inserted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clbench.registry import register_strategy
from clbench.strategies import er
from clbench.strategies._replay import Replay
from clbench.strategies.clfd import ER_SETTINGS, CLFDMixin, CLFDOptions
from clbench.types import Batch


@dataclass(frozen=True)
class Config(er.Config, CLFDOptions):
    pass


@register_strategy("er_clfd")
class ERCLFD(CLFDMixin, Replay):
    """CLFD over ER: frequency-domain codes in, class-aware k-WTA feature selection out."""

    Config = Config
    PAPER_SETTINGS = ER_SETTINGS

    def step_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        out = self.current_output(batch)
        losses = {"ce": F.cross_entropy(out.logits, batch.y)}
        replay = self.draw()
        if replay:
            losses["replay_ce"] = F.cross_entropy(self.replay_output(replay["x"]).logits, replay["y"])
        return losses
