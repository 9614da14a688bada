"""STELLA-like forecaster with experience replay (reservoir buffer of past windows).

The model is `stella_mlp`'s (clbench's STELLA-like baseline, not a reproduction of STELLA).
1. Each step: one MSE over the current batch concatenated with a batch of windows drawn
   from the buffer.
2. After each step the current windows (lookback and horizon) are offered to a reservoir
   buffer, labelled with their experience index.
Distillation add-ons see the replayed windows too (`samples=replay` or `all`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from clbench.strategies.stella_mlp import Config as StellaConfig
from clbench.strategies.stella_mlp import StellaMLP

from clbench.config import non_negative_integers, positive_integers
from clbench.models.buffers import ReservoirBuffer
from clbench.registry import register_strategy
from clbench.types import Batch


@dataclass(frozen=True)
class Config(StellaConfig):
    buffer_size: int = 200
    replay_batch_size: int = 32

    def __post_init__(self):
        super().__post_init__()
        non_negative_integers(self, "buffer_size")
        positive_integers(self, "replay_batch_size")


@register_strategy("stella_er")
class StellaER(StellaMLP):
    """STELLA-like MLP forecaster with reservoir experience replay of past windows."""

    Config = Config

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.buffer = ReservoirBuffer(self.cfg.buffer_size, seed=self.seed)

    def step_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        x, y = batch.x, batch.y
        if not self.buffer.is_empty:
            replay = self.buffer.sample(self.cfg.replay_batch_size, device=self.device)
            x, y = torch.cat([x, replay["x"]]), torch.cat([y, replay["target"]])
        return {"mse": F.mse_loss(self.step_forecast(x, y, current=len(batch)), y)}

    def on_train_batch_end(self, outputs, batch: Batch, batch_idx: int) -> None:
        # the buffer's `y` is its label (here: the experience), the horizon travels as `target`
        experience = torch.full((len(batch),), self.experience.index, dtype=torch.long)
        self.buffer.add(x=batch.x, y=experience, target=batch.y)

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {f"buffer.{k}": v for k, v in self.buffer.state_dict().items()}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        self.buffer.load_state_dict({k[len("buffer."):]: v for k, v in state.items() if k.startswith("buffer.")})

    def report(self) -> dict:
        return {"buffer_size": self.cfg.buffer_size, "buffer_bytes": self.buffer.nbytes(),
                "buffer_counts": self.buffer.class_counts()}
