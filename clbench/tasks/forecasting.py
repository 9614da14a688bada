"""Continual forecasting: the error metrics, the evaluation and the record of a forecasting run.

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
from typing import Any, Sequence

import numpy as np
import torch

from clbench.errors import UsageError
from clbench.metrics import MetricSpec
from clbench.models.freeze import evaluating
from clbench.tasks.base import Column, Task


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


def forecast_metric(key: str):
    """A stored forecasting result's error metric on the MSE matrix (scaled values)."""

    def get(r):
        value = ((r.forecasting or {}).get("metrics") or {}).get("mse", {}).get(key)
        return None if value is None or math.isnan(value) else value

    return get


class ForecastingTask(Task):
    """Errors, not accuracies: `result.forecasting` holds the MSE and MAE matrices and their
    metrics (lower is better); `result.accuracy_matrix` stays empty."""

    name = "forecasting"
    matrix_name = "MSE"
    headline = "final_mse"
    plots_accuracy_matrix = False
    builds_own_model = True

    def build_model(self, strategy_cls, scenario, run_cfg, cfg):
        if run_cfg.backbone:
            raise UsageError(f"backbone={run_cfg.backbone!r} does not apply to forecasting strategies; "
                             f"expected no --backbone (each builds its model from its Config)")
        return None, strategy_cls.model_name, bind_to_scenario(cfg, scenario)

    def start(self, result, strategy, scenario, loaders, device) -> None:
        result.forecasting = new_record(scenario, *evaluate_forecast(strategy, loaders, device=device))

    def after_experience(self, result, strategy, info, scenario, loaders, device) -> None:
        mse, mae = evaluate_forecast(strategy, loaders, device=device)
        result.forecasting["mse_matrix"].append(mse)
        result.forecasting["mae_matrix"].append(mae)

    def finish(self, result) -> None:
        finish_record(result.forecasting)

    def rows_recorded(self, result) -> int:
        return len((result.forecasting or {}).get("mse_matrix") or [])

    def has_summary(self, result) -> bool:
        return "metrics" in (result.forecasting or {})

    def columns(self) -> list[Column]:
        return [Column("final_mse", "Final MSE", False, forecast_metric("final_avg_error"), 1.0, ".4f"),
                Column("forgetting_mse", "Forgetting (MSE)", False, forecast_metric("forgetting"), 1.0, ".4f")]

    def print_matrix(self, result, out) -> None:
        record = result.forecasting or {}
        R = record.get("mse_matrix") or []
        print("MSE matrix (scaled values, lower is better), rows: after training experience i; columns: test "
              "experience j", file=out)
        if not R:
            print("(no experience finished)", file=out)
            return
        print("after \\ on " + " ".join(f"{'e' + str(j + 1):>7s}" for j in range(len(R[0]))), file=out)
        for i, row in enumerate(R):
            print(f"{'exp ' + str(i + 1):>10s} " + " ".join(f"{v:7.4f}" for v in row), file=out)
        metrics = (record.get("metrics") or {}).get("mse") or {}
        for name in ("final_avg_error", "forgetting", "bwt_err", "plasticity_error"):
            value = metrics.get(name)
            shown = "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"
            print(f"  {name:22s} {shown} (lower is better)", file=out)
