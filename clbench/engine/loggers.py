"""Optional log mirrors: wandb through Lightning's own `WandbLogger` (never Avalanche's).

The result JSON stays the source of truth; wandb receives a copy.  One wandb run spans
the whole CL run: every experience and phase gets a fresh Trainer whose step counter
starts at 0, so the logger adds `CLStrategy.global_step_offset` (steps taken in earlier
fits) to keep a single, increasing global step.  At the end the accuracy matrix and the
per-experience edge records go in as tables and the metrics into the run summary.
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
                lg.log_metrics({"experience": exp.index if exp is not None else -1}, step=0)


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


def log_result(logger, result) -> None:
    """Accuracy matrix and edge records as tables, metrics and totals in the summary; then close the run."""
    wandb = require_wandb()
    run = logger.experiment
    n = len(result.accuracy_matrix[0]) if result.accuracy_matrix else 0
    matrix = wandb.Table(
        columns=["after_experience"] + [f"exp_{j + 1}" for j in range(n)],
        data=[[i + 1, *row] for i, row in enumerate(result.accuracy_matrix)],
    )
    records = result.edge.get("per_experience") or []
    keys = sorted({k for r in records for k, v in r.items() if _scalar(v)})
    edge = wandb.Table(columns=keys, data=[[r.get(k) for k in keys] for r in records])
    run.log({"accuracy_matrix": matrix, "edge_per_experience": edge})
    summary: dict[str, Any] = {"status": result.status}
    summary.update({f"metrics/{k}": v for k, v in result.metrics.items()})
    summary.update({f"edge/{k}": v for k, v in (result.edge.get("totals") or {}).items() if _scalar(v)})
    run.summary.update(summary)
    run.finish(exit_code=0 if result.status == "completed" else 1)


def _scalar(v) -> bool:
    return v is None or isinstance(v, (int, float, str, bool))
