"""Leaderboard: stored result JSONs -> one row per configuration, mean ± std over seeds.

A row is one (strategy, scenario, backbone, add-ons, device): the device is part of
the key because wall time and peak memory from different hardware must not be
averaged.  Only completed runs with a full accuracy matrix are averaged; failed,
interrupted or incomplete runs are listed apart.  Each column knows whether higher
is better, and the best mean of each scenario is marked.  Files that are not clbench
results, or come from a newer schema, are skipped with a warning.
"""

from __future__ import annotations

import csv
import io
import json
import math
import subprocess
from datetime import datetime, timezone
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from clbench.errors import UsageError
from clbench.reporting.results import RunResult, load, result_settings, setting_text
from clbench.tasks import TASKS, task_of
from clbench.tasks.base import Column

MISSING = "—"


# --------------------------------------------------------------------------- reading results
@dataclass
class Loaded:
    results: list[RunResult]
    paths: list[Path]
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def load_results(results_dir: str | Path, scenario: str | None = None) -> Loaded:
    """Every clbench result under `results_dir` (recursively); unreadable or newer files go to `skipped`."""
    root = Path(results_dir)
    if root.is_file():
        raise UsageError(f"results directory {str(root)!r} is a file; expected a directory of result JSON files")
    if not root.is_dir():
        raise UsageError(f"results directory {str(root)!r} does not exist")
    out = Loaded([], [])
    for path in sorted(root.rglob("*.json")):
        parts = path.relative_to(root).parts
        if "wandb" in parts or any(p.startswith(".") for p in parts):
            continue  # resume state (.resume/) and wandb's offline mirror keep their own JSON files
        try:
            r = load(path)
        except UsageError as e:
            out.skipped.append((path, str(e)))
            continue
        if scenario is None or r.scenario == scenario:
            out.results.append(r)
            out.paths.append(path)
    if not out.results:
        if scenario is not None:
            found = sorted({load(p).scenario for p in root.rglob("*.json") if _quiet_load(p)})
            raise UsageError(
                f"no results for scenario {scenario!r} under {str(root)!r}; found: {', '.join(found) or 'none'}"
            )
        unreadable = (f"; {len(out.skipped)} unreadable file(s), the first {str(out.skipped[0][0])!r}: "
                      f"{out.skipped[0][1]}" if out.skipped else "")
        raise UsageError(f"no clbench results under {str(root)!r} (expected <scenario>/<strategy>/*.json){unreadable}")
    return out


def _quiet_load(path: Path) -> bool:
    try:
        load(path)
        return True
    except UsageError:
        return False


def addons_label(r: RunResult) -> str:
    """`distill:weight=0.5+quantize:bits=8`; empty for none.  Part of a row's identity."""
    parts = []
    for a in r.aux:
        params = ",".join(f"{k}={v}" for k, v in a.items() if k != "name")
        parts.append(f"{a['name']}:{params}" if params else a["name"])
    return "+".join(parts)


def is_complete(r: RunResult) -> bool:
    return task_of(r).is_complete(r)


# --------------------------------------------------------------------------- columns
def last_experience(r: RunResult, key: str):
    records = r.edge.get("per_experience") or []
    return records[-1].get(key) if records else None


def total(key: str) -> Callable[[RunResult], Any]:
    return lambda r: (r.edge.get("totals") or {}).get(key)


def jetson_time(r: RunResult) -> tuple[float | None, str | None]:
    """(seconds, 'measured' | 'estimated') of the run's Jetson training time, or (None, None).

    The profiler stores it under `edge.totals.jetson` with a `source` of `measured:...`
    or `estimated:...`; a measurement flagged invalid (swap grew) counts as missing.
    """
    j = (r.edge.get("totals") or {}).get("jetson")
    if not isinstance(j, dict) or j.get("time_s") is None or j.get("valid") is False:
        return None, None
    kind = "measured" if str(j.get("source", "")).startswith("measured") else "estimated"
    return float(j["time_s"]), kind


def jetson_facts(results: Iterable[RunResult]) -> dict[str, set]:
    """Jetson devices, power modes and estimate bands behind the Jetson columns (for the legend)."""
    out: dict[str, set] = {"device": set(), "band": set()}
    for r in results:
        j = (r.edge.get("totals") or {}).get("jetson")
        if isinstance(j, dict) and j.get("time_s") is not None:
            out["device"].add(f"{j.get('device')} {j.get('power_mode') or ''}".strip())
            if j.get("band") is not None:
                out["band"].add(round(100 * float(j["band"])))
    return out


def jetson_band(r: RunResult) -> tuple[float, float] | None:
    """(low, high) seconds of the run's Jetson estimate: the stored band, else [T/(1+e), T(1+e)]."""
    seconds, kind = jetson_time(r)
    if kind != "estimated":
        return None
    j = r.edge["totals"]["jetson"]
    if j.get("low_s") is not None and j.get("high_s") is not None:
        return float(j["low_s"]), float(j["high_s"])
    if j.get("band") is not None:
        return seconds / (1 + float(j["band"])), seconds * (1 + float(j["band"]))
    return None


def jetson_of_kind(kind: str) -> Callable[[RunResult], float | None]:
    def get(r: RunResult):
        seconds, k = jetson_time(r)
        return seconds if k == kind else None

    return get


def quantized(key: str) -> Callable[[RunResult], float | None]:
    """Runs with the `quantize` add-on: a field of its record after the last experience. A `qat` run's
    accuracy is its own accuracy matrix (the model trained quantized), so it has no FP32 delta."""

    def get(r: RunResult):
        records = (r.aux_results or {}).get("quantize") or []
        record = records[-1] if records else None
        if not isinstance(record, dict) or "skipped" in record:
            return None
        if record.get("mode") == "qat" and key == "avg_acc":
            return r.metrics.get("final_avg_acc")
        value = record.get(key)
        return None if value is None or _isnan(value) else value

    return get


# Each task's own metric columns, then what every run has: costs and add-on figures.
TASK_COLUMNS: dict[str, list[Column]] = {name: task.columns() for name, task in TASKS.items()}
COMMON_COLUMNS: list[Column] = [
    Column("train_flops_total", "Train FLOPs", False, total("train_flops_total"), 1.0, ".3g", "FLOP", count=True),
    Column("peak_memory_bytes", "Peak mem", False, total("peak_memory_bytes"), 1 / 2**20, ".1f", "MiB"),
    Column("train_time_s", "Wall time", False, total("train_time_s"), 1.0, ".2f", "s"),
    Column("jetson_time_measured_s", "Jetson time (measured)", False, jetson_of_kind("measured"), 1.0, ".2f", "s"),
    Column("jetson_time_estimated_s", "Jetson time (estimated)", False, jetson_of_kind("estimated"), 1.0, ".2f", "s"),
    Column("trainable_params", "Trainable params", False, lambda r: total("trainable_params")(r) or last_experience(r, "trainable_params"), 1.0, ",.0f", count=True),
    Column("buffer_size", "Buffer", False, lambda r: r.strategy_report.get("buffer_size"), 1.0, ",.0f", count=True),
    Column("quantized_acc", "Quantized acc", True, quantized("avg_acc"), 100.0, ".1f", "%"),
    Column("quantized_delta_acc", "Acc lost to quantization", False, quantized("delta_acc"), 100.0, ".1f", "pp"),
    Column("quantized_size_bytes", "Quantized size", False, quantized("size_bytes"), 1 / 2**10, ".1f", "KiB"),
]
COLUMNS: list[Column] = [*(c for cols in TASK_COLUMNS.values() for c in cols), *COMMON_COLUMNS]
_TASK_OF_COLUMN = {c.key: name for name, cols in TASK_COLUMNS.items() for c in cols}


def value(col: Column, r: RunResult):
    """The column's value for one run: a task's metric column reads only runs of its own task."""
    owner = _TASK_OF_COLUMN.get(col.key)
    return col.get(r) if owner is None or owner == task_of(r).name else None


COLUMN_BY_KEY = {c.key: c for c in COLUMNS}


# --------------------------------------------------------------------------- aggregation
@dataclass
class Cell:
    mean: float | None
    std: float | None  # None for a single seed
    n: int
    best: bool = False
    band: tuple[float, float] | None = None  # the Jetson estimate's uncertainty band (means over seeds)


@dataclass
class Row:
    strategy: str
    scenario: str
    backbone: str
    addons: str
    device: str
    seeds: list[int]
    cells: dict[str, Cell]
    notes: list[str] = field(default_factory=list)
    task: str = "classification"
    settings: dict[str, Any] = field(default_factory=dict)  # how its (first) seed was run: `results.result_settings`
    published: dict[str, Any] | None = None  # run with --paper-settings: the paper's number (`RunResult.published`)

    @property
    def label(self) -> str:
        return self.strategy + (f"+{self.addons}" if self.addons else "")

    @property
    def reference(self) -> str | None:
        """What the row is a reference for (it bounds the methods instead of competing with them)."""
        return REFERENCE_ROWS.get(self.strategy) if not self.addons else None


# Rows that bound the others rather than compete: listed last in their table, labelled, never bold.
REFERENCE_ROWS = {"joint": "upper bound: retrains on all data seen so far"}


@dataclass
class Leaderboard:
    rows: list[Row]
    incomplete: list[tuple[RunResult, Path]]
    skipped: list[tuple[Path, str]]
    memory_kinds: set[str] = field(default_factory=set)  # cpu_rss / cuda_allocator: what "peak memory" means
    jetson: dict[str, set] = field(default_factory=dict)  # devices and estimate bands behind the Jetson columns
    columns: list[Column] = field(default_factory=lambda: list(COLUMNS))
    provenance: dict[str, Any] = field(default_factory=dict)  # version, date, command, git commit (`provenance()`)

    def scenarios(self) -> list[str]:
        return sorted({r.scenario for r in self.rows} | {r.scenario for r, _ in self.incomplete})


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n-1); std is None for a single seed (nothing to spread), both
    None for no value."""
    vals = [float(v) for v in values if v is not None and not _isnan(v)]
    if not vals:
        return None, None
    m = sum(vals) / len(vals)
    if len(vals) == 1:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def _isnan(v) -> bool:
    return isinstance(v, float) and math.isnan(v)


def settings(r: RunResult) -> dict[str, Any]:
    """The settings that identify how a run was made (paths and progress bars do not change results);
    add-ons are part of a row's identity, so they are not among them."""
    out = result_settings(r, with_aux=False)
    out["paper_settings"] = r.paper_settings
    return out


_ABSENT = "(absent)"


def varying_settings(groups: dict[str, dict[str, Any]], every_key: bool = False) -> list[str]:
    """`epochs: 5 (er, naive) vs 20 (ewc)` for each setting not all groups (label -> settings) share, values
    in order of first appearance. Only keys every group has count (different strategies have different
    hyper-parameters), or with `every_key` (seeds of one row) every key, a missing one shown `(absent)`."""
    if len(groups) < 2:
        return []
    keys = list(dict.fromkeys(k for g in groups.values() for k in g))
    if not every_key:
        keys = [k for k in keys if all(k in g for g in groups.values())]
    out = []
    for key in keys:
        by_value: dict[str, list[str]] = {}
        for label, g in groups.items():
            text = setting_text(g[key]) if key in g else _ABSENT
            by_value.setdefault(text, []).append(label)
        if len(by_value) > 1:
            out.append(f"{key}: " + " vs ".join(f"{v} ({', '.join(labels)})" for v, labels in by_value.items()))
    return out


def build(results: Iterable[RunResult], paths: Iterable[Path] | None = None, skipped=()) -> Leaderboard:
    """Group completed runs and average each column over seeds; everything else goes to `incomplete`."""
    results = list(results)
    paths = list(paths) if paths is not None else [Path("?")] * len(results)
    groups: dict[tuple, list[RunResult]] = {}
    incomplete = []
    for r, p in zip(results, paths):
        if not is_complete(r):
            incomplete.append((r, p))
            continue
        groups.setdefault((r.scenario, r.strategy, r.backbone, addons_label(r), r.device), []).append(r)
    rows = []
    for (scenario, strategy, backbone, addons, device), runs in groups.items():
        notes = []
        by_seed: dict[int, RunResult] = {}
        for r in runs:
            if r.seed in by_seed:
                notes.append(f"seed {r.seed} found twice; kept one")
                continue
            by_seed[r.seed] = r
        runs = [by_seed[s] for s in sorted(by_seed)]
        differing = varying_settings({f"seed {r.seed}": settings(r) for r in runs}, every_key=True)
        if differing:
            notes.append("seeds were run with different settings: " + "; ".join(differing))
        cells = {}
        for col in COLUMNS:
            values = [value(col, r) for r in runs]
            m, s = mean_std(values)
            cells[col.key] = Cell(m, s, sum(v is not None and not _isnan(v) for v in values))
        bands = [jetson_band(r) for r in runs if jetson_band(r) is not None]
        if bands:
            cells["jetson_time_estimated_s"].band = (sum(b[0] for b in bands) / len(bands),
                                                     sum(b[1] for b in bands) / len(bands))
        published = next((r.published for r in runs if r.paper_settings and r.published), None)
        rows.append(Row(strategy, scenario, backbone, addons, device, sorted(by_seed), cells, notes,
                        task_of(runs[0]).name, settings(runs[0]), published))
    _mark_best(rows)
    rows.sort(key=lambda row: (row.scenario, row.reference is not None, _headline_order(row), row.label))
    kinds = {(r.edge.get("totals") or {}).get("peak_memory_kind") for r in results} - {None}
    return Leaderboard(rows, incomplete, list(skipped), kinds, jetson_facts(results))


def _headline_order(row: Row) -> float:
    """Best first by the task's headline figure (rows without one last)."""
    col = COLUMN_BY_KEY[TASKS[row.task].headline]
    mean = row.cells[col.key].mean
    if mean is None:
        return math.inf
    return -mean if col.higher_is_better else mean


def _mark_best(rows: list[Row]) -> None:
    """Per scenario and column: the best mean (ties all marked); a column with one value marks nothing."""
    for scenario in {r.scenario for r in rows}:
        same = [r for r in rows if r.scenario == scenario and r.reference is None]
        for col in COLUMNS:
            means = [r.cells[col.key].mean for r in same if r.cells[col.key].mean is not None]
            if len(means) < 2 or math.isclose(min(means), max(means), rel_tol=1e-12, abs_tol=1e-15):
                continue  # a column where every row ties tells nothing apart
            best = max(means) if col.higher_is_better else min(means)
            for r in same:
                cell = r.cells[col.key]
                cell.best = cell.mean is not None and math.isclose(cell.mean, best, rel_tol=1e-12, abs_tol=1e-15)


def from_dir(results_dir: str | Path, scenario: str | None = None) -> Leaderboard:
    loaded = load_results(results_dir, scenario)
    return build(loaded.results, loaded.paths, loaded.skipped)


# --------------------------------------------------------------------------- formatting
@dataclass(frozen=True)
class Unit:
    """A human unit for a cost column: displayed value = raw value / factor, with its name in the cell."""

    name: str
    factor: float
    fmt: str


FLOP_UNITS = (Unit("FLOP", 1.0, ",.0f"), Unit("MFLOP", 1e6, ",.2f"), Unit("GFLOP", 1e9, ",.2f"),
              Unit("TFLOP", 1e12, ",.2f"), Unit("PFLOP", 1e15, ",.2f"))
BYTE_UNITS = (Unit("B", 1.0, ",.0f"), Unit("KiB", 2.0**10, ",.1f"), Unit("MiB", 2.0**20, ",.1f"),
              Unit("GiB", 2.0**30, ",.2f"))
TIME_UNITS = (Unit("s", 1.0, ",.2f"), Unit("min", 60.0, ",.2f"), Unit("h", 3600.0, ",.2f"))
# Columns shown in a human unit chosen per column and table: the largest unit that the column's (lower)
# median value reaches, so the typical row reads well; every other column keeps its fixed scale and the
# unit in its title.
HUMAN_UNITS: dict[str, tuple[Unit, ...]] = {
    "train_flops_total": FLOP_UNITS,
    "peak_memory_bytes": BYTE_UNITS,
    "train_time_s": TIME_UNITS,
    "jetson_time_measured_s": TIME_UNITS,
    "jetson_time_estimated_s": TIME_UNITS,
}


def choose_unit(col: Column, values: Iterable[float | None]) -> Unit | None:
    """The unit of a human-unit column for these raw values (None: the column has a fixed scale)."""
    units = HUMAN_UNITS.get(col.key)
    if units is None:
        return None
    vals = sorted(abs(v) for v in values if v is not None and not _isnan(v))
    typical = vals[(len(vals) - 1) // 2] if vals else 0.0
    return next((u for u in reversed(units) if typical >= u.factor), units[0])


def format_cell(col: Column, cell: Cell, unit: Unit | None = None) -> str:
    """`60.0 ± 10.0`; a human-unit column `1.36 GFLOP` in `unit` (default: chosen for this cell alone), the
    Jetson estimate with its band `1.49 s [1.12, 1.98]`; no ± for one seed or for counts all seeds agree on."""
    if cell.mean is None:
        return MISSING
    unit = unit or choose_unit(col, [cell.mean])
    scale, fmt = (1 / unit.factor, unit.fmt) if unit else (col.scale, col.fmt)
    text = format(cell.mean * scale, fmt)
    if cell.band is None and cell.n >= 2 and cell.std is not None and not (col.count and cell.std == 0):
        text += f" ± {format(cell.std * scale, fmt)}"
    if unit:
        text += f" {unit.name}"
    if cell.band is not None:
        text += f" [{format(cell.band[0] * scale, fmt)}, {format(cell.band[1] * scale, fmt)}]"
    return text


def published_text(row: Row) -> str | None:
    """`preprompt: published final acc 93.74% (official README table, A_last); measured 93.1 ± 0.2%` for a
    row run with --paper-settings whose method declares the paper's number (None otherwise)."""
    p = row.published
    if not p or p.get("value") is None:
        return None
    col = COLUMN_BY_KEY.get(p.get("metric", ""))
    title = col.title.lower() if col else str(p.get("metric"))
    value = f"{100 * float(p['value']):.2f}%" if col is None or col.unit == "%" else f"{p['value']}"
    measured = format_cell(col, row.cells[col.key]) if col is not None else MISSING
    if col is not None and col.unit == "%" and measured != MISSING:
        measured += "%"
    return f"{row.label}: published {title} {value} ({p.get('source', 'source not given')}); measured {measured}"


def column_title(col: Column) -> str:
    """`Final acc (%) ↑`; a human-unit column names its unit in every cell instead (`Train FLOPs ↓`)."""
    arrow = "↑" if col.higher_is_better else "↓"
    unit = f" ({col.unit})" if col.unit and col.key not in HUMAN_UNITS else ""
    return f"{col.title}{unit} {arrow}"


def shown_columns(lb: Leaderboard) -> list[Column]:
    """Columns with at least one value (md/html); csv and json keep every column."""
    return [c for c in lb.columns if any(r.cells[c.key].mean is not None for r in lb.rows)]


@dataclass
class Table:
    """One scenario's table: its rows best-first, only the columns they have values in, the unit of each
    human-unit column, the settings that differ between its rows, and its failed or incomplete runs."""

    scenario: str
    task: str
    rows: list[Row]
    columns: list[Column]
    units: dict[str, Unit]
    differing: list[str]
    incomplete: list[dict[str, Any]]


def tables(lb: Leaderboard) -> list[Table]:
    """One table per scenario, scenarios sorted (a scenario with only failed runs has no rows)."""
    out = []
    failed = incomplete_rows(lb)
    for scenario in lb.scenarios():
        rows = [r for r in lb.rows if r.scenario == scenario]
        cols = [c for c in lb.columns if any(r.cells[c.key].mean is not None for r in rows)]
        units = {c.key: u for c in cols if (u := choose_unit(c, [r.cells[c.key].mean for r in rows])) is not None}
        task = rows[0].task if rows else next(task_of(r).name for r, _ in lb.incomplete if r.scenario == scenario)
        labels = {}
        for r in rows:
            label = r.label
            if sum(o.label == r.label for o in rows) > 1:
                label += f" ({r.backbone}, {r.device})"
            labels.setdefault(label, r.settings)
        out.append(Table(scenario, task, rows, cols, units, varying_settings(labels),
                         [f for f in failed if f["scenario"] == scenario]))
    return out


# --------------------------------------------------------------------------- provenance
def provenance(results_dir: str | Path, command: str, now: datetime | None = None) -> dict[str, Any]:
    """What produced a page: clbench version, UTC date, the command line, and the git commit of the checkout
    holding the results folder (else the working directory); git's absence or refusal leaves them None."""
    from clbench._version import __version__

    now = now or datetime.now(timezone.utc)
    out: dict[str, Any] = {"clbench_version": __version__, "generated": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
                           "command": command, "git_commit": None, "git_checkout": None, "git_dirty": None}
    for where in (Path(results_dir), Path.cwd()):
        found = _git_commit(where if where.is_dir() else where.parent)
        if found is not None:
            out["git_commit"], out["git_checkout"], out["git_dirty"] = found
            break
    return out


def _git_commit(folder: Path) -> tuple[str, str, bool] | None:
    """(commit, checkout root, has uncommitted changes to tracked files) or None (no git, not a checkout)."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    root = git("rev-parse", "--show-toplevel")
    if not commit or root is None:
        return None
    status = git("status", "--porcelain", "--untracked-files=no")
    return commit, root, bool(status)


def provenance_text(p: dict[str, Any]) -> str:
    """One line: `Generated 2025-01-02T03:04:05Z by clbench 0.1.0 with `clbench leaderboard results`; git
    commit abc... of /repo (uncommitted changes).`"""
    text = f"Generated {p['generated']} by clbench {p['clbench_version']} with `{p['command']}`"
    if p.get("git_commit"):
        dirty = ", with uncommitted changes" if p.get("git_dirty") else ""
        text += f"; git commit {p['git_commit']} of {p['git_checkout']}{dirty}"
    else:
        text += "; not in a git checkout"
    return text + "."


def incomplete_rows(lb: Leaderboard) -> list[dict[str, Any]]:
    out = []
    for r, p in lb.incomplete:
        expected = r.scenario_info.get("num_experiences")
        out.append(
            {
                "strategy": r.strategy,
                "scenario": r.scenario,
                "task": task_of(r).name,
                "backbone": r.backbone,
                "addons": addons_label(r),
                "device": r.device,
                "seed": r.seed,
                "status": r.status if r.status != "completed" else "incomplete",
                "experiences": f"{len(r.accuracy_matrix)}/{expected if expected is not None else '?'}",
                "error": (r.error or "").splitlines()[0] if r.error else "",
                "file": str(p),
            }
        )
    return out


def to_records(lb: Leaderboard) -> dict[str, Any]:
    """The JSON form: provenance, column metadata, per scenario its task, shown columns, units and differing
    settings; rows with mean/std/n/best per column; incomplete runs; skipped files."""
    return {
        "provenance": lb.provenance or None,
        "scenarios": [
            {"scenario": t.scenario, "task": t.task, "columns": [c.key for c in t.columns],
             "units": {k: u.name for k, u in t.units.items()}, "differing_settings": t.differing}
            for t in tables(lb)
        ],
        "columns": [
            {"key": c.key, "title": c.title, "higher_is_better": c.higher_is_better, "unit": c.unit, "scale": c.scale}
            for c in lb.columns
        ],
        "rows": [
            {
                "strategy": r.strategy,
                "scenario": r.scenario,
                "task": r.task,
                "backbone": r.backbone,
                "addons": r.addons,
                "device": r.device,
                "seeds": r.seeds,
                "notes": r.notes,
                "settings": r.settings,
                "published": r.published,
                "values": {
                    k: {"mean": c.mean, "std": c.std, "n": c.n, "best": c.best,
                        **({"low": c.band[0], "high": c.band[1]} if c.band else {})}
                    for k, c in r.cells.items()
                },
            }
            for r in lb.rows
        ],
        "incomplete": incomplete_rows(lb),
        "skipped": [{"file": str(p), "reason": why} for p, why in lb.skipped],
    }


def to_json(lb: Leaderboard) -> str:
    return json.dumps(to_records(lb), indent=2)


def to_csv(lb: Leaderboard) -> str:
    """One line per row (status ok) then one per failed/incomplete run, each with its scenario and task; raw
    units, mean/std/best per column (std empty for a single seed)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    keys = ["strategy", "scenario", "task", "backbone", "addons", "device", "status", "seeds"]
    w.writerow(keys + [f"{c.key}_{s}" for c in lb.columns for s in ("mean", "std", "best")] + ["notes"])
    for r in lb.rows:
        vals = []
        for c in lb.columns:
            cell = r.cells[c.key]
            vals += ["" if cell.mean is None else repr(cell.mean), "" if cell.std is None else repr(cell.std), int(cell.best)]
        seeds = " ".join(map(str, r.seeds))
        w.writerow([r.strategy, r.scenario, r.task, r.backbone, r.addons, r.device, "ok", seeds] + vals
                   + ["; ".join(r.notes)])
    for f in incomplete_rows(lb):
        w.writerow(
            [f["strategy"], f["scenario"], f["task"], f["backbone"], f["addons"], f["device"], f["status"], f["seed"]]
            + [""] * (3 * len(lb.columns))
            + [f"{f['experiences']} experiences; {f['error']}".strip("; ")]
        )
    return buf.getvalue()
