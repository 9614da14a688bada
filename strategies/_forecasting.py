"""`ForecastStrategy`: the family base of continual forecasters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from clbench.base import CLStrategy
from clbench.config import StrategyConfig
from clbench.errors import UsageError
from clbench.models.freeze import frozen_snapshot
from clbench.tasks.forecasting import SCENARIO_FIELDS
from clbench.types import Batch, Output


# --------------------------------------------------------------------------- strategy contract
@dataclass(frozen=True)
class ForecastConfig(StrategyConfig):
    """A forecaster's settings. The window and the series vocabulary come from the scenario
    (0: not bound yet; `bind_to_scenario` fills them, a different value given is an error)."""

    optimizer: str = "adam"
    lr: float = 0.001
    lookback: int = 0
    horizon: int = 0
    num_series: int = 0
    season_slots: int = 0


class ForecastStrategy(CLStrategy):
    """Base of every continual-forecasting method.

    The experience loop, optimiser, finiteness checks and logging are `CLStrategy`'s; what
    differs: the model is a forecaster built from the method's Config (`build_model`; the runner
    passes no backbone and binds the Config to the scenario's window), batches hold float
    targets [N, H], and evaluation scores `predict` by MSE and MAE per test experience.

    Distillation add-ons (`clbench.auxiliary.distill`) see a forecaster through what it declares:
    `output_kind = "forecast"` (the output is the forecast [N, H]: no column belongs to a class,
    so every horizon step is distilled, and add-ons that need class probabilities refuse it), the
    features are the input of the model's module `features_at` (caught by a forward pre-hook),
    and `snapshot_output` gives a `frozen_copy` snapshot's output. A method's `step_losses`
    forwards through `step_forecast`, which keeps that output for the add-ons.
    """

    Config: ClassVar[type] = ForecastConfig
    task_type: ClassVar[str] = "forecasting"
    # names the model in results (where classification runs name their backbone)
    model_name: ClassVar[str] = "forecaster"
    # the distillation add-ons: forecast-to-forecast and embedding terms (refusals: `Aux.refuses`)
    accepts_aux: ClassVar[set[str] | None] = {"distill"}
    output_kind: ClassVar[str] = "forecast"
    # the model's module whose input is the embedding add-ons distil as features (None: no features)
    features_at: ClassVar[str | None] = None
    contract_scenario: ClassVar[str] = "ts-domains-4"
    input_channels: ClassVar[int | None] = None

    def __init__(self, backbone: nn.Module | None, num_classes: int, cfg=None, aux: Sequence[nn.Module] = (), seed: int = 0):
        pl.LightningModule.__init__(self)  # CLStrategy's own __init__ builds a classification head
        self.cfg = cfg if cfg is not None else self.Config()
        unbound = [n for n in SCENARIO_FIELDS if n in ("lookback", "horizon") and getattr(self.cfg, n) < 1]
        if unbound:
            raise UsageError(f"{', '.join(f'{n}={getattr(self.cfg, n)}' for n in unbound)} is invalid; expected a "
                             f"positive window (bind the Config with clbench.tasks.forecasting.bind_to_scenario)")
        self.init_loop_state(num_classes, aux, seed)
        self.model = self.build_model()
        for a in self.aux:
            a.setup(self)

    def build_model(self) -> nn.Module:
        """The forecaster: float [N, C, L] -> float [N, H]."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def step_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {"mse": F.mse_loss(self.step_forecast(batch.x, batch.y), batch.y)}

    def step_forecast(self, x: torch.Tensor, y: torch.Tensor, current: int | None = None) -> torch.Tensor:
        """The step's forecast of `x` (its first `current` rows the current batch, then replayed
        ones); with add-ons, also kept for them (`remember`) with its features."""
        if not len(self.aux):
            return self(x)
        out = self.model_output(self.model, x)
        self.remember(out, x, y, current)
        return out.logits

    @classmethod
    def model_output(cls, model: nn.Module, x: torch.Tensor) -> Output:
        """Output(forecast [N, H], features): the features are the input of `model`'s module
        `features_at`, caught by a forward pre-hook for this one call (None without one)."""
        if cls.features_at is None:
            return Output(model(x))
        caught: list[torch.Tensor] = []
        handle = model.get_submodule(cls.features_at).register_forward_pre_hook(lambda m, args: caught.append(args[0]))
        try:
            forecast = model(x)
        finally:
            handle.remove()
        return Output(forecast, caught[-1])

    @classmethod
    def snapshot_output(cls, snapshot: nn.Module, x: torch.Tensor) -> Output:
        """The output of a `frozen_copy` snapshot on `x`, without gradients (a distillation teacher)."""
        with torch.no_grad():
            return cls.model_output(snapshot["model"], x)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The forecast evaluation scores (what the profiler counts per sample)."""
        return self(x)

    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        raise TypeError(f"{type(self).__name__} is a forecasting strategy: use predict(), not predict_logits()")

    def frozen_copy(self, **more: nn.Module) -> nn.Module:
        return frozen_snapshot({"model": self.model, **more})
