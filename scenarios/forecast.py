"""Continual forecasting scenarios over real time series bundled in statsmodels.

An experience is a set of (lookback L, horizon H) windows of one series segment:

- `co2-4` (segment-incremental): Mauna Loa weekly CO2, 1958-2001, cut into 4 consecutive
  eras of 571 weeks; L = 52, H = 4;
- `ts-domains-4` (domain-incremental): four different series one after another (yearly
  sunspots, yearly Nile flow, monthly El Nino sea-surface temperature, monthly euro-area
  electrical-equipment orders); L = 12, H = 3;
- `macro-vars-4` (variable-incremental): the quarterly US macro panel (statsmodels `macrodata`,
  1959Q1-2009Q3), one more of its variables per experience (inflation, unemployment, T-bill
  rate, real interest rate) over the same timeline; L = 8, H = 2. Each window holds one variable
  with its index (the channel-independent form: a forecaster sees the variables seen so far one
  at a time, told apart by their index), each variable z-scored on its own training part.

Inside each experience the split is chronological: training windows, then a gap of H
steps, then test windows, so no test window shares a time step with any training window.
Experiences are never shuffled. Needs `pip install 'clbench[forecast]'` (statsmodels).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Sequence

import numpy as np
import torch
from clbench.scenarios.base import Scenario, ScenarioOptions
from torch.utils.data import Dataset

from clbench.errors import UsageError
from clbench.registry import register_scenario

# the channels of a window's input `x` [3, L]
VALUE, SERIES, SEASON = 0, 1, 2
CHANNELS = ("value (scaled)", "series index", "seasonal position of the step (week-of-year or month; -1: none)")


# --------------------------------------------------------------------------- data
class WindowDataset(Dataset):
    """Forecasting windows held in memory: `x` float [N, 3, L] (channels `CHANNELS`), `y` float
    [N, H] (the next H scaled values), `starts` long [N] (index in the whole series of each
    window's first lookback step). Batches are fetched whole, so `clbench.datasets.collate` gives a
    `Batch(x, y)` with float targets (`InMemoryDataset` would cast them to long)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, starts: torch.Tensor):
        if not (len(x) == len(y) == len(starts)):
            raise ValueError(f"{len(x)} inputs, {len(y)} targets and {len(starts)} starts")
        self.x, self.y, self.starts = x.float(), y.float(), starts.long()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]

    def __getitems__(self, indices: Sequence[int]):
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.x[idx], self.y[idx]

    @property
    def targets(self) -> torch.Tensor:
        return self.y


def make_windows(values: np.ndarray, season: np.ndarray, series: int, start: int, stop: int,
                 lookback: int, horizon: int) -> WindowDataset:
    """Every window lying entirely inside `[start, stop)` of a (scaled) series: lookback
    `values[t:t+L]`, target `values[t+L:t+L+H]`, for t = start .. stop-L-H."""
    n = stop - start - lookback - horizon + 1
    if n < 1:
        raise UsageError(f"a part of {stop - start} steps holds no window of lookback {lookback} + horizon {horizon}; "
                         f"expected at least {lookback + horizon} steps")
    t = np.arange(start, start + n)[:, None]
    past, future = t + np.arange(lookback)[None, :], t + lookback + np.arange(horizon)[None, :]
    x = np.stack([values[past], np.full(past.shape, float(series)), season[past].astype(float)], axis=1)
    return WindowDataset(torch.tensor(x, dtype=torch.float32), torch.tensor(values[future], dtype=torch.float32),
                         torch.tensor(t[:, 0]))


def split_part(start: int, stop: int, test_fraction: float, horizon: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Chronological split of `[start, stop)`: ((train start, train stop), (test start, test stop)),
    with `horizon` unused steps between the two."""
    n = stop - start
    n_test = int(round(test_fraction * n))
    n_train = n - n_test - horizon
    return (start, start + n_train), (start + n_train + horizon, stop)


# --------------------------------------------------------------------------- scenario
@dataclass
class ForecastScenario(Scenario):
    """A stream of forecasting experiences; `num_classes` is 0 and each experience has no classes."""

    task_type: ClassVar[str] = "forecasting"

    lookback: int = 0
    horizon: int = 0
    stream: str = "segment-incremental"  # or domain-incremental
    scaler: str = ""  # the scaler policy, in words
    # per experience: the scaler's standard deviation, so original-scale MSE = MSE * scale**2
    scales: list[float] = field(default_factory=list)
    num_series: int = 1
    season_slots: int = 0  # size of the seasonal-position vocabulary (0: no sub-year timestamps)
    series_names: list[str] = field(default_factory=list)  # per experience

    def describe(self) -> dict:
        return {
            **super().describe(),
            "task_type": self.task_type,
            "stream": self.stream,
            "lookback": self.lookback,
            "horizon": self.horizon,
            "channels": list(CHANNELS),
            "scaler": self.scaler,
            "scales": self.scales,
            "num_series": self.num_series,
            "season_slots": self.season_slots,
            "series": self.series_names,
            "split": "chronological per experience: train windows, a gap of `horizon` steps, test windows; "
                     "experiences in time order, never shuffled",
        }


def forecast_scenario(name: str, train_sets: list[WindowDataset], test_sets: list[WindowDataset], *, lookback: int,
                      horizon: int, **kw) -> ForecastScenario:
    t = len(train_sets)
    return ForecastScenario(
        name=name, num_classes=0, class_order=[], increments=[0] * t, train_sets=train_sets, test_sets=test_sets,
        input_shape=(len(CHANNELS), lookback), default_backbone="none", lookback=lookback, horizon=horizon, **kw,  # type: ignore[arg-type]
    )


def _statsmodels(dataset: str):
    import importlib

    try:
        return importlib.import_module(f"statsmodels.datasets.{dataset}")
    except ImportError:
        raise UsageError("forecasting scenarios need statsmodels; expected it installed: pip install 'clbench[forecast]'") from None


# --------------------------------------------------------------------------- CO2 in eras
CO2_ERAS, CO2_LOOKBACK, CO2_HORIZON, CO2_TEST_FRACTION = 4, 52, 4, 0.2


def load_co2() -> tuple[np.ndarray, np.ndarray, int]:
    """(weekly values with the missing weeks filled by linear interpolation, week-of-year 0..52, count filled)."""
    data = _statsmodels("co2").load_pandas().data["co2"]
    missing = int(data.isna().sum())
    values = data.interpolate(method="linear", limit_direction="both").to_numpy(dtype=float)
    week = ((data.index.dayofyear.to_numpy() - 1) // 7).astype(int)
    return values, week, missing


@register_scenario("co2-4")
def co2_4(options: ScenarioOptions) -> ForecastScenario:
    """Mauna Loa weekly CO2 (statsmodels) in 4 consecutive eras, segment-incremental forecasting, L=52, H=4."""
    values, week, missing = load_co2()
    era = len(values) // CO2_ERAS
    parts = [split_part(i * era, (i + 1) * era, CO2_TEST_FRACTION, CO2_HORIZON) for i in range(CO2_ERAS)]
    (a, b), _ = parts[0]
    mean, std = float(values[a:b].mean()), float(values[a:b].std())
    scaled = (values - mean) / std
    train = [make_windows(scaled, week, 0, *tr, CO2_LOOKBACK, CO2_HORIZON) for tr, _ in parts]
    test = [make_windows(scaled, week, 0, *te, CO2_LOOKBACK, CO2_HORIZON) for _, te in parts]
    return forecast_scenario(
        "co2-4", train, test, lookback=CO2_LOOKBACK, horizon=CO2_HORIZON, stream="segment-incremental",
        scaler=f"z-score fit on experience 1's training part (mean {mean:.3f}, std {std:.3f} ppm), applied to every experience",
        scales=[std] * CO2_ERAS, num_series=1, season_slots=53, series_names=["co2"] * CO2_ERAS,
        meta={"source": "statsmodels.datasets.co2 (weekly, 1958-03-29 to 2001-12-29)",
              "missing_values": f"{missing} missing weeks filled by linear interpolation between neighbours",
              "eras": [[int(i * era), int((i + 1) * era)] for i in range(CO2_ERAS)],
              "test_fraction": CO2_TEST_FRACTION, "units": "ppm"},
    )


# --------------------------------------------------------------------------- different series
DOMAINS_LOOKBACK, DOMAINS_HORIZON, DOMAINS_TEST_FRACTION = 12, 3, 0.3


def load_domains() -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, values, seasonal position) of sunspots, nile, elnino and elec_equip, in that order;
    yearly series have no seasonal position (-1), monthly ones the month 0..11."""
    sunspots = _statsmodels("sunspots").load_pandas().data["SUNACTIVITY"].to_numpy(dtype=float)
    nile = _statsmodels("nile").load_pandas().data["volume"].to_numpy(dtype=float)
    elnino = _statsmodels("elnino").load_pandas().data.drop(columns="YEAR").to_numpy(dtype=float).reshape(-1)  # year by year, Jan..Dec
    equip = _statsmodels("elec_equip").load_pandas().data
    return [
        ("sunspots", sunspots, np.full(len(sunspots), -1)),
        ("nile", nile, np.full(len(nile), -1)),
        ("elnino", elnino, np.arange(len(elnino)) % 12),
        ("elec_equip", equip.iloc[:, 0].to_numpy(dtype=float), equip.index.month.to_numpy() - 1),
    ]


@register_scenario("ts-domains-4")
def ts_domains_4(options: ScenarioOptions) -> ForecastScenario:
    """Four statsmodels series in turn (sunspots, nile, elnino, elec_equip), domain-incremental forecasting, L=12, H=3."""
    train, test, scales, names = [], [], [], []
    for i, (name, values, season) in enumerate(load_domains()):
        if np.isnan(values).any():
            raise UsageError(f"series {name!r} holds missing values; expected a complete series")
        tr, te = split_part(0, len(values), DOMAINS_TEST_FRACTION, DOMAINS_HORIZON)
        mean, std = float(values[tr[0]:tr[1]].mean()), float(values[tr[0]:tr[1]].std())
        scaled = (values - mean) / std
        train.append(make_windows(scaled, season, i, *tr, DOMAINS_LOOKBACK, DOMAINS_HORIZON))
        test.append(make_windows(scaled, season, i, *te, DOMAINS_LOOKBACK, DOMAINS_HORIZON))
        scales.append(std)
        names.append(name)
    return forecast_scenario(
        "ts-domains-4", train, test, lookback=DOMAINS_LOOKBACK, horizon=DOMAINS_HORIZON, stream="domain-incremental",
        scaler="z-score per series, fit on that series' own training part", scales=scales, num_series=len(names),
        season_slots=12, series_names=names,
        meta={"source": "statsmodels.datasets sunspots (yearly), nile (yearly), elnino (monthly, flattened Jan..Dec "
                        "year by year), elec_equip (monthly)",
              "test_fraction": DOMAINS_TEST_FRACTION},
    )


# --------------------------------------------------------------------------- variables added over time
MACRO_VARIABLES = ("infl", "unemp", "tbilrate", "realint")
MACRO_LOOKBACK, MACRO_HORIZON, MACRO_TEST_FRACTION = 8, 2, 0.3


def load_macro() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The four variables of `MACRO_VARIABLES` (levels, quarterly) and the quarter 0..3 of each step."""
    data = _statsmodels("macrodata").load_pandas().data
    return {v: data[v].to_numpy(dtype=float) for v in MACRO_VARIABLES}, data["quarter"].to_numpy(dtype=int) - 1


@register_scenario("macro-vars-4")
def macro_vars_4(options: ScenarioOptions) -> ForecastScenario:
    """US quarterly macro panel (statsmodels), one more variable per experience, variable-incremental forecasting, L=8, H=2."""
    variables, quarter = load_macro()
    steps = len(quarter)
    tr, te = split_part(0, steps, MACRO_TEST_FRACTION, MACRO_HORIZON)  # one timeline for every variable
    train, test, scales = [], [], []
    for i, name in enumerate(MACRO_VARIABLES):
        values = variables[name]
        mean, std = float(values[tr[0]:tr[1]].mean()), float(values[tr[0]:tr[1]].std())
        scaled = (values - mean) / std
        train.append(make_windows(scaled, quarter, i, *tr, MACRO_LOOKBACK, MACRO_HORIZON))
        test.append(make_windows(scaled, quarter, i, *te, MACRO_LOOKBACK, MACRO_HORIZON))
        scales.append(std)
    return forecast_scenario(
        "macro-vars-4", train, test, lookback=MACRO_LOOKBACK, horizon=MACRO_HORIZON, stream="variable-incremental",
        scaler="z-score per variable, fit on that variable's own training part", scales=scales,
        num_series=len(MACRO_VARIABLES), season_slots=4, series_names=list(MACRO_VARIABLES),
        meta={"source": "statsmodels.datasets.macrodata (quarterly, 1959Q1 to 2009Q3)",
              "variables": "infl: inflation (%), unemp: unemployment rate (%), tbilrate: 3-month T-bill rate (%), "
                           "realint: real interest rate (%)",
              "timeline": f"steps {tr[0]}-{tr[1]} train, {te[0]}-{te[1]} test, for every variable",
              "test_fraction": MACRO_TEST_FRACTION},
    )
