"""Plots: Pareto frontier arithmetic, what each plot draws, and `clbench plot` output files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from clbench.cli import main
from clbench.reporting import leaderboard as L
from clbench.reporting import plots
from clbench.metrics import summarise
from clbench.reporting.results import RunResult

FIXTURE = Path(__file__).parent / "fixtures" / "sweep"
PNG = b"\x89PNG\r\n\x1a\n"


def make_result(strategy, seed, R, **totals):
    r = RunResult(strategy, "toy-3", "mlp", seed, status="completed")
    r.accuracy_matrix = [list(row) for row in R]
    r.scenario_info = {"num_experiences": len(R[0])}
    r.metrics = summarise(r.accuracy_matrix)
    r.edge = {"per_experience": [], "totals": totals}
    return r


def test_pareto_front_by_hand():
    # (cost, score): (1, .5) kept; (2, .4) beaten by the cheaper (1, .5); (3, .8) kept; (4, .8) no better
    assert plots.pareto_front([1, 2, 3, 4], [0.5, 0.4, 0.8, 0.8]) == [0, 2]
    assert plots.pareto_front([1, 1], [0.3, 0.5]) == [1]  # same cost: only the better one
    assert plots.pareto_front([5, 1, 3], [0.9, 0.1, 0.5]) == [1, 2, 0]  # returned by rising cost
    assert plots.pareto_front([], []) == []


def test_seen_accuracy_curve_and_mean_matrix():
    R = [[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.3, 0.6, 0.9]]
    assert plots.seen_accuracy_curve(R) == pytest.approx([1.0, 0.7, 0.6])
    a, b = make_result("x", 0, R), make_result("x", 1, np.array(R) / 2)
    assert plots.mean_matrix([a, b]) == pytest.approx(np.array(R) * 0.75)


def test_accuracy_curves_draw_the_mean_over_seeds():
    runs = [
        make_result("er", 0, [[1.0, 0.0], [0.8, 1.0]]),
        make_result("er", 1, [[1.0, 0.0], [0.6, 1.0]]),
        make_result("naive", 0, [[1.0, 0.0], [0.0, 1.0]]),
    ]
    ax = plots.accuracy_curves(runs)
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"er (n=2)", "naive (n=1)"}
    assert lines["er (n=2)"].get_ydata() == pytest.approx([100.0, 85.0])  # mean of 90 and 80 after exp 2
    assert lines["naive (n=1)"].get_ydata() == pytest.approx([100.0, 50.0])
    assert len(ax.collections) == 1  # a ± std band only where there are several seeds


def test_heatmap_blanks_unseen_cells_and_labels_seen_ones():
    R = [[0.9, 0.0, 0.0], [0.5, 0.8, 0.0], [0.2, 0.4, 0.7]]
    ax = plots.accuracy_heatmap(R)
    data = ax.get_images()[0].get_array()
    assert data.mask.tolist() == [[False, True, True], [False, False, True], [False, False, False]]
    assert sorted(t.get_text() for t in ax.texts) == sorted(["90", "50", "80", "20", "40", "70"])


def test_pareto_plot_draws_the_frontier_through_undominated_rows():
    runs = [
        make_result("cheap", 0, [[1.0, 0.0], [0.5, 0.5]], train_flops_total=1e6),  # acc .5
        make_result("worse", 0, [[1.0, 0.0], [0.4, 0.4]], train_flops_total=2e6),  # dominated by cheap
        make_result("best", 0, [[1.0, 0.0], [0.9, 0.9]], train_flops_total=5e6),  # acc .9
    ]
    ax = plots.pareto_plot(L.build(runs), "train_flops_total")
    (frontier,) = [line for line in ax.get_lines() if line.get_label() == "Pareto frontier"]
    assert list(frontier.get_xdata()) == [1e6, 5e6]
    assert list(frontier.get_ydata()) == pytest.approx([50.0, 90.0])
    assert ax.get_xscale() == "log"
    with pytest.raises(ValueError, match="no row"):
        plots.pareto_plot(L.build(runs), "jetson_time_measured_s")


def test_cli_plot_writes_readable_pngs(tmp_path, capsys):
    out = tmp_path / "plots"
    assert main(["plot", str(FIXTURE), "--out", str(out), "--scenario", "synthetic-5"]) == 0
    written = sorted(p.name for p in out.glob("*.png"))
    printed = sorted(Path(line).name for line in capsys.readouterr().out.split())
    assert written == printed
    assert "synthetic-5_curves.png" in written
    strategies = {r.strategy for r in L.from_dir(FIXTURE, "synthetic-5").rows}
    assert {f"synthetic-5_heatmap_{s}.png" for s in strategies} <= set(written)
    assert "synthetic-5_pareto_train_time_s.png" in written
    if any(r.cells["train_flops_total"].mean for r in L.from_dir(FIXTURE).rows):
        assert "synthetic-5_pareto_train_flops_total.png" in written
    for name in written:
        data = (out / name).read_bytes()
        assert data[:8] == PNG and len(data) > 10_000


def test_cli_plot_with_only_failed_runs_says_so(tmp_path, capsys):
    failed = next(p for p in FIXTURE.rglob("*.json") if '"status": "failed"' in p.read_text())
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / failed.name).write_text(failed.read_text())
    assert main(["plot", str(tmp_path / "r"), "--out", str(tmp_path / "p")]) == 1
    assert "no completed run" in capsys.readouterr().err


def test_quantized_runs_get_their_accuracy_vs_size_frontier():
    def quantized(strategy, acc, size):
        r = make_result(strategy, 0, [[1.0, 0.0], [0.9, 0.9]], train_time_s=1.0)
        r.aux = [{"name": "quantize"}]
        r.aux_results = {"quantize": [{"experience": 1, "mode": "ptq", "avg_acc": acc, "delta_acc": 0.9 - acc,
                                       "size_bytes": size}]}
        return r

    runs = [quantized("w4", 0.8, 2048), quantized("w2", 0.5, 1024), quantized("w3", 0.4, 1536)]
    stems = [stem for stem, _, _ in plots.figures(runs)]
    assert "toy-3_pareto_quantized" in stems
    ax = plots.pareto_plot(L.build(runs), "quantized_size_bytes", metric="quantized_acc")
    (frontier,) = [line for line in ax.get_lines() if line.get_label() == "Pareto frontier"]
    assert list(frontier.get_xdata()) == [1.0, 2.0] and list(frontier.get_ydata()) == pytest.approx([50.0, 80.0])
    assert "toy-3_pareto_quantized" not in [s for s, _, _ in plots.figures([make_result("a", 0, [[1.0, 0.0], [0.5, 0.5]])])]
