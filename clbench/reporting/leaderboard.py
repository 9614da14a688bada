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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from clbench.errors import UsageError
from clbench.reporting.results import RunResult, load
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
    std: float | None
    n: int
    best: bool = False


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

    @property
    def label(self) -> str:
        return self.strategy + (f"+{self.addons}" if self.addons else "")


@dataclass
class Leaderboard:
    rows: list[Row]
    incomplete: list[tuple[RunResult, Path]]
    skipped: list[tuple[Path, str]]
    memory_kinds: set[str] = field(default_factory=set)  # cpu_rss / cuda_allocator: what "peak memory" means
    jetson: dict[str, set] = field(default_factory=dict)  # devices and estimate bands behind the Jetson columns
    columns: list[Column] = field(default_factory=lambda: list(COLUMNS))

    def scenarios(self) -> list[str]:
        return sorted({r.scenario for r in self.rows} | {r.scenario for r, _ in self.incomplete})


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n-1); std is 0 for a single seed, None for no value."""
    vals = [float(v) for v in values if v is not None and not _isnan(v)]
    if not vals:
        return None, None
    m = sum(vals) / len(vals)
    if len(vals) == 1:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def _isnan(v) -> bool:
    return isinstance(v, float) and math.isnan(v)


# Settings that identify how a run was made; the rest (paths, progress bars) do not change results.
_RUN_KEYS_IGNORED = {"output_dir", "progress", "data_root", "num_workers", "download"}


def _recipe(r: RunResult) -> str:
    run = {k: v for k, v in r.run_config.items() if k not in _RUN_KEYS_IGNORED}
    return json.dumps([r.strategy_config, run, r.paper_settings, r.pretrained], sort_keys=True, default=str)


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
        if len({_recipe(r) for r in runs}) > 1:
            notes.append("seeds were run with different settings")
        cells = {}
        for col in COLUMNS:
            values = [value(col, r) for r in runs]
            m, s = mean_std(values)
            cells[col.key] = Cell(m, s, sum(v is not None and not _isnan(v) for v in values))
        rows.append(Row(strategy, scenario, backbone, addons, device, sorted(by_seed), cells, notes, task_of(runs[0]).name))
    _mark_best(rows)
    rows.sort(key=lambda row: (row.scenario, _headline_order(row), row.label))
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
        same = [r for r in rows if r.scenario == scenario]
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
def format_cell(col: Column, cell: Cell) -> str:
    if cell.mean is None:
        return MISSING
    m = format(cell.mean * col.scale, col.fmt)
    if cell.n < 2 or (col.count and cell.std == 0):
        return m
    return f"{m} ± {format(cell.std * col.scale, col.fmt)}"


def column_title(col: Column) -> str:
    arrow = "↑" if col.higher_is_better else "↓"
    unit = f" ({col.unit})" if col.unit else ""
    return f"{col.title}{unit} {arrow}"


def shown_columns(lb: Leaderboard) -> list[Column]:
    """Columns with at least one value (md/html); csv and json keep every column."""
    return [c for c in lb.columns if any(r.cells[c.key].mean is not None for r in lb.rows)]


def incomplete_rows(lb: Leaderboard) -> list[dict[str, Any]]:
    out = []
    for r, p in lb.incomplete:
        expected = r.scenario_info.get("num_experiences")
        out.append(
            {
                "strategy": r.strategy,
                "scenario": r.scenario,
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
    """The JSON form: column metadata, rows with mean/std/n/best per column, incomplete runs, skipped files."""
    return {
        "columns": [
            {"key": c.key, "title": c.title, "higher_is_better": c.higher_is_better, "unit": c.unit, "scale": c.scale}
            for c in lb.columns
        ],
        "rows": [
            {
                "strategy": r.strategy,
                "scenario": r.scenario,
                "backbone": r.backbone,
                "addons": r.addons,
                "device": r.device,
                "seeds": r.seeds,
                "notes": r.notes,
                "values": {
                    k: {"mean": c.mean, "std": c.std, "n": c.n, "best": c.best} for k, c in r.cells.items()
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
    """One line per row (status ok) then one per failed/incomplete run; raw units, mean/std/best per column."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    keys = ["strategy", "scenario", "backbone", "addons", "device", "status", "seeds"]
    w.writerow(keys + [f"{c.key}_{s}" for c in lb.columns for s in ("mean", "std", "best")] + ["notes"])
    for r in lb.rows:
        vals = []
        for c in lb.columns:
            cell = r.cells[c.key]
            vals += ["" if cell.mean is None else repr(cell.mean), "" if cell.std is None else repr(cell.std), int(cell.best)]
        seeds = " ".join(map(str, r.seeds))
        w.writerow([r.strategy, r.scenario, r.backbone, r.addons, r.device, "ok", seeds] + vals + ["; ".join(r.notes)])
    for f in incomplete_rows(lb):
        w.writerow(
            [f["strategy"], f["scenario"], f["backbone"], f["addons"], f["device"], f["status"], f["seed"]]
            + [""] * (3 * len(lb.columns))
            + [f"{f['experiences']} experiences; {f['error']}".strip("; ")]
        )
    return buf.getvalue()
