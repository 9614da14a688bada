"""Continual forecasting: the error metrics and the strategy contract every forecaster shares.

Terms (see `clbench.scenarios.forecast`): an experience is a set of (lookback L, horizon H)
windows; `x` is float [N, C, L] (channel 0 the scaled values, then covariates), `y` float
[N, H]. After training experience i every test experience j is scored:
`R[i][j]` = mean squared error (and a twin matrix of mean absolute error) over all of its
windows and horizon steps, on the scaled values; the original-scale matrices follow from
the scaler's per-experience standard deviation (the scalers are affine).

Lower is better everywhere, so forgetting is an error *increase*:
- final average error = mean_j R[T-1][j];
- forgetting of j < T-1: f_j = R[T-1][j] - min_{j <= i < T-1} R[i][j] (positive: it forgot);
  average forgetting = mean_j f_j; relative forgetting = mean_j f_j / R[j][j] (scales differ
  across series);
- BWT_err = mean_{j<T-1} (R[T-1][j] - R[j][j]) (positive: forgetting).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from clbench.base import CLStrategy, evaluating, frozen_snapshot
from clbench.config import StrategyConfig
from clbench.errors import UsageError
from clbench.metrics import MetricSpec
from clbench.types import Batch, Output


# --------------------------------------------------------------------------- metrics (pure)
def _errors(R) -> np.ndarray:
    m = np.asarray(R, dtype=float)
    if m.ndim != 2 or m.shape[0] > m.shape[1] or m.shape[0] == 0:
        raise ValueError(f"error matrix must be (1 <= rows <= experiences) x experiences, got shape {m.shape}")
    return m


def final_average_error(R) -> float:
    """mean_j R[T-1][j]: the error on every experience after the last one."""
    m = _errors(R)
    return float(m[-1, : m.shape[0]].mean())


def forgetting_per_experience(R) -> list[float]:
    """f_j = R[T-1][j] - min_{j <= i < T-1} R[i][j] for j < T-1 (positive: the error grew)."""
    m = _errors(R)
    t = m.shape[0]
    return [float(m[t - 1, j] - m[j : t - 1, j].min()) for j in range(t - 1)]


def average_forgetting(R) -> float:
    """mean_{j<T-1} f_j; NaN after one experience."""
    f = forgetting_per_experience(R)
    return float(np.mean(f)) if f else math.nan


def relative_forgetting(R) -> float:
    """mean_{j<T-1} f_j / R[j][j]: forgetting as a fraction of the error just after learning j."""
    m = _errors(R)
    f = forgetting_per_experience(R)
    return float(np.mean([fj / m[j, j] for j, fj in enumerate(f)])) if f else math.nan


def backward_transfer_error(R) -> float:
    """BWT_err = mean_{j<T-1} (R[T-1][j] - R[j][j]) (positive: forgetting); NaN after one experience."""
    m = _errors(R)
    t = m.shape[0]
    return float(np.mean([m[t - 1, j] - m[j, j] for j in range(t - 1)])) if t > 1 else math.nan


def plasticity_error(R) -> float:
    """mean_i R[i][i]: the error on each experience right after learning it."""
    m = _errors(R)
    return float(np.mean([m[i, i] for i in range(m.shape[0])]))


ERROR_METRICS: dict[str, MetricSpec] = {
    m.name: m
    for m in [
        MetricSpec("final_avg_error", final_average_error, False, "mean error over all experiences after the last"),
        MetricSpec("forgetting", average_forgetting, False, "mean error increase since each experience's best (positive: forgot)"),
        MetricSpec("relative_forgetting", relative_forgetting, False, "mean f_j / R[j][j]"),
        MetricSpec("bwt_err", backward_transfer_error, False, "mean R[T-1][j] - R[j][j] (positive: forgetting)"),
        MetricSpec("plasticity_error", plasticity_error, False, "mean error right after learning each experience"),
    ]
}


def summarise_errors(R) -> dict[str, Any]:
    out: dict[str, Any] = {name: spec.fn(R) for name, spec in ERROR_METRICS.items()}
    out["forgetting_per_experience"] = forgetting_per_experience(R)
    return out


def to_original_scale(R, scales: Sequence[float], power: int) -> list[list[float]]:
    """Column j times scales[j]**power (2 for MSE, 1 for MAE): exact for affine scalers."""
    return [[float(v) * float(scales[j]) ** power for j, v in enumerate(row)] for row in R]


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_forecast(strategy, loaders, device=None) -> tuple[list[float], list[float]]:
    """(MSE row, MAE row): per test experience, the mean over its windows and horizon steps."""
    mse, mae = [], []
    with evaluating(strategy, device) as device:
        for loader in loaders:
            sq = ab = 0.0
            count = 0
            for batch in loader:
                batch = batch.to(device)
                err = strategy.predict(batch.x).float() - batch.y.float()
                sq += float((err**2).sum())
                ab += float(err.abs().sum())
                count += err.numel()
            mse.append(sq / count if count else math.nan)
            mae.append(ab / count if count else math.nan)
    return mse, mae


def new_record(scenario, initial_mse: Sequence[float], initial_mae: Sequence[float]) -> dict[str, Any]:
    """`RunResult.forecasting` before the first experience: protocol facts and the untrained model's errors."""
    return {
        "metric": "mse", "higher_is_better": False, "stream": scenario.stream, "lookback": scenario.lookback,
        "horizon": scenario.horizon, "scaler": scenario.scaler, "scales": list(scenario.scales),
        "initial_mse": list(initial_mse), "initial_mae": list(initial_mae), "mse_matrix": [], "mae_matrix": [],
    }


def finish_record(record: dict[str, Any]) -> None:
    """Add the summary metrics on the scaled values and on the original scale."""
    scales = record["scales"]
    record["mse_matrix_original"] = to_original_scale(record["mse_matrix"], scales, 2)
    record["mae_matrix_original"] = to_original_scale(record["mae_matrix"], scales, 1)
    record["metrics"] = {"mse": summarise_errors(record["mse_matrix"]), "mae": summarise_errors(record["mae_matrix"])}
    record["metrics_original"] = {"mse": summarise_errors(record["mse_matrix_original"]),
                                  "mae": summarise_errors(record["mae_matrix_original"])}


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


SCENARIO_FIELDS = ("lookback", "horizon", "num_series", "season_slots")


def bind_to_scenario(cfg, scenario):
    """`cfg` with the scenario's window and vocabulary sizes filled in."""
    values = {}
    for name in SCENARIO_FIELDS:
        given, wanted = getattr(cfg, name), getattr(scenario, name)
        if given not in (0, wanted):
            raise UsageError(f"{name}={given} does not match scenario {scenario.name!r}; expected {wanted} "
                             f"(or leave it unset: it comes from the scenario)")
        values[name] = wanted
    return dataclasses.replace(cfg, **values)


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
                             f"positive window (bind the Config with clbench.forecasting.bind_to_scenario)")
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
