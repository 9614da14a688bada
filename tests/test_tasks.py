"""Task types: the runner and the reports ask the task, and results stored by earlier versions
still load.

`tests/fixtures/legacy/` holds one result of each task type written by clbench before the
core was regrouped into engine / reporting / models / tasks (one-epoch runs of `er` on
digits-5, `gfl_finetune` on shapes-2+2 and `stella_mlp` on co2-4).
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from clbench.errors import UsageError
from clbench.reporting import leaderboard as L
from clbench.reporting import plots, render
from clbench.reporting.report import print_result
from clbench.reporting.results import load
from clbench.tasks import TASKS, get_task, task_of

LEGACY = Path(__file__).parent / "fixtures" / "legacy"
FILES = {
    "classification": LEGACY / "digits-5" / "er" / "clbench_mlp-seed0-cpu.json",
    "detection": LEGACY / "shapes-2+2" / "gfl_finetune" / "tiny_gfl-seed0-cpu.json",
    "forecasting": LEGACY / "co2-4" / "stella_mlp" / "stella_like_mlp-seed0-cpu.json",
}


@pytest.mark.parametrize("task", sorted(FILES))
def test_a_stored_result_of_each_task_loads_complete(task):
    r = load(FILES[task])
    assert task_of(r).name == task
    assert L.is_complete(r)


def test_results_without_a_recorded_task_type_are_recognised_by_their_record():
    r = load(FILES["forecasting"])
    r.scenario_info = {k: v for k, v in r.scenario_info.items() if k != "task_type"}
    assert task_of(r).name == "forecasting"
    d = load(FILES["detection"])
    d.scenario_info = {k: v for k, v in d.scenario_info.items() if k != "task_type"}
    assert task_of(d).name == "detection"


def test_the_leaderboard_shows_each_task_only_its_own_metric_columns():
    board = L.from_dir(LEGACY)
    rows = {row.task: row for row in board.rows}
    assert set(rows) == {"classification", "detection", "forecasting"}
    cls, det, fc = rows["classification"], rows["detection"], rows["forecasting"]
    # the accuracy columns read classification runs only: a detection run's AP matrix is not "accuracy"
    assert cls.cells["final_avg_acc"].mean == pytest.approx(load(FILES["classification"]).metrics["final_avg_acc"])
    assert det.cells["final_avg_acc"].mean is None and fc.cells["final_avg_acc"].mean is None
    per_task = load(FILES["detection"]).detection["per_task"]
    assert det.cells["final_ap_all"].mean == pytest.approx(per_task[-1]["all"])
    assert det.cells["forgetting_ap"].mean == pytest.approx(load(FILES["detection"]).metrics["forgetting_max"])
    stored = load(FILES["forecasting"]).forecasting["metrics"]["mse"]
    assert fc.cells["final_mse"].mean == pytest.approx(stored["final_avg_error"])
    assert cls.cells["final_mse"].mean is None and det.cells["final_mse"].mean is None
    # costs are common to every task
    assert all(row.cells["train_time_s"].mean is not None for row in board.rows)
    md = render.to_markdown(board)
    assert "Final AP all" in md and "Final MSE" in md and "Final acc" in md


def test_figures_of_each_task_use_its_own_headline():
    results = [load(p) for p in FILES.values()]
    stems = {stem: caption for stem, caption, _ in plots.figures(results)}
    assert "digits-5_curves" in stems and "shapes-2+2_curves" in stems
    assert "co2-4_curves" not in stems  # errors, not accuracies: no accuracy curve
    assert stems["co2-4_pareto_train_flops_total"].startswith("Final MSE vs")
    assert stems["shapes-2+2_pareto_train_flops_total"].startswith("Final AP all vs")
    assert stems["digits-5_pareto_train_flops_total"].startswith("Final accuracy vs")


@pytest.mark.parametrize("task, heading", [("classification", "accuracy matrix (%)"),
                                           ("detection", "per-task mean AP (AP50, %) matrix"),
                                           ("forecasting", "MSE matrix (scaled values, lower is better)")])
def test_the_terminal_summary_prints_the_task_matrix(task, heading):
    out = io.StringIO()
    print_result(load(FILES[task]), file=out)
    assert heading in out.getvalue()


def test_every_task_declares_what_the_reports_need():
    for name, task in TASKS.items():
        assert task.name == name
        keys = [c.key for c in task.columns()]
        assert task.headline in keys, f"{name}: headline {task.headline!r} is none of its columns"
        assert len(keys) == len(set(keys))
    all_keys = [c.key for t in TASKS.values() for c in t.columns()]
    assert len(all_keys) == len(set(all_keys)), "two tasks declare the same column key"


def test_an_unknown_task_type_is_a_usage_error():
    with pytest.raises(UsageError, match="task type 'segmentation' is unknown; expected one of classification"):
        get_task("segmentation")
