"""Continual-learning metrics over an accuracy matrix (pure functions).

`R[i][j]` is the accuracy on the test set of experience `j` after training on
experience `i` (rows: after each experience; columns: every test experience, seen or
not).  `T` is the number of experiences.  Every function returns a float in the
matrix's units (accuracy in [0, 1]); metrics undefined for one experience return NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np


def _matrix(R) -> np.ndarray:
    m = np.asarray(R, dtype=float)
    if m.ndim != 2 or m.shape[0] > m.shape[1]:
        raise ValueError(f"accuracy matrix must be (rows <= experiences) x experiences, got shape {m.shape}")
    return m


def final_average_accuracy(R) -> float:
    """Mean over all experiences of the accuracy after the last one: mean_j R[T-1, j]."""
    m = _matrix(R)
    t = m.shape[0]
    return float(m[t - 1, :t].mean())


def average_incremental_accuracy(R) -> float:
    """Mean over steps i of the average accuracy on experiences seen so far: mean_i mean_{j<=i} R[i, j]."""
    m = _matrix(R)
    return float(np.mean([m[i, : i + 1].mean() for i in range(m.shape[0])]))


def forgetting_max(R) -> float:
    """Mammoth/PILOT forgetting: mean_{j<T-1} ( max_{i<T-1} R[i, j] - R[T-1, j] )."""
    m = _matrix(R)
    t = m.shape[0]
    if t < 2:
        return math.nan
    return float(np.mean([m[j : t - 1, j].max() - m[t - 1, j] for j in range(t - 1)]))


def forgetting_diag(R) -> float:
    """Avalanche forgetting: mean_{j<T-1} ( R[j, j] - R[T-1, j] ), the drop since each experience was learned."""
    m = _matrix(R)
    t = m.shape[0]
    if t < 2:
        return math.nan
    return float(np.mean([m[j, j] - m[t - 1, j] for j in range(t - 1)]))


def backward_transfer(R) -> float:
    """BWT (Lopez-Paz & Ranzato 2017): mean_{j<T-1} ( R[T-1, j] - R[j, j] ) = -forgetting_diag."""
    m = _matrix(R)
    t = m.shape[0]
    if t < 2:
        return math.nan
    return float(np.mean([m[t - 1, j] - m[j, j] for j in range(t - 1)]))


def forward_transfer(R, initial: Sequence[float]) -> float:
    """FWT (Lopez-Paz & Ranzato 2017): mean_{j>0} ( R[j-1, j] - b_j ), b = accuracies of the untrained model.

    In class-incremental evaluation the classes of experience j are masked out before it
    is learned, so R[j-1, j] = 0 and FWT is 0 - b_j by construction.
    """
    m = _matrix(R)
    t = m.shape[0]
    if t < 2:
        return math.nan
    b = np.asarray(initial, dtype=float)
    return float(np.mean([m[j - 1, j] - b[j] for j in range(1, t)]))


def plasticity(R) -> float:
    """Mean of the diagonal: accuracy on each experience right after learning it."""
    m = _matrix(R)
    return float(np.mean([m[i, i] for i in range(m.shape[0])]))


@dataclass(frozen=True)
class MetricSpec:
    name: str
    fn: Callable
    higher_is_better: bool
    description: str


METRICS: dict[str, MetricSpec] = {
    m.name: m
    for m in [
        MetricSpec("final_avg_acc", final_average_accuracy, True, "mean accuracy over all experiences after the last"),
        MetricSpec("avg_incremental_acc", average_incremental_accuracy, True, "mean over steps of accuracy on seen experiences"),
        MetricSpec("forgetting_max", forgetting_max, False, "max-minus-last forgetting (Mammoth/PILOT)"),
        MetricSpec("forgetting_diag", forgetting_diag, False, "diagonal-minus-last forgetting (Avalanche)"),
        MetricSpec("bwt", backward_transfer, True, "backward transfer"),
        MetricSpec("plasticity", plasticity, True, "mean accuracy right after learning each experience"),
    ]
}
FWT = MetricSpec("fwt", forward_transfer, True, "forward transfer against the untrained model")


def summarise(R, initial: Sequence[float] | None = None) -> dict[str, float]:
    out = {name: spec.fn(R) for name, spec in METRICS.items()}
    if initial is not None:
        out["fwt"] = forward_transfer(R, initial)
    return out
