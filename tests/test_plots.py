"""Plots: Pareto frontier arithmetic, what each plot draws, one look per strategy, error bars, axis labels
per task, and `clbench plot` output files (formats, dpi)."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from clbench.cli import main
from clbench.reporting import leaderboard as L
from clbench.reporting import plots
from clbench.metrics import summarise
from clbench.reporting.results import RunResult

FIXTURE = Path(__file__).parent / "fixtures" / "sweep"
LEGACY = Path(__file__).parent / "fixtures" / "legacy"
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


# --------------------------------------------------------------------------- a mixed folder: every task
@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mixed") / "results"
    shutil.copytree(LEGACY, root)
    shutil.copytree(FIXTURE, root, dirs_exist_ok=True)
    return root


@pytest.fixture(scope="module")
def mixed_figures(mixed):
    loaded = L.load_results(mixed)
    return loaded.results, {stem: fig for stem, _, fig in plots.figures(loaded.results)}


def colours_of(fig, name: str) -> set[str]:
    """The colours a figure gives `name`: its lines, error-bar points and bars labelled with it."""
    from matplotlib.colors import to_hex

    ax = fig.axes[0]
    found = set()
    for line in ax.get_lines():
        if line.get_label() in (name, f"{name} (n=1)", f"{name} (n=2)"):
            found.add(to_hex(line.get_color()))
    for container in ax.containers:
        if container.get_label() in (name, f"{name} (n=1)", f"{name} (n=2)"):
            artist = container[0] if not hasattr(container, "patches") else container.patches[0]
            found.add(to_hex(artist.get_color() if hasattr(artist, "get_marker") else artist.get_facecolor()))
    handles, labels = ax.get_legend_handles_labels()
    legend = ax.get_legend()
    for h, text in zip(legend.legend_handles if legend else [], legend.get_texts() if legend else []):
        if text.get_text() in (name, f"{name} (n=1)", f"{name} (n=2)") and hasattr(h, "get_color"):
            found.add(to_hex(h.get_color()))
    return found


def test_a_strategy_has_one_colour_and_marker_in_every_figure(mixed_figures):
    results, figs = mixed_figures
    palette = plots.Palette.of(results)
    assert palette.labels == sorted({plots.label(r) for r in results})
    er = palette["er"]
    checked = 0
    for stem, fig in figs.items():
        if "_heatmap_" in stem:
            continue
        found = colours_of(fig, "er")
        if stem.startswith(("digits-5", "synthetic-")):
            assert found == {er.color}, stem
            checked += 1
    assert checked >= 12  # curves, forgetting, old/new and the Pareto plots of three scenarios
    # the marker follows the strategy too: curves and Pareto points of two scenarios
    markers = {line.get_marker() for stem in ("synthetic-5_curves", "synthetic-2_curves")
               for line in figs[stem].axes[0].get_lines() if line.get_label().startswith("er ")}
    markers |= {c[0].get_marker() for stem in ("synthetic-5_pareto_train_time_s", "digits-5_pareto_train_flops_total")
                for c in figs[stem].axes[0].containers if c.get_label() == "er"}
    assert markers == {er.marker}
    # every label of the folder a different colour (tab10: up to 10 labels)
    assert len({palette[n].color for n in palette.labels}) == len(palette.labels)
    # a palette from another subset of the folder gives the same strategy the same look only when built
    # from the whole folder, which is what `clbench plot --scenario` does
    assert plots.Palette.of(results)["naive"] == palette["naive"]


def test_palette_past_ten_labels_uses_tab20_and_repeats_no_style():
    labels = [f"s{k:02d}" for k in range(14)]
    palette = plots.Palette(labels)
    styles = [palette[n] for n in labels]
    assert len(set(styles)) == 14 and len({s.color for s in styles}) == 14
    assert palette["unknown"] not in styles[:14]


def lower_ends(ax) -> list[float]:
    """The lowest y of every error bar (vertical segments) and shaded band of an axes."""
    from matplotlib.collections import LineCollection, PolyCollection

    ends = []
    for c in ax.collections:
        if isinstance(c, LineCollection):
            for seg in c.get_segments():
                ends.append(float(np.min(np.asarray(seg)[:, 1])))
        elif isinstance(c, PolyCollection):
            for path in c.get_paths():
                ends.append(float(np.min(path.vertices[:, 1])))
    return ends


def left_ends(ax) -> list[float]:
    from matplotlib.collections import LineCollection

    return [float(np.min(np.asarray(seg)[:, 0])) for c in ax.collections if isinstance(c, LineCollection)
            for seg in c.get_segments()]


def test_no_error_bar_or_band_goes_below_zero():
    # seeds that spread more than their mean: accuracy 2% and 40%, wall time 0.1 s and 20 s
    runs = [make_result("wild", 0, [[0.04, 0.0], [0.02, 0.02]], train_time_s=0.1, peak_memory_bytes=2**20),
            make_result("wild", 1, [[0.9, 0.0], [0.4, 0.4]], train_time_s=20.0, peak_memory_bytes=40 * 2**20),
            make_result("calm", 0, [[1.0, 0.0], [0.5, 0.5]], train_time_s=5.0, peak_memory_bytes=2**20)]
    board = L.build(runs)
    for cost in ("train_time_s", "peak_memory_bytes"):
        ax = plots.pareto_plot(board, cost)
        assert lower_ends(ax) and min(lower_ends(ax)) >= 0
        assert min(left_ends(ax)) >= 0
    ax = plots.pareto_plot(board, "train_time_s")
    assert ax.get_xscale() == "log"
    ax = plots.accuracy_curves(runs)
    assert min(lower_ends(ax)) >= 0  # the ± std band of "wild"
    ax = plots.forgetting_bars(runs)
    assert min(lower_ends(ax)) >= 0


def test_the_jetson_band_is_the_error_bar_of_the_estimate():
    jetson = {"time_s": 2.0, "low_s": 1.5, "high_s": 3.0, "source": "estimated:jetson-orin-nx-16gb:MAXN:x"}
    runs = [make_result("er", 0, [[1.0, 0.0], [0.5, 0.5]], jetson=jetson)]
    ax = plots.pareto_plot(L.build(runs), "jetson_time_estimated_s")
    (segment,) = [seg for c in ax.collections for seg in c.get_segments() if np.ptp(np.asarray(seg)[:, 0]) > 0]
    assert sorted(np.asarray(segment)[:, 0]) == pytest.approx([1.5, 3.0])
    assert ax.get_xscale() == "log"


def test_axis_labels_name_each_tasks_metric_and_unit(mixed_figures):
    _, figs = mixed_figures

    def ylabel(stem):
        return figs[stem].axes[0].get_ylabel()

    assert ylabel("digits-5_pareto_train_flops_total") == "Final acc (%, higher is better)"
    assert ylabel("shapes-2+2_pareto_train_flops_total") == "Final AP50 all (%, higher is better)"
    assert ylabel("co2-4_pareto_train_flops_total") == "Final MSE (lower is better)"
    assert ylabel("digits-5_curves") == "accuracy on seen experiences (%)"
    assert ylabel("shapes-2+2_curves") == "per-task mean AP50 on seen experiences (%)"
    assert ylabel("co2-4_mse_curves") == "MSE on seen experiences (scaled values, lower is better)"
    assert ylabel("shapes-2+2_old_new") == "mean AP50 over old / new classes (%)"
    assert ylabel("digits-5_forgetting") == "forgetting of accuracy (pp, lower is better)"
    assert ylabel("co2-4_mse_forgetting") == "forgetting of MSE (scaled values, lower is better)"
    assert figs["digits-5_pareto_train_time_s"].axes[0].get_xlabel() == "wall time (s, lower is better)"
    assert figs["co2-4_pareto_peak_memory_bytes"].axes[0].get_xlabel() == "peak memory (KiB, lower is better)"
    colorbar = figs["shapes-2+2_heatmap_gfl_finetune"].axes[1].get_ylabel()
    assert colorbar == "per-task mean AP50 (%)"
    assert figs["co2-4_mse_heatmap_stella_mlp"].axes[1].get_ylabel() == "MSE (scaled values, lower is better)"
    assert not any("accuracy" in ylabel(s) for s in figs if s.startswith(("co2-4", "shapes-2+2")))


def test_mse_heatmap_shows_every_cell_and_old_new_follows_the_records(mixed_figures):
    results, figs = mixed_figures
    image = figs["co2-4_mse_heatmap_stella_mlp"].axes[0].get_images()[0].get_array()
    assert not np.ma.getmaskarray(image).any()  # forecasting scores every experience after each one
    (det,) = [r for r in results if r.scenario == "shapes-2+2"]
    old, new = plots.old_new_curves(det)
    assert np.isnan(old[0]) and old[1] == det.detection["per_task"][1]["old"]
    assert list(new) == [t["new"] for t in det.detection["per_task"]]
    R = [[0.9, 0.0, 0.0], [0.5, 0.8, 0.0], [0.2, 0.4, 0.7]]
    old, new = plots.old_new_curves(make_result("x", 0, R))
    assert np.isnan(old[0]) and old[1:] == pytest.approx([0.5, 0.3]) and new == pytest.approx([0.9, 0.8, 0.7])
    assert plots.forgetting_per_experience(R) == pytest.approx([0.7, 0.4])
    assert plots.forgetting_per_experience([[1.0, 3.0], [2.0, 1.0]], higher_is_better=False) == pytest.approx([1.0])


def test_point_labels_do_not_overlap():
    # five rows crowded at nearly the same cost and accuracy
    runs = [make_result(f"strategy_{k}", 0, [[1.0, 0.0], [0.5 + k / 200, 0.5]], train_flops_total=1e6 * (1 + k / 50))
            for k in range(5)]
    ax = plots.pareto_plot(L.build(runs), "train_flops_total")
    renderer = ax.figure.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax.texts if t.get_text().startswith("strategy_")]
    assert boxes
    for i, a in enumerate(boxes):
        assert all(not a.overlaps(b) for b in boxes[i + 1:])


def test_classes_seen_on_the_x_axis():
    runs = [make_result("er", 0, [[1.0, 0.0], [0.8, 1.0]])]
    runs[0].scenario_info["increments"] = [5, 3]
    ax = plots.accuracy_curves(runs, x="classes")
    assert list(ax.get_lines()[0].get_xdata()) == [5, 8] and ax.get_xlabel() == "classes seen"


def png_size(data: bytes) -> tuple[int, int]:
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("fmt, magic", [("pdf", b"%PDF-"), ("svg", b"<svg")])
def test_cli_plot_writes_pdf_and_svg(tmp_path, capsys, fmt, magic):
    out = tmp_path / fmt
    assert main(["plot", str(FIXTURE), "--out", str(out), "--scenario", "synthetic-2", "--format", fmt]) == 0
    written = sorted(out.iterdir())
    assert written and all(p.suffix == f".{fmt}" for p in written)
    for path in written:
        data = path.read_bytes()
        assert len(data) > 5_000
        assert data.startswith(magic) if fmt == "pdf" else magic in data[:1000]


def test_cli_plot_dpi_scales_the_png(tmp_path):
    sizes = {}
    for dpi in (100, 200):
        out = tmp_path / str(dpi)
        assert main(["plot", str(FIXTURE), "--out", str(out), "--scenario", "synthetic-2", "--dpi", str(dpi)]) == 0
        sizes[dpi] = png_size((out / "synthetic-2_curves.png").read_bytes())
    assert sizes[100] == (640, 440)  # the 6.4 x 4.4 inch figure
    assert sizes[200] == (2 * sizes[100][0], 2 * sizes[100][1])
    assert main(["plot", str(FIXTURE), "--out", str(tmp_path / "x"), "--format", "jpg"]) == 2
    assert main(["plot", str(FIXTURE), "--out", str(tmp_path / "x"), "--dpi", "0"]) == 2
