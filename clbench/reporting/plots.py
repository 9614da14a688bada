"""Accuracy and efficiency plots from stored results (matplotlib, no display needed).

Every function draws on an `Axes` it is given (or on a new headless `Figure`) and
returns the axes, so notebooks, the HTML leaderboard and `clbench plot` share them:

- `accuracy_curves`: average accuracy on the experiences seen so far, after each
  experience, one line per strategy (mean over seeds, band = ± std);
- `accuracy_heatmap`: the accuracy matrix R[i, j] (mean over seeds), unseen cells blank;
- `pareto_plot`: final accuracy against a cost (training FLOPs, peak memory, wall or
  Jetson time), one point per leaderboard row, with the Pareto frontier drawn.
"""

from __future__ import annotations

import base64
import io
import sys
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from clbench.errors import UsageError
from clbench.reporting import leaderboard as L
from clbench.reporting.results import RunResult
from clbench.tasks import task_of

# cost column -> (axis label, log scale)
COSTS: dict[str, tuple[str, bool]] = {
    "train_flops_total": ("training FLOPs", True),
    "peak_memory_bytes": ("peak memory (MiB)", False),
    "train_time_s": ("wall time (s)", False),
    "jetson_time_estimated_s": ("Jetson training time, estimated (s)", False),
    "jetson_time_measured_s": ("Jetson training time, measured (s)", False),
}
# costs plotted against another metric than the final accuracy (see `figures`)
OTHER_COSTS: dict[str, tuple[str, bool]] = {"quantized_size_bytes": ("quantized model size (KiB)", False)}


def new_axes(figsize=(6.4, 4.4)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig.add_subplot()


def label(r: RunResult) -> str:
    addons = L.addons_label(r)
    return r.strategy + (f"+{addons}" if addons else "")


def seen_accuracy_curve(matrix: Sequence[Sequence[float]]) -> np.ndarray:
    """After experience i: the mean of R[i, 0..i] (accuracy on what has been seen so far)."""
    m = np.asarray(matrix, dtype=float)
    return np.array([m[i, : i + 1].mean() for i in range(m.shape[0])])


def _complete_by_label(results: Sequence[RunResult]) -> dict[str, list[RunResult]]:
    groups: dict[str, list[RunResult]] = {}
    for r in results:
        if L.is_complete(r) and task_of(r).plots_accuracy_matrix:
            groups.setdefault(label(r), []).append(r)
    return dict(sorted(groups.items()))


def _one_scenario(results: Sequence[RunResult], what: str) -> str:
    scenarios = sorted({r.scenario for r in results})
    if len(scenarios) != 1:
        raise ValueError(f"{what} needs results of one scenario, got {scenarios or 'none'}")
    return scenarios[0]


def accuracy_curves(results: Sequence[RunResult], ax=None, title: str | None = None):
    """One line per strategy (mean over seeds, shaded ± std) of accuracy on seen experiences."""
    ax = ax if ax is not None else new_axes()
    scenario = _one_scenario(results, "accuracy_curves")
    for name, runs in _complete_by_label(results).items():
        curves = np.stack([seen_accuracy_curve(r.accuracy_matrix) for r in runs]) * 100
        x = np.arange(1, curves.shape[1] + 1)
        mean = curves.mean(axis=0)
        (line,) = ax.plot(x, mean, marker="o", label=f"{name} (n={len(runs)})")
        if len(runs) > 1:
            std = curves.std(axis=0, ddof=1)
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("after training experience")
    ax.set_ylabel("accuracy on seen experiences (%)")
    ax.set_ylim(0, 101)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(title or f"Accuracy per experience — {scenario}")
    return ax


def mean_matrix(results: Sequence[RunResult]) -> np.ndarray:
    """Element-wise mean of the runs' accuracy matrices (all the same shape)."""
    mats = [np.asarray(r.accuracy_matrix, dtype=float) for r in results if r.accuracy_matrix]
    if not mats or len({m.shape for m in mats}) != 1:
        raise ValueError(f"need accuracy matrices of one shape, got {[m.shape for m in mats] or 'none'}")
    return np.mean(mats, axis=0)


def accuracy_heatmap(matrix: Sequence[Sequence[float]], ax=None, title: str | None = None):
    """R[i, j] in %: rows are 'after experience i', columns 'tested on experience j'; j > i left blank."""
    ax = ax if ax is not None else new_axes(figsize=(5.2, 4.4))
    m = np.asarray(matrix, dtype=float) * 100
    rows, cols = m.shape
    seen = np.arange(cols)[None, :] <= np.arange(rows)[:, None]
    shown = np.ma.masked_where(~seen, m)
    image = ax.imshow(shown, cmap="viridis", vmin=0, vmax=100)
    ax.figure.colorbar(image, ax=ax, label="accuracy (%)")
    if rows * cols <= 144:  # numbers stay legible up to 12 x 12
        for i in range(rows):
            for j in range(i + 1):
                ax.text(j, i, f"{m[i, j]:.0f}", ha="center", va="center", fontsize=8, color="white" if m[i, j] < 60 else "black")
    ax.set_xticks(range(cols), [str(j + 1) for j in range(cols)])
    ax.set_yticks(range(rows), [str(i + 1) for i in range(rows)])
    ax.set_xlabel("tested on experience")
    ax.set_ylabel("after training experience")
    ax.set_title(title or "Accuracy matrix")
    return ax


def pareto_front(costs: Sequence[float], scores: Sequence[float]) -> list[int]:
    """Indices of the points no other point beats (lower or equal cost and higher score), by rising cost."""
    order = sorted(range(len(costs)), key=lambda i: (costs[i], -scores[i]))
    front, best = [], -np.inf
    for i in order:
        if scores[i] > best:
            front.append(i)
            best = scores[i]
    return front


def pareto_plot(
    board: L.Leaderboard, cost: str = "train_flops_total", metric: str = "final_avg_acc", ax=None, title=None
):
    """One point per leaderboard row (error bars = ± std over seeds); the frontier as a step line."""
    if cost not in COSTS and cost not in OTHER_COSTS:
        raise ValueError(f"cost {cost!r} is unknown; expected one of {', '.join([*COSTS, *OTHER_COSTS])}")
    ax = ax if ax is not None else new_axes()
    scenario = _one_scenario(board.rows, "pareto_plot")
    cost_col, metric_col = L.COLUMN_BY_KEY[cost], L.COLUMN_BY_KEY[metric]
    rows = [r for r in board.rows if r.cells[cost].mean is not None and r.cells[metric].mean is not None]
    if not rows:
        raise ValueError(f"no row of {scenario} has both {cost} and {metric}")
    devices = {r.device for r in rows}
    xs = np.array([r.cells[cost].mean * cost_col.scale for r in rows])
    ys = np.array([r.cells[metric].mean * metric_col.scale for r in rows])
    xerr = np.array([(r.cells[cost].std or 0) * cost_col.scale for r in rows])
    yerr = np.array([(r.cells[metric].std or 0) * metric_col.scale for r in rows])
    front = pareto_front(list(xs), list(ys) if metric_col.higher_is_better else list(-ys))
    for k, r in enumerate(rows):
        name = r.label + (f" [{r.device}]" if len(devices) > 1 else "")
        ax.errorbar(xs[k], ys[k], xerr=xerr[k], yerr=yerr[k], fmt="o", capsize=3, label=name,
                    markeredgecolor="black" if k in front else "none")
        ax.annotate(name, (xs[k], ys[k]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    fx, fy = xs[front], ys[front]
    ax.plot(fx, fy, drawstyle="steps-post", color="black", linestyle="--", linewidth=1, label="Pareto frontier")
    label_text, log = {**COSTS, **OTHER_COSTS}[cost]
    if log and (xs > 0).all():
        ax.set_xscale("log")
    ax.set_xlabel(f"{label_text} (lower is better)")
    arrow = "higher" if metric_col.higher_is_better else "lower"
    ax.set_ylabel(f"{metric_col.title} ({metric_col.unit}, {arrow} is better)")
    ax.margins(0.12)  # room for the point labels at the edges
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    ax.set_title(title or f"Accuracy vs {label_text.split(' (')[0]} — {scenario}")
    return ax


# --------------------------------------------------------------------------- batches of figures
def figures(results: Sequence[RunResult], board: L.Leaderboard | None = None) -> Iterator[tuple[str, str, object]]:
    """(file stem, caption, Figure) for every plot the results support, scenario by scenario."""
    board = board or L.build(results)
    for scenario in sorted({r.scenario for r in results}):
        runs = [r for r in results if r.scenario == scenario]
        if not any(L.is_complete(r) for r in runs):
            continue
        task = task_of(next(r for r in runs if L.is_complete(r)))
        if task.plots_accuracy_matrix:
            ax = accuracy_curves(runs)
            yield f"{scenario}_curves", f"Accuracy per experience, {scenario}", ax.figure
        for name, group in _complete_by_label(runs).items():
            ax = accuracy_heatmap(mean_matrix(group), title=f"{name} — {scenario} (mean of {len(group)})")
            yield f"{scenario}_heatmap_{_stem(name)}", f"Accuracy matrix of {name}, {scenario}", ax.figure
        sub = L.Leaderboard([r for r in board.rows if r.scenario == scenario], [], [])
        headline = L.COLUMN_BY_KEY[task.headline]
        for cost in COSTS:
            if sum(r.cells[cost].mean is not None for r in sub.rows) == 0:
                continue
            if headline.key != "final_avg_acc":  # pareto_plot reads the column's direction
                ax = pareto_plot(sub, cost, metric=headline.key, title=f"{headline.title} vs {COSTS[cost][0]} — {scenario}")
                yield f"{scenario}_pareto_{cost}", f"{headline.title} vs {COSTS[cost][0]}, {scenario}", ax.figure
                continue
            ax = pareto_plot(sub, cost)
            yield f"{scenario}_pareto_{cost}", f"Final accuracy vs {COSTS[cost][0]}, {scenario}", ax.figure
        if sum(r.cells["quantized_acc"].mean is not None and r.cells["quantized_size_bytes"].mean is not None
               for r in sub.rows):
            ax = pareto_plot(sub, "quantized_size_bytes", metric="quantized_acc",
                             title=f"Quantized accuracy vs model size — {scenario}")
            yield f"{scenario}_pareto_quantized", f"Quantized accuracy vs quantized model size, {scenario}", ax.figure


def _stem(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)


def png_bytes(fig, dpi: int = 110) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def embedded_figures(results: Sequence[RunResult], board: L.Leaderboard | None = None) -> list[tuple[str, str]]:
    """(caption, base64 PNG) of the curves and Pareto plots, for the self-contained HTML page."""
    return [
        (caption, base64.b64encode(png_bytes(fig, dpi=80)).decode("ascii"))
        for stem, caption, fig in figures(results, board)
        if "_heatmap_" not in stem  # one per strategy would swamp the page; `clbench plot` writes them
    ]


def save_all(results: Sequence[RunResult], out_dir: str | Path, board: L.Leaderboard | None = None) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, _, fig in figures(results, board):
        path = out / f"{stem}.png"
        path.write_bytes(png_bytes(fig))
        written.append(path)
    return written


def cmd_plot(args) -> int:
    loaded = L.load_results(args.results_dir, args.scenario)
    for path, why in loaded.skipped:
        print(f"clbench: warning: skipped {path}: {why}", file=sys.stderr)
    board = L.build(loaded.results, loaded.paths, loaded.skipped)
    try:
        written = save_all(loaded.results, args.out, board)
    except OSError as e:
        raise UsageError(f"--out {args.out!r} cannot be written ({e.strerror or e}); expected a writable "
                         f"directory") from None
    for path in written:
        print(path)
    if not written:
        print("clbench: warning: no completed run to plot", file=sys.stderr)
        return 1
    return 0
