"""`Task`: what the runner and the reports ask of one kind of learning problem.

clbench runs three kinds: classification, detection and forecasting. Each differs in how its
model is built for a scenario, how a trained model is scored after an experience, what the
result file records, which metric columns a leaderboard shows (and which way is better) and
what the terminal summary prints. The engine and the reports ask the scenario's or the
result's task for these and never branch on the task's name; a fourth kind is one more
module in this package.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

if TYPE_CHECKING:
    from torch import nn

    from clbench.types import ExperienceInfo


@dataclass(frozen=True)
class Column:
    """A leaderboard column: how to read its value from a stored result, and how to show it."""

    key: str
    title: str
    higher_is_better: bool
    get: Callable[[Any], Any]
    scale: float = 1.0  # displayed value = stored value * scale
    fmt: str = ".2f"
    unit: str = ""
    count: bool = False  # integer counts: no "± 0" when every seed agrees


class Task:
    """The base task; subclasses override what differs from classification."""

    name: ClassVar[str] = "task"
    # what the per-experience matrix holds, for titles and the terminal ("accuracy", "MSE", ...)
    matrix_name: ClassVar[str] = "accuracy"
    # the leaderboard key figures and Pareto plots use as the method's score
    headline: ClassVar[str] = "final_avg_acc"
    # whether accuracy curves and heatmaps of `result.accuracy_matrix` apply
    plots_accuracy_matrix: ClassVar[bool] = True
    # whether strategies of this task build their own model from their Config (no --backbone)
    builds_own_model: ClassVar[bool] = False

    # ------------------------------------------------------------------ a run
    def build_model(self, strategy_cls, scenario, run_cfg, cfg) -> tuple["nn.Module | None", str, Any]:
        """(backbone or None, the model's name for the result, the strategy Config bound to the scenario)."""
        raise NotImplementedError

    def start(self, result, strategy, scenario, loaders: Sequence, device) -> None:
        """Record what the untrained model scores before the first experience."""

    def after_experience(self, result, strategy, info: "ExperienceInfo", scenario, loaders: Sequence, device) -> None:
        """Score the model after experience `info` and append it to `result`."""
        raise NotImplementedError

    def finish(self, result) -> None:
        """Summary metrics of a completed run."""

    # ------------------------------------------------------------------ reports
    def columns(self) -> list[Column]:
        """This task's own metric columns (costs are common to every task)."""
        return []

    def rows_recorded(self, result) -> int:
        return len(result.accuracy_matrix)

    def is_complete(self, result) -> bool:
        """Completed, with a row for every experience and its summary metrics."""
        expected = result.scenario_info.get("num_experiences")
        rows = self.rows_recorded(result)
        return (result.status == "completed" and rows > 0 and (expected is None or rows == expected)
                and self.has_summary(result))

    def has_summary(self, result) -> bool:
        return bool(result.metrics)

    def print_matrix(self, result, out) -> None:
        """The per-experience matrix for the terminal."""
        raise NotImplementedError
