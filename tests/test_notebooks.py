"""The notebooks run top to bottom on a mixed results folder (every task type, a failed run) and on a folder
with one task type only, and are committed without outputs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
FIXTURES = Path(__file__).parent / "fixtures"
NAMES = ["leaderboard.ipynb", "accuracy_efficiency.ipynb"]
TASK_SECTIONS = ["Classification", "Detection", "Forecasting"]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    """tests/fixtures/legacy (classification, detection, forecasting) and tests/fixtures/sweep (classification,
    with a failed run) in one folder."""
    root = tmp_path_factory.mktemp("mixed") / "results"
    shutil.copytree(FIXTURES / "legacy", root)
    shutil.copytree(FIXTURES / "sweep", root, dirs_exist_ok=True)
    return root


@pytest.mark.parametrize("name", NAMES)
def test_committed_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)
    assert nb.metadata.kernelspec.name == "python3"
    # thin: the notebooks call clbench, they do not re-implement tables or plots
    source = "\n".join(c.source for c in code)
    assert "from clbench." in source and "def " not in source
    # each task type in its own section
    headings = [c.source.splitlines()[0] for c in nb.cells if c.cell_type == "markdown"]
    assert [h for h in headings if h.lstrip("# ") in TASK_SECTIONS] == [f"## {t}" for t in TASK_SECTIONS]


def run_notebook(name: str, results: Path, monkeypatch) -> "nbformat.NotebookNode":
    monkeypatch.setenv("CLBENCH_RESULTS", str(results))
    monkeypatch.delenv("CLBENCH_SCENARIO", raising=False)
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()
    return nb


def outputs(cell, kind: str) -> list:
    return [o for o in cell.outputs if kind in o.get("data", {})]


def sections(nb) -> dict[str, list]:
    """Task heading -> the code cells under it."""
    out, current = {}, None
    for c in nb.cells:
        if c.cell_type == "markdown":
            heading = c.source.splitlines()[0].lstrip("# ")
            current = heading if heading in TASK_SECTIONS else None
        elif current:
            out.setdefault(current, []).append(c)
    return out


def printed(cells) -> str:
    return "".join(o.get("text", "") for c in cells if c.cell_type == "code" for o in c.outputs)


def no_errors(nb) -> bool:
    return not [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]


def test_leaderboard_notebook_has_a_section_per_task_on_a_mixed_folder(mixed, monkeypatch):
    from clbench.reporting import leaderboard, plots, render

    nb = run_notebook("leaderboard.ipynb", mixed, monkeypatch)
    assert no_errors(nb)
    parts = sections(nb)
    loaded = leaderboard.load_results(mixed)
    for task, runs in plots.by_task(loaded.results).items():
        (table,) = [o for c in parts[task.capitalize()] for o in outputs(c, "text/markdown")]
        paths = [p for r, p in zip(loaded.results, loaded.paths) if r in runs]
        assert table["data"]["text/markdown"] == render.to_markdown(leaderboard.build(runs, paths))
    assert "Final acc (%) ↑" in printed(parts["Classification"]) and "(best)" in printed(parts["Classification"])
    assert "Final AP all (%) ↑" in printed(parts["Detection"])
    assert "Final MSE ↓" in printed(parts["Forecasting"]) and "lower is better" in printed(parts["Forecasting"])
    assert "final_avg_acc" in printed(nb.cells) and "higher is better" in printed(nb.cells)


def test_accuracy_efficiency_notebook_draws_each_tasks_figures_on_a_mixed_folder(mixed, monkeypatch):
    from clbench.reporting import leaderboard, plots

    nb = run_notebook("accuracy_efficiency.ipynb", mixed, monkeypatch)
    assert no_errors(nb)
    parts = sections(nb)
    loaded = leaderboard.load_results(mixed)
    board = leaderboard.build(loaded.results, loaded.paths)
    for task, runs in plots.by_task(loaded.results).items():
        images = [o for c in parts[task.capitalize()] for o in outputs(c, "image/png")]
        expected = list(plots.figures(runs, board, heatmaps="grid"))
        assert images and len(images) == len(expected), task
    forecasting = [o for c in parts["Forecasting"] for o in outputs(c, "image/png")]
    assert len(forecasting) >= 4  # MSE curves, MSE matrices, forgetting, old vs new, then the Pareto plots


def test_a_missing_task_is_skipped_with_a_sentence(monkeypatch):
    results = FIXTURES / "sweep"  # classification only
    for name in NAMES:
        nb = run_notebook(name, results, monkeypatch)
        assert no_errors(nb)
        parts = sections(nb)
        for task in ("Detection", "Forecasting"):
            assert f"No {task.lower()} results in {results}: this section is skipped." in printed(parts[task])
            assert not [o for c in parts[task] for o in c.outputs if "image/png" in o.get("data", {})]
