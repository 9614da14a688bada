"""The notebooks run top to bottom against the results fixture, and are committed without outputs."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
FIXTURE = Path(__file__).parent / "fixtures" / "sweep"
NAMES = ["leaderboard.ipynb", "accuracy_efficiency.ipynb"]


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


def run_notebook(name: str, monkeypatch) -> "nbformat.NotebookNode":
    monkeypatch.setenv("CLBENCH_RESULTS", str(FIXTURE))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()
    return nb


def outputs(nb, kind: str) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if kind in o.get("data", {})]


def test_leaderboard_notebook_shows_the_table(monkeypatch):
    from clbench.reporting import leaderboard, render

    nb = run_notebook("leaderboard.ipynb", monkeypatch)
    (table,) = outputs(nb, "text/markdown")
    assert table["data"]["text/markdown"] == render.to_markdown(leaderboard.from_dir(FIXTURE))
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "final_avg_acc" in printed and "higher is better" in printed and "(best)" in printed


def test_accuracy_efficiency_notebook_draws_every_plot(monkeypatch):
    from clbench.reporting import leaderboard

    nb = run_notebook("accuracy_efficiency.ipynb", monkeypatch)
    images = outputs(nb, "image/png")
    scenarios = leaderboard.from_dir(FIXTURE).scenarios()
    # per scenario: the curves, one row of heatmaps, one row of Pareto plots
    assert len(images) == 3 * len(scenarios)
    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
