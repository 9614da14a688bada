"""A progress bar per experience (one tqdm bar spanning all phases and epochs of that experience)."""

from __future__ import annotations

import sys

import pytorch_lightning as pl
from tqdm.auto import tqdm


class ProgressBar(pl.Callback):
    def __init__(self, spec, file=None):
        self.spec = spec
        self.file = file or sys.stderr
        self.bar = None
        self.experience = None

    def on_train_start(self, trainer, pl_module) -> None:
        exp = pl_module.experience
        total = trainer.num_training_batches * trainer.max_epochs
        if self.bar is None or self.experience != exp.index:
            if self.bar is not None:
                self.bar.close()
            self.experience = exp.index
            self.bar = tqdm(
                total=0,
                desc=f"{self.spec.strategy} exp {exp.index + 1}/{exp.num_experiences}",
                file=self.file,
                leave=True,
                dynamic_ncols=True,
            )
        self.bar.total += total
        self.bar.refresh()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.bar.update(1)
        if batch_idx % 10 == 0 and isinstance(outputs, dict) and "loss" in outputs:
            self.bar.set_postfix(phase=pl_module.phase.name, loss=f"{float(outputs['loss']):.3f}", refresh=False)

    def on_fit_end(self, trainer, pl_module) -> None:
        exp = pl_module.experience
        if exp is not None and pl_module.phase is not None and self.bar is not None:
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
