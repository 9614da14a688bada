"""DER++: Dark Experience Replay++ (Buzzega et al., NeurIPS 2020; Mammoth protocol).

Each step: CE on the current batch + alpha * MSE between the network's logits on one
replay draw and the logits stored with those samples + beta * CE on a second,
independent replay draw.  The buffer (reservoir over non-augmented inputs) stores with
each sample the logits the network produced for it in the step it was inserted; they
are never refreshed.

Growing heads: clbench's head has only the classes seen so far, so a stored logit
vector is narrower than later heads.  It is stored zero-padded to the scenario's class
count together with its width, and the MSE is the mean over the stored columns only
(Mammoth's head is full-width from the start, so its MSE also pins the untrained
future-class logits; here those columns do not exist yet when the sample is stored).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from clbench.strategies import er
from clbench.strategies._replay import Replay, pad_logits, width_mask

from clbench.config import non_negative_numbers
from clbench.registry import register_strategy
from clbench.types import Batch


@dataclass(frozen=True)
class Config(er.Config):
    alpha: float = 0.1  # weight of the logit-matching (dark knowledge) term
    beta: float = 0.5  # weight of the replay cross-entropy term

    def __post_init__(self):
        super().__post_init__()
        non_negative_numbers(self, "alpha", "beta")


@register_strategy("der_pp")
class DERPP(Replay):
    """DER++: replay with stored logits (MSE) plus replayed labels (CE), two independent draws."""

    Config = Config
    # CLFD's Table 1 setting (buffer 125, the card's published baseline numbers: 53.09 / 11.29 Class-IL)
    PAPER_SETTINGS = {
        "cifar10-5": {"lr": 0.03, "momentum": 0.0, "epochs": 50, "batch_size": 32, "replay_batch_size": 32,
                      "buffer_size": 125, "alpha": 0.2, "beta": 0.5},
        "tinyimagenet-10": {"lr": 0.03, "momentum": 0.0, "epochs": 100, "batch_size": 32, "replay_batch_size": 32,
                            "buffer_size": 125, "alpha": 0.1, "beta": 0.5},
    }

    def step_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        out = self.current_output(batch)
        self.step_logits = out.logits.detach()
        losses = {"ce": F.cross_entropy(out.logits, batch.y)}
        first = self.draw()
        if first:
            second = self.draw()
            losses["logit_mse"] = self.cfg.alpha * stored_logit_mse(self.replay_output(first["x"]).logits, first)
            losses["replay_ce"] = self.cfg.beta * F.cross_entropy(self.replay_output(second["x"]).logits, second["y"])
        return losses

    def on_train_batch_end(self, outputs, batch: Batch, batch_idx: int) -> None:
        if self.phase.name == "train":
            self.buffer.add(**self.insertion(batch))

    def insertion(self, batch: Batch) -> dict[str, torch.Tensor]:
        logits = self.step_logits
        width = torch.full((len(logits),), logits.shape[1], dtype=torch.long)
        return {"x": self.buffer_inputs(batch), "y": batch.y, "logits": pad_logits(logits, self.num_classes), "width": width}


def stored_logit_mse(logits: torch.Tensor, replay: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean squared error between current and stored logits over the columns each stored vector covers."""
    stored = replay["logits"][:, : logits.shape[1]]
    mask = width_mask(replay["width"], logits.shape[1]).to(logits.dtype)
    return (((logits - stored) ** 2) * mask).sum() / mask.sum().clamp_min(1)
