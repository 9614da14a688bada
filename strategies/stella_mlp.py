"""STELLA-like lightweight forecaster, fine-tuned naively across experiences (the lower bound).

clbench's own baseline in the spirit of STELLA (Fu et al., NeurIPS 2025, arXiv 2408.09695:
position embeddings plus an MLP in place of Transformer layers, about 10k parameters). It is
not a reproduction: the STELLA code was not read, and layer sizes here are our choice.
1. Embed the history window with a Linear L -> d; add a learned series-ID embedding (the
   scenarios carry no coordinates, so no spatial Linear(2 -> d)) and, when the series has
   sub-year timestamps, a learned embedding of the last lookback step's week-of-year or
   month (yearly series have none: that term is skipped, a zero vector).
2. A 2-layer MLP block with a residual connection, then a Linear d -> H gives the forecast.
3. Train with MSE on each experience in turn, nothing kept from earlier ones.
`instance_norm=true` (a third scaler policy, RevIN-style without affine terms):
each window's lookback is standardised by its own mean and standard deviation before step 1,
and the forecast is mapped back with them, so shifting a window's values shifts its forecast
by the same amount.
Distillation add-ons (`--aux logit_mse`, `feature_kd`, `relation_kd`) distil the forecast and the
embedding h (the output Linear's input) of the snapshot taken after the previous experience.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from clbench.scenarios.forecast import CHANNELS, SEASON, SERIES, VALUE
from clbench.strategies._forecasting import ForecastConfig, ForecastStrategy
from torch import nn

from clbench.config import positive_integers
from clbench.registry import register_strategy


@dataclass(frozen=True)
class Config(ForecastConfig):
    d_model: int = 32
    hidden: int = 96  # the MLP's inner width (d=32, hidden=96: about 10k parameters on co2-4)
    instance_norm: bool = False

    def __post_init__(self):
        super().__post_init__()
        positive_integers(self, "d_model", "hidden")


@register_strategy("stella_mlp")
class StellaMLP(ForecastStrategy):
    """STELLA-like MLP forecaster (series-ID and seasonal embeddings, ~10k parameters), naive fine-tuning."""

    Config = Config
    model_name = "stella_like_mlp"
    input_channels = len(CHANNELS)  # it reads the values, the series index and the seasonal position
    features_at = "out"  # distillation add-ons' features: the embedding h [N, d] the output Linear reads

    def build_model(self) -> nn.Module:
        c = self.cfg
        return StellaLike(c.lookback, c.horizon, c.num_series, c.season_slots, c.d_model, c.hidden, c.instance_norm)


class StellaLike(nn.Module):
    """float [N, 3, L] (values, series index, seasonal position) -> float [N, H]."""

    EPS = 1e-5  # added to each window's variance

    def __init__(self, lookback: int, horizon: int, num_series: int, season_slots: int, d_model: int, hidden: int,
                 instance_norm: bool = False):
        super().__init__()
        self.instance_norm = instance_norm
        self.history = nn.Linear(lookback, d_model)
        self.series = nn.Embedding(max(num_series, 1), d_model)
        # row 0 stands for "no seasonal position" and stays zero
        self.season = nn.Embedding(season_slots + 1, d_model, padding_idx=0) if season_slots > 0 else None
        self.mlp = nn.Sequential(nn.Linear(d_model, hidden), nn.ReLU(), nn.Linear(hidden, d_model))
        self.out = nn.Linear(d_model, horizon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = x[:, VALUE]
        if self.instance_norm:
            mean = values.mean(dim=1, keepdim=True)
            std = (values.var(dim=1, unbiased=False, keepdim=True) + self.EPS).sqrt()
            values = (values - mean) / std
        h = self.history(values) + self.series(series_index(x, self.series.num_embeddings))
        if self.season is not None:
            h = h + self.season(season_index(x, self.season.num_embeddings))
        h = h + self.mlp(torch.relu(h))
        forecast = self.out(h)
        return forecast * std + mean if self.instance_norm else forecast


def series_index(x: torch.Tensor, n: int) -> torch.Tensor:
    return x[:, SERIES, -1].round().long().clamp(0, n - 1)


def season_index(x: torch.Tensor, n: int) -> torch.Tensor:
    """Seasonal position of the last lookback step, shifted by one (0: none)."""
    return (x[:, SEASON, -1].round().long() + 1).clamp(0, n - 1)
