"""Optional log mirrors: wandb through Lightning's own `WandbLogger` (never Avalanche's).

The result JSON stays the source of truth; wandb receives a copy.  One wandb run spans
the whole CL run: every experience and phase gets a fresh Trainer whose step counter
starts at 0, so the logger adds `CLStrategy.global_step_offset` (steps taken in earlier
fits) to keep a single, increasing global step.

When each experience ends (`log_experience`) its row of the accuracy matrix, the mean over the
experiences seen so far and the task's summary metrics so far are logged, so charts grow while
the run trains and a run that crashes keeps what it finished.  At the end (`log_result`) the
accuracy matrix (unseen cells blank) and the per-experience edge records go in as tables, the
accuracy heatmap and curve as images, and the metrics, edge totals (the Jetson estimate among
them) and the strategy report into the run summary.  As everywhere else in clbench, accuracies
are in % and experiences are numbered from 1.
Offline mode (`WANDB_MODE=offline`) needs no network; the run lands in `$WANDB_DIR/wandb/`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from clbench.errors import UsageError


def require_wandb():
    try:
        import wandb
    except ImportError:
        raise UsageError("--wandb needs the wandb package, which is not installed; pip install 'clbench[wandb]'") from None
    if os.environ.get("WANDB_MODE", "").lower() not in ("offline", "disabled", "dryrun") and not _has_wandb_login():
        raise UsageError("--wandb found no W&B login (no WANDB_API_KEY, no api.wandb.ai entry in ~/.netrc); expected "
                         "`wandb login` first, or WANDB_MODE=offline to log to local files")
    return wandb


def _has_wandb_login() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    try:
        return "api.wandb.ai" in netrc.read_text(errors="ignore")
    except OSError:
        return False


def _wandb_logger_class():
    from pytorch_lightning.loggers import WandbLogger

    class ContinualWandbLogger(WandbLogger):
        """Lightning's WandbLogger whose step keeps counting across the run's many Trainers."""

        step_offset: int = 0

        def log_metrics(self, metrics, step=None):
            super().log_metrics(metrics, None if step is None else step + self.step_offset)

    return ContinualWandbLogger


class GlobalStep(pl.Callback):
    """Before each fit, hands the strategy's step offset to the wandb logger and logs where the run is."""

    def on_fit_start(self, trainer, pl_module) -> None:
        offset = getattr(pl_module, "global_step_offset", 0)
        for lg in trainer.loggers:
            if hasattr(lg, "step_offset"):
                lg.step_offset = offset
                exp = pl_module.experience
                lg.log_metrics({"experience": exp.index + 1 if exp is not None else 0}, step=0)


def wandb_logger(project: str, spec, run_cfg, strategy_cfg, backbone: str):
    """A logger for the whole run, with the resolved configuration as the wandb config."""
    require_wandb()
    from clbench.config import to_dict

    aux = "".join(f"+{n}" for n, _ in spec.aux)
    logger = _wandb_logger_class()(
        project=project,
        name=f"{spec.strategy}{aux}-{spec.scenario}-seed{spec.seed}",
        group=f"{spec.strategy}{aux}-{spec.scenario}",
        save_dir=os.environ.get("WANDB_DIR") or ".",
        tags=[spec.strategy, spec.scenario],
        log_model=False,
    )
    logger.log_hyperparams(
        {
            "strategy": spec.strategy,
            "scenario": spec.scenario,
            "seed": spec.seed,
            "backbone": backbone,
            "aux": [{"name": n, **p} for n, p in spec.aux],
            "paper_settings": spec.paper_settings,
            "strategy_config": to_dict(strategy_cfg),
            "run_config": to_dict(run_cfg),
        }
    )
    return logger


def experience_metrics(result, index: int) -> dict[str, Any]:
    """What is logged when experience `index` (0-based) ends: its number (1-based), its row of the accuracy
    matrix on the experiences seen so far and their mean (%), and the task's metric columns computed on
    the rows so far, as the leaderboard shows them (accuracies in %)."""
    from clbench.engine.progress import experience_row, summary_so_far

    out: dict[str, Any] = {"experience": index + 1}
    row = experience_row(result, index)
    if row is not None:
        out.update({f"accuracy/exp_{j + 1}": v for j, v in enumerate(row)})
        out["accuracy/seen_avg"] = sum(row) / len(row)
    out.update({f"metrics/{column.key}": value for column, value in summary_so_far(result)})
    records = result.edge.get("per_experience") or []
    record = records[index] if index < len(records) else {}
    out.update({f"edge/{k}": record[k] for k in EDGE_PER_EXPERIENCE if isinstance(record.get(k), (int, float))})
    jetson = record.get("jetson")
    if isinstance(jetson, dict) and isinstance(jetson.get("time_s"), (int, float)):
        out["edge/jetson_time_s"] = jetson["time_s"]
    return out


# the per-experience costs charted live (all of them are in the final edge table)
EDGE_PER_EXPERIENCE = ("train_time_s", "samples_per_s", "train_flops_exp", "peak_memory_bytes")


def log_experience(logger, result, index: int, strategy=None) -> None:
    """Log experience `index`'s metrics now, at the run's global step (rank 0 only: Lightning's logger
    hands the other ranks a stand-in experiment that drops what it is given)."""
    step = int(getattr(strategy, "global_step_offset", 0) or 0)
    logger.experiment.log({**experience_metrics(result, index), "trainer/global_step": max(step - 1, 0)})


def matrix_rows(matrix) -> list[list[Any]]:
    """`[after_experience, exp_1, ...]` rows in %, 1-based; cells of experiences not yet seen are None."""
    return [[i + 1, *(100.0 * v if j <= i else None for j, v in enumerate(row))] for i, row in enumerate(matrix)]


def log_result(logger, result) -> None:
    """Accuracy matrix and edge records as tables, the heatmap and accuracy curve as images, metrics, totals
    and the strategy report in the summary; then close the run."""
    wandb = require_wandb()
    run = logger.experiment
    n = len(result.accuracy_matrix[0]) if result.accuracy_matrix else 0
    matrix = wandb.Table(
        columns=["after_experience"] + [f"exp_{j + 1}" for j in range(n)],
        data=matrix_rows(result.accuracy_matrix),
        allow_mixed_types=True,
    )
    records = result.edge.get("per_experience") or []
    keys = sorted({k for r in records for k, v in r.items() if _scalar(v)})
    keys = [k for k in keys if k != "experience"]  # the profiler's own index is 0-based: numbered from 1 here
    edge = wandb.Table(columns=["experience", *keys], data=[[i + 1, *(r.get(k) for k in keys)] for i, r in enumerate(records)])
    run.log({"accuracy_matrix": matrix, "edge_per_experience": edge, **_images(wandb, result)})
    summary: dict[str, Any] = {"status": result.status}
    from clbench.tasks import task_of

    percent = task_of(result).plots_accuracy_matrix  # the summary metrics are of an accuracy matrix: in %
    summary.update({f"metrics/{k}": 100.0 * v if percent and isinstance(v, (int, float)) else v
                    for k, v in result.metrics.items()})
    from clbench.engine.progress import summary_so_far

    # the task's leaderboard columns as shown there (forecasting keeps its errors in its own record)
    summary.update({f"metrics/{column.key}": value for column, value in summary_so_far(result)})
    totals = result.edge.get("totals") or {}
    summary.update({f"edge/{k}": v for k, v in totals.items() if _scalar(v)})
    if isinstance(totals.get("jetson"), dict):
        summary["edge/jetson"] = _string_keys(totals["jetson"])
    summary["strategy_report"] = _string_keys(result.strategy_report or {})
    if result.error:
        summary["error"] = result.error
    run.summary.update(summary)
    run.finish(exit_code=0 if result.status == "completed" else 1)


def _images(wandb, result) -> dict[str, Any]:
    """The heatmap of the run's per-experience matrix and, for a complete run, its curve on the experiences
    seen so far, drawn by `clbench.reporting.plots` (which knows each task's score: accuracy, AP, MSE)."""
    from clbench.reporting import plots
    from clbench.tasks import task_of

    matrix = plots.score_matrix(result)
    if matrix is None or not len(matrix):
        return {}
    score = plots.score_of([result])
    title = f"{plots.label(result)} on {result.scenario}"
    images = {"accuracy_heatmap": wandb.Image(plots.accuracy_heatmap(matrix, title=title, score=score).figure)}
    if task_of(result).is_complete(result):
        images["accuracy_curve"] = wandb.Image(plots.accuracy_curves([result], title=title).figure)
    return images


def _string_keys(value):
    """A nested record as the result JSON stores it (wandb's summary takes string keys only: a per-class
    or per-experience dict keyed by int gets its keys as the JSON file writes them)."""
    if isinstance(value, dict):
        return {str(k): _string_keys(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_string_keys(v) for v in value]
    return value


def _scalar(v) -> bool:
    return v is None or isinstance(v, (int, float, str, bool))
