"""Task types: classification, detection, forecasting (see `clbench.tasks.base.Task`)."""

from __future__ import annotations

from clbench.errors import UsageError
from clbench.tasks.base import Column, Task
from clbench.tasks.classification import ClassificationTask
from clbench.tasks.detection import DetectionTask
from clbench.tasks.forecasting import ForecastingTask

TASKS: dict[str, Task] = {t.name: t for t in (ClassificationTask(), DetectionTask(), ForecastingTask())}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UsageError(f"task type {name!r} is unknown; expected one of {', '.join(TASKS)}")
    return TASKS[name]


def task_of(result) -> Task:
    """The task of a stored result; results written before task types were recorded are
    recognised by the record they carry."""
    name = (result.scenario_info or {}).get("task_type")
    if name is None:
        name = "forecasting" if result.forecasting else "detection" if result.detection else "classification"
    return get_task(name)


__all__ = ["Column", "Task", "TASKS", "get_task", "task_of"]
