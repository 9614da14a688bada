"""Figures from stored results (matplotlib, no display needed), fit for a paper.

Every function draws on an `Axes` it is given (or on a new headless `Figure`) and returns the
axes, so notebooks, the HTML leaderboard and `clbench plot` share them:

- `accuracy_curves`: the task's score (accuracy, per-task AP, or MSE for forecasting) on the
  experiences seen so far, after each experience (or over the number of classes seen), one line
  per strategy (mean over seeds, band = ± std, clipped to the score's range);
- `accuracy_heatmap`: the score matrix R[i, j] (mean over seeds); for accuracy and AP the
  unseen cells are blank, forecasting scores every experience after each one;
- `forgetting_bars`: per experience j < T-1, how much of its score was lost by the end;
- `old_new_plot`: after each experience, the score on the old experiences and on the newest
  (detection: its own old / new class AP);
- `pareto_plot`: the headline score against a cost (training FLOPs, peak memory, wall or Jetson
  time), one point per leaderboard row, with the Pareto frontier drawn.

One `Palette` (colour and marker per strategy label, from the sorted labels of the whole results
folder) is shared by every figure, so a strategy looks the same everywhere. Error bars never
cross zero (time and FLOPs are on log axes; bars are clipped at 0, percentages also at 100); the
Jetson estimate's band is its error bar. Point labels are placed where they overlap nothing, and
left to the legend when the plot is crowded.
"""

from __future__ import annotations

import base64
import io
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from clbench.errors import UsageError
from clbench.reporting import leaderboard as L
from clbench.reporting.results import RunResult
from clbench.tasks import TASKS, task_of

# cost column -> (axis label, log scale)
COSTS: dict[str, tuple[str, bool]] = {
    "train_flops_total": ("training FLOPs", True),
    "peak_memory_bytes": ("peak memory", False),
    "train_time_s": ("wall time", True),
    "jetson_time_estimated_s": ("Jetson training time, estimated", True),
    "jetson_time_measured_s": ("Jetson training time, measured", True),
}
# costs plotted against another metric than the final accuracy (see `figures`)
OTHER_COSTS: dict[str, tuple[str, bool]] = {"quantized_size_bytes": ("quantized model size", False)}
FORMATS = ("png", "pdf", "svg")
X_AXES = ("experiences", "classes")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")
MAX_POINT_LABELS = 10  # more points than this: the legend alone names them


def new_axes(figsize=(6.4, 4.4)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig.add_subplot()


def label(r: RunResult) -> str:
    addons = L.addons_label(r)
    return r.strategy + (f"+{addons}" if addons else "")


# --------------------------------------------------------------------------- one look per strategy
@dataclass(frozen=True)
class Style:
    color: str
    marker: str


class Palette:
    """Colour and marker per strategy label: the sorted labels get tab10 (tab20 past 10 labels) colours
    and a marker each, in order; a label it was not built with gets the next free style."""

    def __init__(self, labels: Sequence[str] = ()):
        self.labels: list[str] = sorted(set(labels))
        self._styles: dict[str, Style] = {}
        for name in self.labels:
            self._add(name)

    @classmethod
    def of(cls, results: Sequence[RunResult]) -> "Palette":
        """The palette of a whole results folder (every run, finished or not, so it does not shift)."""
        return cls([label(r) for r in results])

    def _add(self, name: str) -> Style:
        from matplotlib import colormaps
        from matplotlib.colors import to_hex

        k = len(self._styles)
        colors = colormaps["tab10" if max(len(self.labels), k + 1) <= 10 else "tab20"].colors
        style = Style(to_hex(colors[k % len(colors)]), MARKERS[k % len(MARKERS)])
        self._styles[name] = style
        return style

    def __getitem__(self, name: str) -> Style:
        return self._styles.get(name) or self._add(name)


# --------------------------------------------------------------------------- what a task's matrix holds
@dataclass(frozen=True)
class Score:
    """What a task's per-experience matrix holds, as the figures show it."""

    name: str  # "accuracy", "per-task mean AP50", "MSE"
    unit: str  # "%" or ""
    scale: float  # shown value = stored value * scale
    higher_is_better: bool
    every_cell: bool  # every test experience is scored after each experience (not only the seen ones)
    note: str = ""  # "scaled values"
    fmt: str = ".0f"

    @property
    def better(self) -> str:
        return f"{'higher' if self.higher_is_better else 'lower'} is better"

    def axis(self, what: str) -> str:
        """`accuracy on seen experiences (%)`, `MSE on seen experiences (scaled values, lower is better)`."""
        extra = ", ".join(p for p in (self.unit, self.note, self.better if not self.higher_is_better else "") if p)
        return f"{what} ({extra})" if extra else what

    @property
    def upper(self) -> float:
        return 100.0 if self.unit == "%" else math.inf


def _common(values) -> str | None:
    found = sorted({v for v in values if v})
    return found[0] if len(found) == 1 else ("/".join(found) if found else None)


def score_of(runs: Sequence[RunResult]) -> Score:
    """The score of these runs' task (the first run's), its name completed by the runs' records
    (`detection.metric`: AP50 or AP; `forecasting.metric`: mse)."""
    task = task_of(runs[0])
    if task.plots_accuracy_matrix:
        ap = _common((r.detection or {}).get("metric") for r in runs)
        name = task.matrix_name.replace("AP", ap) if ap else task.matrix_name
        return Score(name, "%", 100.0, True, False)
    metric = _common((r.forecasting or {}).get("metric") for r in runs) or "mse"
    return Score(metric.upper(), "", 1.0, False, True, "scaled values", ".3g")


def score_matrix(r: RunResult) -> np.ndarray | None:
    """The run's per-experience matrix as stored (accuracy / AP fractions, forecasting's MSE), or None."""
    if task_of(r).plots_accuracy_matrix:
        m = r.accuracy_matrix
    else:
        record = r.forecasting or {}
        m = record.get(f"{record.get('metric', 'mse')}_matrix")
    return np.asarray(m, dtype=float) if m else None


def _has_matrix(r: RunResult) -> bool:
    return L.is_complete(r) and score_matrix(r) is not None


def seen_accuracy_curve(matrix: Sequence[Sequence[float]]) -> np.ndarray:
    """After experience i: the mean of R[i, 0..i] (the score on what has been seen so far)."""
    m = np.asarray(matrix, dtype=float)
    return np.array([m[i, : i + 1].mean() for i in range(m.shape[0])])


def old_new_curves(r: RunResult) -> tuple[np.ndarray, np.ndarray]:
    """(old, new) after each experience: the mean of R[i, 0..i-1] (NaN after the first) and R[i, i]; a
    detection record's own per-task `old` / `new` AP (means over classes) where the result has one."""
    per_task = (r.detection or {}).get("per_task") or []
    if per_task and all("old" in t and "new" in t for t in per_task):
        old = np.array([np.nan if t["old"] is None else t["old"] for t in per_task], dtype=float)
        new = np.array([np.nan if t["new"] is None else t["new"] for t in per_task], dtype=float)
        old[0] = np.nan
        return old, new
    m = score_matrix(r)
    old = np.array([m[i, :i].mean() if i else np.nan for i in range(m.shape[0])])
    return old, np.array([m[i, i] for i in range(m.shape[0])])


def forgetting_per_experience(matrix, higher_is_better: bool = True) -> np.ndarray:
    """f_j for j < T-1: the best score on j before the last experience minus the last one (higher is
    better), or the last error minus the lowest before it (lower is better); positive: it forgot."""
    m = np.asarray(matrix, dtype=float)
    t = m.shape[0]
    if higher_is_better:
        return np.array([m[j : t - 1, j].max() - m[t - 1, j] for j in range(t - 1)])
    return np.array([m[t - 1, j] - m[j : t - 1, j].min() for j in range(t - 1)])


def _complete_by_label(results: Sequence[RunResult]) -> dict[str, list[RunResult]]:
    groups: dict[str, list[RunResult]] = {}
    for r in results:
        if _has_matrix(r):
            groups.setdefault(label(r), []).append(r)
    return dict(sorted(groups.items()))


def _one_scenario(results: Sequence, what: str) -> str:
    scenarios = sorted({r.scenario for r in results})
    if len(scenarios) != 1:
        raise ValueError(f"{what} needs results of one scenario, got {scenarios or 'none'}")
    return scenarios[0]


def by_task(results: Sequence[RunResult]) -> dict[str, list[RunResult]]:
    """Every task type (in `clbench.tasks.TASKS` order) -> its results; a task without results maps to []."""
    out: dict[str, list[RunResult]] = {name: [] for name in TASKS}
    for r in results:
        out.setdefault(task_of(r).name, []).append(r)
    return out


def _x_values(runs: Sequence[RunResult], n: int, x: str) -> tuple[np.ndarray, str]:
    """Positions of experiences 1..n on the x axis: their index, or the number of classes seen after them."""
    if x not in X_AXES:
        raise ValueError(f"x {x!r} is unknown; expected one of {', '.join(X_AXES)}")
    if x == "classes":
        increments = (runs[0].scenario_info or {}).get("increments") or []
        if len(increments) >= n and sum(increments[:n]) > 0:
            return np.cumsum(increments[:n]).astype(float), "classes seen"
    return np.arange(1, n + 1, dtype=float), "after training experience"


def _clip(low, high, lo_bound=0.0, hi_bound=math.inf):
    return np.clip(low, lo_bound, hi_bound), np.clip(high, lo_bound, hi_bound)


# --------------------------------------------------------------------------- curves, matrices, forgetting
def _matrix_groups(results: Sequence[RunResult], what: str) -> tuple[str, dict[str, list[RunResult]]]:
    """(the one scenario of `results`, its completed runs with a per-experience matrix by label)."""
    scenario = _one_scenario(results, what)
    groups = _complete_by_label(results)
    if not groups:
        raise ValueError(f"no completed run of {scenario} has a per-experience matrix")
    return scenario, groups


def accuracy_curves(results: Sequence[RunResult], ax=None, title: str | None = None, x: str = "experiences",
                    styles: Palette | None = None):
    """One line per strategy (mean over seeds, shaded ± std, clipped to the score's range) of the task's
    score on the experiences seen so far; `x="classes"` puts the number of classes seen on the x axis."""
    ax = ax if ax is not None else new_axes()
    scenario, groups = _matrix_groups(results, "accuracy_curves")
    score = score_of([r for g in groups.values() for r in g])
    styles = styles or Palette(groups)
    for name, runs in groups.items():
        curves = np.stack([seen_accuracy_curve(score_matrix(r)) for r in runs]) * score.scale
        xs, xlabel = _x_values(runs, curves.shape[1], x)
        mean = curves.mean(axis=0)
        style = styles[name]
        ax.plot(xs, mean, marker=style.marker, color=style.color, label=f"{name} (n={len(runs)})", clip_on=False)
        if len(runs) > 1:
            std = curves.std(axis=0, ddof=1)
            low, high = _clip(mean - std, mean + std, 0.0, score.upper)
            ax.fill_between(xs, low, high, color=style.color, alpha=0.2, linewidth=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(score.axis(f"{score.name} on seen experiences"))
    if score.unit == "%":
        ax.set_ylim(0, 101)
    else:
        ax.set_ylim(bottom=0)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    what = score.name if score.unit == "%" else score.name
    ax.set_title(title or f"{what[:1].upper()}{what[1:]} per experience — {scenario}")
    return ax


def mean_matrix(results: Sequence[RunResult]) -> np.ndarray:
    """Element-wise mean of the runs' matrices (accuracy, AP or MSE; all the same shape)."""
    mats = [m for r in results if (m := score_matrix(r)) is not None and m.size]
    if not mats or len({m.shape for m in mats}) != 1:
        raise ValueError(f"need score matrices of one shape, got {[m.shape for m in mats] or 'none'}")
    return np.mean(mats, axis=0)


ACCURACY = Score("accuracy", "%", 100.0, True, False)


def accuracy_heatmap(matrix: Sequence[Sequence[float]], ax=None, title: str | None = None, score: Score = ACCURACY):
    """R[i, j]: rows are 'after experience i', columns 'tested on experience j'. Accuracy and AP (in %,
    j > i left blank, bright = good); an error such as MSE (every cell, bright = low error)."""
    ax = ax if ax is not None else new_axes(figsize=(5.2, 4.4))
    m = np.asarray(matrix, dtype=float) * score.scale
    rows, cols = m.shape
    seen = np.arange(cols)[None, :] <= np.arange(rows)[:, None]
    shown = np.ma.masked_where(~seen | np.isnan(m), m) if not score.every_cell else np.ma.masked_invalid(m)
    if score.unit == "%":
        vmin, vmax = 0.0, 100.0
    else:
        vmin, vmax = 0.0, float(np.nanmax(m)) if np.isfinite(m).any() else 1.0
    cmap = "viridis" if score.higher_is_better else "viridis_r"
    positive = m[np.isfinite(m) & (m > 0)]
    if score.unit != "%" and positive.size and positive.max() / positive.min() > 20:
        from matplotlib.colors import LogNorm  # errors spanning decades: a log colour scale keeps the small ones apart

        norm = LogNorm(vmin=positive.min(), vmax=positive.max())
        image = ax.imshow(np.ma.masked_where(shown <= 0, shown), cmap=cmap, norm=norm)
        shade = lambda v: (math.log(v) - math.log(norm.vmin)) / (math.log(norm.vmax) - math.log(norm.vmin)) if v > 0 else 0.0
    else:
        image = ax.imshow(shown, cmap=cmap, vmin=vmin, vmax=vmax or 1.0)
        shade = lambda v: (v - vmin) / ((vmax or 1.0) - vmin)
    ax.figure.colorbar(image, ax=ax, label=score.axis(score.name))
    if rows * cols <= 144:  # numbers stay legible up to 12 x 12
        for i in range(rows):
            for j in range(cols):
                if shown.mask is not np.ma.nomask and shown.mask[i, j]:
                    continue
                dark = shade(m[i, j]) < 0.6
                dark = dark if score.higher_is_better else not dark
                ax.text(j, i, format(m[i, j], score.fmt), ha="center", va="center", fontsize=8,
                        color="white" if dark else "black")
    ax.set_xticks(range(cols), [str(j + 1) for j in range(cols)])
    ax.set_yticks(range(rows), [str(i + 1) for i in range(rows)])
    ax.set_xlabel("tested on experience")
    ax.set_ylabel("after training experience")
    ax.set_title(title or f"{score.name[:1].upper()}{score.name[1:]} matrix")
    return ax


def forgetting_bars(results: Sequence[RunResult], ax=None, title: str | None = None, styles: Palette | None = None):
    """Per experience j < T-1, one bar per strategy: how much of its score was lost by the end (mean over
    seeds, ± std clipped to what forgetting can be: at most 100 pp, below 0 only where a seed's last score
    beat all its earlier ones)."""
    ax = ax if ax is not None else new_axes()
    scenario = _one_scenario(results, "forgetting_bars")
    groups = _complete_by_label(results)
    runs_all = [r for g in groups.values() for r in g]
    if not runs_all or min(score_matrix(r).shape[0] for r in runs_all) < 2:
        raise ValueError(f"forgetting needs at least two experiences of {scenario}")
    score = score_of(runs_all)
    styles = styles or Palette(groups)
    width = 0.8 / len(groups)
    for k, (name, runs) in enumerate(groups.items()):
        f = np.stack([forgetting_per_experience(score_matrix(r), score.higher_is_better) for r in runs]) * score.scale
        xs = np.arange(1, f.shape[1] + 1) + (k - (len(groups) - 1) / 2) * width
        mean = f.mean(axis=0)
        yerr = None
        if len(runs) > 1:  # ± std, clipped at 0 where no seed forgot less than nothing, and at 100 pp
            std = f.std(axis=0, ddof=1)
            low, high = _clip(mean - std, mean + std, np.minimum(f.min(axis=0), 0.0), score.upper)
            yerr = [mean - low, high - mean]
        ax.bar(xs, mean, width=width, yerr=yerr, capsize=2, color=styles[name].color,
               label=f"{name} (n={len(runs)})", edgecolor="black", linewidth=0.4)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(1, f.shape[1] + 1))
    ax.set_xlabel("experience")
    unit = "pp" if score.unit == "%" else ""
    extra = ", ".join(p for p in (unit, score.note, "lower is better") if p)
    ax.set_ylabel(f"forgetting of {score.name} ({extra})")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize="small")
    ax.set_title(title or f"Forgetting per experience — {scenario}")
    return ax


def old_new_plot(results: Sequence[RunResult], ax=None, title: str | None = None, x: str = "experiences",
                 styles: Palette | None = None):
    """After each experience, the score on the old experiences (dashed) and on the newest one (solid), one
    colour per strategy (means over seeds)."""
    from matplotlib.lines import Line2D

    ax = ax if ax is not None else new_axes()
    scenario, groups = _matrix_groups(results, "old_new_plot")
    score = score_of([r for g in groups.values() for r in g])
    styles = styles or Palette(groups)
    handles = []
    for name, runs in groups.items():
        pairs = [old_new_curves(r) for r in runs]
        # after the first experience nothing is old; past it, a mean over the seeds that have a value
        olds = np.stack([p[0][1:] for p in pairs])
        old = (np.array([col[~np.isnan(col)].mean() if (~np.isnan(col)).any() else np.nan for col in olds.T])
               * score.scale if olds.size else None)
        new = np.mean(np.stack([p[1] for p in pairs]), axis=0) * score.scale
        xs, xlabel = _x_values(runs, len(new), x)
        style = styles[name]
        ax.plot(xs, new, color=style.color, marker=style.marker, linestyle="-", clip_on=False)
        if old is not None:
            ax.plot(xs[1:], old, color=style.color, marker=style.marker, linestyle="--", markerfacecolor="none",
                    clip_on=False)
        handles.append(Line2D([], [], color=style.color, marker=style.marker, label=f"{name} (n={len(runs)})"))
    handles += [Line2D([], [], color="gray", linestyle="-", label="newest experience"),
                Line2D([], [], color="gray", linestyle="--", label="old experiences")]
    ax.set_xlabel(xlabel)
    runs_all = [r for g in groups.values() for r in g]
    ap = _common((r.detection or {}).get("metric") for r in runs_all)
    if ap and all((r.detection or {}).get("per_task") for r in runs_all):  # the record's own old / new class AP
        ax.set_ylabel(score.axis(f"mean {ap} over old / new classes"))
    else:
        ax.set_ylabel(score.axis(f"{score.name} on old / newest experiences"))
    if score.unit == "%":
        ax.set_ylim(0, 101)
    else:
        ax.set_ylim(bottom=0)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    ax.set_title(title or f"Old vs new experiences — {scenario}")
    return ax


# --------------------------------------------------------------------------- Pareto plots
def pareto_front(costs: Sequence[float], scores: Sequence[float]) -> list[int]:
    """Indices of the points no other point beats (lower or equal cost and higher score), by rising cost."""
    order = sorted(range(len(costs)), key=lambda i: (costs[i], -scores[i]))
    front, best = [], -np.inf
    for i in order:
        if scores[i] > best:
            front.append(i)
            best = scores[i]
    return front


def _metric_name(col, rows: Sequence[L.Row], results: Sequence[RunResult] = ()) -> str:
    """The column's title with the scenario's AP convention where it has one (`Final AP50 all`)."""
    ap = _common((r.detection or {}).get("metric") for r in results)
    return col.title.replace("AP", ap) if ap and "AP" in col.title else col.title


def _place_labels(ax, xs, ys, names: Sequence[str]) -> list[str]:
    """Annotate each point at the first of a few offsets whose text box stays inside the axes and overlaps
    no point and no label placed before; returns the names left unlabelled (the legend names them)."""
    from matplotlib.transforms import Bbox

    fig = ax.figure
    fig.canvas.draw()  # the constrained layout fixes the axes' place first
    renderer = fig.canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    points = ax.transData.transform(np.column_stack([xs, ys]))
    pad = 5 * fig.dpi / 72
    taken = [Bbox.from_extents(px - pad, py - pad, px + pad, py + pad) for px, py in points]
    offsets = [(6, 5, "left", "bottom"), (6, -5, "left", "top"), (-6, 5, "right", "bottom"),
               (-6, -5, "right", "top"), (0, 9, "center", "bottom"), (0, -9, "center", "top"),
               (14, 0, "left", "center"), (-14, 0, "right", "center")]
    left = []
    for k, name in enumerate(names):
        for dx, dy, ha, va in offsets:
            text = ax.annotate(name, (xs[k], ys[k]), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va,
                               fontsize=7)
            text.set_in_layout(False)
            box = text.get_window_extent(renderer).expanded(1.05, 1.1)
            if (inside.contains(box.x0, box.y0) and inside.contains(box.x1, box.y1)
                    and not any(box.overlaps(t) for t in taken)):
                taken.append(box)
                break
            text.remove()
        else:
            left.append(name)
    return left


def _tick_text(v: float, _pos=None) -> str:
    """`0.6`, `20`, `3000`; from 10^4 on `$7\\times10^{7}$`."""
    if v <= 0 or v < 1e4:
        return f"{v:g}"
    exponent = math.floor(math.log10(v))
    mantissa = v / 10**exponent
    return f"$10^{{{exponent}}}$" if math.isclose(mantissa, 1) else f"${mantissa:.2g}\\times10^{{{exponent}}}$"


def pareto_plot(board: L.Leaderboard, cost: str = "train_flops_total", metric: str = "final_avg_acc", ax=None,
                title=None, styles: Palette | None = None, results: Sequence[RunResult] = ()):
    """One point per leaderboard row, in its strategy's colour and marker; error bars ± std over seeds,
    clipped at 0 (and percentages at 100); on the Jetson estimate the bar is its uncertainty band. The
    frontier is a dashed staircase. `results` (optional) name the detection AP convention on the axis."""
    if cost not in COSTS and cost not in OTHER_COSTS:
        raise ValueError(f"cost {cost!r} is unknown; expected one of {', '.join([*COSTS, *OTHER_COSTS])}")
    ax = ax if ax is not None else new_axes()
    scenario = _one_scenario(board.rows, "pareto_plot")
    cost_col, metric_col = L.COLUMN_BY_KEY[cost], L.COLUMN_BY_KEY[metric]
    rows = [r for r in board.rows if r.cells[cost].mean is not None and r.cells[metric].mean is not None]
    if not rows:
        raise ValueError(f"no row of {scenario} has both {cost} and {metric}")
    styles = styles or Palette([r.label for r in board.rows])
    label_text, log = {**COSTS, **OTHER_COSTS}[cost]
    unit = L.choose_unit(cost_col, [r.cells[cost].mean for r in rows])
    if cost == "train_flops_total":
        unit = None  # FLOPs read best as powers of ten on their log axis
    x_scale = 1 / unit.factor if unit else cost_col.scale
    x_unit = unit.name if unit else cost_col.unit if cost != "train_flops_total" else ""
    xs = np.array([r.cells[cost].mean * x_scale for r in rows])
    ys = np.array([r.cells[metric].mean * metric_col.scale for r in rows])
    x_sd = np.array([(r.cells[cost].std or 0) * x_scale for r in rows])
    y_sd = np.array([(r.cells[metric].std or 0) * metric_col.scale for r in rows])
    y_top = 100.0 if metric_col.unit == "%" else math.inf
    y_lo, y_hi = _clip(ys - y_sd, ys + y_sd, 0.0, y_top)
    x_lo, x_hi = _clip(xs - x_sd, xs + x_sd)
    for k, r in enumerate(rows):
        band = r.cells[cost].band
        if band is not None:  # the Jetson estimate: its band is the error bar
            x_lo[k], x_hi[k] = band[0] * x_scale, band[1] * x_scale
    log = log and bool((xs > 0).all())
    front = pareto_front(list(xs), list(ys) if metric_col.higher_is_better else list(-ys))
    devices = {r.device for r in rows}
    names = []
    for k, r in enumerate(rows):
        name = r.label + (f" [{r.device}]" if len(devices) > 1 else "")
        names.append(name)
        style = styles[r.label]
        ax.errorbar(xs[k], ys[k], xerr=[[xs[k] - x_lo[k]], [x_hi[k] - xs[k]]],
                    yerr=[[ys[k] - y_lo[k]], [y_hi[k] - ys[k]]], fmt=style.marker, color=style.color,
                    ecolor=style.color, elinewidth=1, capsize=3, markersize=7, label=name,
                    markeredgecolor="black" if k in front else style.color, zorder=3)
    ax.plot(xs[front], ys[front], drawstyle="steps-post", color="black", linestyle="--", linewidth=1,
            label="Pareto frontier", zorder=2)
    if log:
        ax.set_xscale("log")
        # a bar reaching 0 runs off the left edge; the limits follow the positive ends
        ends = np.concatenate([xs, x_lo[x_lo > 0], x_hi])
        lo, hi = ends.min(), ends.max()
        span = max(hi / lo, 1.0)
        ax.set_xlim(lo / span**0.08 / 1.15, hi * span**0.08 * 1.15)
        if span < 100:  # under two decades: plain numbers on the major and minor ticks, not 2x10^0
            from matplotlib.ticker import FuncFormatter

            plain = FuncFormatter(_tick_text)
            ax.xaxis.set_major_formatter(plain)
            ax.xaxis.set_minor_formatter(plain)
    else:
        ax.set_xlim(left=0)
    better = "lower is better"
    ax.set_xlabel(f"{label_text} ({x_unit}, {better})" if x_unit else f"{label_text} ({better})")
    arrow = "higher" if metric_col.higher_is_better else "lower"
    y_name = _metric_name(metric_col, rows, results)
    ax.set_ylabel(f"{y_name} ({metric_col.unit}, {arrow} is better)" if metric_col.unit
                  else f"{y_name} ({arrow} is better)")
    if metric_col.unit == "%":
        low = max(0.0, float(y_lo.min()) - 5)
        ax.set_ylim(low, min(101.0, float(y_hi.max()) + 8))
    else:
        ax.set_ylim(0, float(y_hi.max()) * 1.15 or 1.0)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    if len(rows) <= MAX_POINT_LABELS:
        _place_labels(ax, xs, ys, names)
    if band_rows := sum(r.cells[cost].band is not None for r in rows):
        ax.annotate(f"x bars: the estimate's band ({band_rows} rows)" if band_rows > 1 else "x bar: the estimate's band",
                    (0, 0), xycoords="axes fraction", xytext=(4, 4), textcoords="offset points", fontsize=7,
                    color="dimgray", ha="left", va="bottom").set_in_layout(False)
    ax.set_title(title or f"Accuracy vs {label_text} — {scenario}")
    return ax


# --------------------------------------------------------------------------- batches of figures
def figures(results: Sequence[RunResult], board: L.Leaderboard | None = None, x: str = "experiences",
            styles: Palette | None = None, heatmaps: str = "each") -> Iterator[tuple[str, str, object]]:
    """(file stem, caption, Figure) for every plot the results support, scenario by scenario, all in one
    `Palette` (default: of `results`). `heatmaps="grid"` draws a scenario's matrices side by side in one
    figure (`<scenario>_heatmaps`) instead of one figure per strategy."""
    if x not in X_AXES:
        raise ValueError(f"x {x!r} is unknown; expected one of {', '.join(X_AXES)}")
    board = board or L.build(results)
    styles = styles or Palette.of(results)
    for scenario in sorted({r.scenario for r in results}):
        runs = [r for r in results if r.scenario == scenario]
        if not any(L.is_complete(r) for r in runs):
            continue
        task = task_of(next(r for r in runs if L.is_complete(r)))
        groups = _complete_by_label(runs)
        if groups:
            score = score_of([r for g in groups.values() for r in g])
            prefix = "" if task.plots_accuracy_matrix else f"{score.name.lower()}_"  # forecasting: mse_curves
            Title = score.name[:1].upper() + score.name[1:]
            ax = accuracy_curves(runs, x=x, styles=styles)
            yield f"{scenario}_{prefix}curves", f"{Title} per experience, {scenario}", ax.figure
            if heatmaps == "grid":
                fig = _heatmap_grid(scenario, groups, score)
                yield f"{scenario}_{prefix}heatmaps", f"{Title} matrices, {scenario}", fig
            else:
                for name, group in groups.items():
                    ax = accuracy_heatmap(mean_matrix(group), score=score,
                                          title=f"{name} — {scenario} (mean of {len(group)})")
                    yield (f"{scenario}_{prefix}heatmap_{_stem(name)}", f"{Title} matrix of {name}, {scenario}",
                           ax.figure)
            if min(score_matrix(r).shape[0] for g in groups.values() for r in g) >= 2:
                ax = forgetting_bars(runs, styles=styles)
                yield f"{scenario}_{prefix}forgetting", f"Forgetting per experience ({score.name}), {scenario}", ax.figure
                ax = old_new_plot(runs, x=x, styles=styles)
                yield f"{scenario}_{prefix}old_new", f"{Title} on old vs newest experience, {scenario}", ax.figure
        sub = L.Leaderboard([r for r in board.rows if r.scenario == scenario], [], [])
        headline = L.COLUMN_BY_KEY[task.headline]
        shown = _metric_name(headline, sub.rows, runs)
        for cost in COSTS:
            if sum(r.cells[cost].mean is not None for r in sub.rows) == 0:
                continue
            if headline.key != "final_avg_acc":  # pareto_plot reads the column's direction
                ax = pareto_plot(sub, cost, metric=headline.key, styles=styles, results=runs,
                                 title=f"{shown} vs {COSTS[cost][0]} — {scenario}")
                yield f"{scenario}_pareto_{cost}", f"{headline.title} vs {COSTS[cost][0]}, {scenario}", ax.figure
                continue
            ax = pareto_plot(sub, cost, styles=styles, results=runs,
                             title=f"Final accuracy vs {COSTS[cost][0]} — {scenario}")
            yield f"{scenario}_pareto_{cost}", f"Final accuracy vs {COSTS[cost][0]}, {scenario}", ax.figure
        if sum(r.cells["quantized_acc"].mean is not None and r.cells["quantized_size_bytes"].mean is not None
               for r in sub.rows):
            ax = pareto_plot(sub, "quantized_size_bytes", metric="quantized_acc", styles=styles, results=runs,
                             title=f"Quantized accuracy vs model size — {scenario}")
            yield f"{scenario}_pareto_quantized", f"Quantized accuracy vs quantized model size, {scenario}", ax.figure


def _heatmap_grid(scenario: str, groups: dict[str, list[RunResult]], score: Score):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(groups)
    cols = min(n, 4)
    fig = Figure(figsize=(4.2 * cols, 3.6 * math.ceil(n / cols)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(math.ceil(n / cols), cols, squeeze=False).ravel()
    for ax, (name, group) in zip(axes, groups.items()):
        accuracy_heatmap(mean_matrix(group), ax=ax, score=score, title=f"{name} (n={len(group)})")
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.suptitle(f"{score.name[:1].upper()}{score.name[1:]} matrices — {scenario}")
    return fig


def _stem(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)


def figure_bytes(fig, fmt: str = "png", dpi: int = 110) -> bytes:
    """The figure as PNG, PDF or SVG (`dpi` sets a PNG's pixels per inch; vector formats keep text as text)."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is unknown; expected one of {', '.join(FORMATS)}")
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=dpi, metadata={"Date": None} if fmt in ("pdf", "svg") else None)
    return buf.getvalue()


def png_bytes(fig, dpi: int = 110) -> bytes:
    return figure_bytes(fig, "png", dpi)


def embedded_figures(results: Sequence[RunResult], board: L.Leaderboard | None = None) -> list[tuple[str, str]]:
    """(caption, base64 PNG) of the curves and Pareto plots, for the self-contained HTML page."""
    return [
        (caption, base64.b64encode(png_bytes(fig, dpi=80)).decode("ascii"))
        for stem, caption, fig in figures(results, board)
        if "_heatmap_" not in stem  # one per strategy would swamp the page; `clbench plot` writes them
    ]


def save_all(results: Sequence[RunResult], out_dir: str | Path, board: L.Leaderboard | None = None,
             fmt: str = "png", dpi: int = 150, x: str = "experiences", styles: Palette | None = None) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, _, fig in figures(results, board, x=x, styles=styles):
        path = out / f"{stem}.{fmt}"
        path.write_bytes(figure_bytes(fig, fmt, dpi))
        written.append(path)
    return written


def cmd_plot(args) -> int:
    fmt, dpi, x = getattr(args, "format", "png"), getattr(args, "dpi", 150), getattr(args, "x", "experiences")
    if dpi is None or dpi <= 0:
        raise UsageError(f"--dpi {dpi} is invalid; expected a positive number of pixels per inch (e.g. 150, 300)")
    loaded = L.load_results(args.results_dir, args.scenario)
    for path, why in loaded.skipped:
        print(f"clbench: warning: skipped {path}: {why}", file=sys.stderr)
    board = L.build(loaded.results, loaded.paths, loaded.skipped)
    # the palette of the whole folder: a strategy keeps its colour whether or not --scenario picks one
    everything = L.load_results(args.results_dir).results if args.scenario else loaded.results
    try:
        written = save_all(loaded.results, args.out, board, fmt=fmt, dpi=dpi, x=x, styles=Palette.of(everything))
    except OSError as e:
        raise UsageError(f"--out {args.out!r} cannot be written ({e.strerror or e}); expected a writable "
                         f"directory") from None
    for path in written:
        print(path)
    if not written:
        print("clbench: warning: no completed run to plot", file=sys.stderr)
        return 1
    return 0
