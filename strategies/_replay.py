"""The replay pattern of `er`, split into the three places where input-space variants differ.

DER++, ER-ACE and CLS-ER compute their losses from three hooks, so that a method that
changes what the network sees (CLFD feeds frequency codes, FDINet two wavelet branches)
reuses their losses unchanged:
- `current_output(batch)`: the network's output on the current (augmented) batch;
- `replay_output(x)`: the output on replayed inputs, already passed through `replay_view`;
- `buffer_inputs(batch)`: what is stored for the current batch (the non-augmented inputs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from clbench.strategies.er import ER

from clbench.types import Batch, Output


class Replay(ER):
    def current_output(self, batch: Batch) -> Output:
        return self.remember(self(batch.x))

    def replay_output(self, x: torch.Tensor) -> Output:
        return self(x)

    def buffer_inputs(self, batch: Batch) -> torch.Tensor:
        return batch.stored_x

    def draw(self, n: int | None = None) -> dict[str, torch.Tensor]:
        """A replay batch (inputs already in their replay view), or {} while the buffer is empty."""
        if self.buffer.is_empty:
            return {}
        replay = self.buffer.sample(n or self.cfg.replay_batch_size, device=self.device)
        replay["x"] = self.replay_view(replay["x"])
        return replay

    def on_train_batch_end(self, outputs, batch: Batch, batch_idx: int) -> None:
        if self.phase.name == "train":
            self.buffer.add(x=self.buffer_inputs(batch), y=batch.y)


def pad_logits(logits: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Logits of a head that has grown to `logits.shape[1]` classes, zero-padded to the final `num_classes`."""
    return F.pad(logits, (0, num_classes - logits.shape[1]))


def width_mask(widths: torch.Tensor, num_columns: int) -> torch.Tensor:
    """Row i is True on its first widths[i] columns: the classes a stored logit vector covers."""
    return torch.arange(num_columns, device=widths.device)[None, :] < widths[:, None]
