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
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from clbench.errors import UsageError
from clbench.reporting.metrics import METRICS
from clbench.reporting.results import RunResult, load

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


def is_forecasting(r: RunResult) -> bool:
    return bool(r.forecasting) or r.scenario_info.get("task_type") == "forecasting"


def is_complete(r: RunResult) -> bool:
    expected = r.scenario_info.get("num_experiences")
    if is_forecasting(r):  # errors live in `forecasting`; `accuracy_matrix` stays empty
        rows = len((r.forecasting or {}).get("mse_matrix") or [])
        return r.status == "completed" and rows > 0 and (expected is None or rows == expected) and "metrics" in r.forecasting
    rows = len(r.accuracy_matrix)
    return r.status == "completed" and rows > 0 and (expected is None or rows == expected) and bool(r.metrics)


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


@dataclass(frozen=True)
class Column:
    key: str
    title: str
    higher_is_better: bool
    get: Callable[[RunResult], Any]
    scale: float = 1.0  # displayed value = stored value * scale
    fmt: str = ".2f"
    unit: str = ""
    count: bool = False  # integer counts: no "± 0" when every seed agrees


def _metric(key: str, title: str) -> Column:
    return Column(key, title, METRICS[key].higher_is_better, lambda r: r.metrics.get(key), 100.0, ".1f", "%")


def final_ap(part: str) -> Callable[[RunResult], float | None]:
    """Detection runs: the final task's mean AP over `part` (all / old / new) classes."""

    def get(r: RunResult):
        per_task = (r.detection or {}).get("per_task") or []
        value = per_task[-1].get(part) if per_task else None
        return None if value is None or _isnan(value) else value

    return get


def forecast_metric(key: str) -> Callable[[RunResult], float | None]:
    """Forecasting runs: an error metric on the MSE matrix (scaled values; lower is better)."""

    def get(r: RunResult):
        value = ((r.forecasting or {}).get("metrics") or {}).get("mse", {}).get(key)
        return None if value is None or _isnan(value) else value

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


COLUMNS: list[Column] = [
    _metric("final_avg_acc", "Final acc"),
    _metric("avg_incremental_acc", "Avg inc. acc"),
    _metric("forgetting_max", "Forgetting"),
    _metric("bwt", "BWT"),
    Column("final_ap_all", "Final AP all", True, final_ap("all"), 100.0, ".1f", "%"),
    Column("final_ap_old", "Final AP old", True, final_ap("old"), 100.0, ".1f", "%"),
    Column("final_ap_new", "Final AP new", True, final_ap("new"), 100.0, ".1f", "%"),
    Column("final_mse", "Final MSE", False, forecast_metric("final_avg_error"), 1.0, ".4f"),
    Column("forgetting_mse", "Forgetting (MSE)", False, forecast_metric("forgetting"), 1.0, ".4f"),
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
            values = [col.get(r) for r in runs]
            m, s = mean_std(values)
            cells[col.key] = Cell(m, s, sum(v is not None and not _isnan(v) for v in values))
        rows.append(Row(strategy, scenario, backbone, addons, device, sorted(by_seed), cells, notes))
    _mark_best(rows)
    rows.sort(key=lambda row: (row.scenario, -(row.cells["final_avg_acc"].mean or -1.0),
                               row.cells["final_mse"].mean if row.cells["final_mse"].mean is not None else 0.0, row.label))
    kinds = {(r.edge.get("totals") or {}).get("peak_memory_kind") for r in results} - {None}
    return Leaderboard(rows, incomplete, list(skipped), kinds, jetson_facts(results))


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


def _incomplete_rows(lb: Leaderboard) -> list[dict[str, Any]]:
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


def to_markdown(lb: Leaderboard) -> str:
    """Markdown table; scenario, backbone and device columns shared by every row move to one line above it."""
    cols = shown_columns(lb)
    keys = {"Scenario": "scenario", "Backbone": "backbone", "Device": "device"}
    shared = {k: getattr(lb.rows[0], a) for k, a in keys.items() if lb.rows and len({getattr(r, a) for r in lb.rows}) == 1}
    varying = [k for k in keys if k not in shared]
    head = ["Strategy", *varying, "Seeds"] + [column_title(c) for c in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * (2 + len(varying)) + ["---:"] * len(cols)) + "|"]
    for row in lb.rows:
        cells = []
        for c in cols:
            text = format_cell(c, row.cells[c.key])
            cells.append(f"**{text}**" if row.cells[c.key].best else text)
        label = row.label + (" †" if row.notes else "")
        ids = [getattr(row, keys[k]) for k in varying]
        lines.append("| " + " | ".join([label, *ids, str(len(row.seeds))] + cells) + " |")
    if shared:
        lines.insert(0, " · ".join(f"{k}: {v}" for k, v in shared.items()) + "\n")
    out = ["\n".join(lines), "", _legend(lb)]
    for row in lb.rows:
        for note in row.notes:
            out.append(f"- † {row.label} on {row.scenario}: {note}")
    failed = _incomplete_rows(lb)
    if failed:
        out += ["", "Failed or incomplete runs (not averaged):", ""]
        keys = ["strategy", "scenario", "seed", "status", "experiences", "error"]
        out.append("| " + " | ".join(k.capitalize() for k in keys) + " |")
        out.append("|" + "|".join(["---"] * len(keys)) + "|")
        for f in failed:
            label = f["strategy"] + (f"+{f['addons']}" if f["addons"] else "")
            vals = [label] + [str(f[k]).replace("|", "\\|") for k in keys[1:]]
            out.append("| " + " | ".join(vals) + " |")
    return "\n".join(out) + "\n"


DETECTION_LEGEND = (
    "On detection scenarios the accuracy metrics are computed from per-task mean AP, and the AP columns give "
    "the final AP over all / old / new classes (VOC-style scenarios: AP50; COCO: AP at IoU .50:.95; "
    "COCO-style 101-point interpolation). "
)


FORECAST_LEGEND = (
    "On forecasting scenarios: final MSE = mean over experiences of the MSE after the last one, forgetting = mean "
    "error increase since each experience's best (positive: forgot), both on the scaled values (scaler policy in "
    "each result). "
)


def _legend(lb: Leaderboard) -> str:
    return (
        "Mean ± sample std over seeds. ↑ higher is better, ↓ lower is better; **bold**: best in its scenario. "
        "Accuracy metrics in %, forgetting = max-minus-last (Mammoth/PILOT). "
        + (DETECTION_LEGEND if any(r.cells["final_ap_all"].mean is not None for r in lb.rows) else "")
        + (FORECAST_LEGEND if any(r.cells["final_mse"].mean is not None for r in lb.rows) else "") +
        f"Peak memory kind: {', '.join(sorted(lb.memory_kinds)) or MISSING}."
        + _jetson_legend(lb)
    )


def _jetson_legend(lb: Leaderboard) -> str:
    devices, bands = sorted(lb.jetson.get("device", ())), sorted(lb.jetson.get("band", ()))
    if not devices:
        return ""
    text = f" Jetson time on {', '.join(devices)}"
    if bands:
        text += f"; estimates come from a calibrated roofline model, uncertainty band ±{bands[-1]}%"
    return text + "."


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
        "incomplete": _incomplete_rows(lb),
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
    for f in _incomplete_rows(lb):
        w.writerow(
            [f["strategy"], f["scenario"], f["backbone"], f["addons"], f["device"], f["status"], f["seed"]]
            + [""] * (3 * len(lb.columns))
            + [f"{f['experiences']} experiences; {f['error']}".strip("; ")]
        )
    return buf.getvalue()


def to_html(lb: Leaderboard, results: Sequence[RunResult] | None = None, title: str = "clbench leaderboard") -> str:
    """One self-contained page: sortable table, failed runs, and the plots embedded as base64 PNG."""
    from html import escape

    cols = shown_columns(lb)
    head = "".join(
        f'<th data-type="text">{escape(h)}</th>' for h in ("Strategy", "Scenario", "Backbone", "Device", "Seeds")
    ) + "".join(
        f'<th data-type="num" title="{"higher" if c.higher_is_better else "lower"} is better">{escape(column_title(c))}</th>'
        for c in cols
    )
    body = []
    for row in lb.rows:
        tds = [f"<td>{escape(v)}</td>" for v in (row.label, row.scenario, row.backbone, row.device)]
        tds.append(f'<td data-value="{len(row.seeds)}">{len(row.seeds)}</td>')
        for c in cols:
            cell = row.cells[c.key]
            value = "" if cell.mean is None else repr(cell.mean)
            cls = ' class="best"' if cell.best else ""
            tds.append(f'<td data-value="{value}"{cls}>{escape(format_cell(c, cell))}</td>')
        note = f' title="{escape("; ".join(row.notes))}"' if row.notes else ""
        body.append(f"<tr{note}>{''.join(tds)}</tr>")
    parts = [
        f"<h1>{escape(title)}</h1>",
        f"<p>{escape(_legend(lb)).replace('**bold**', '<b>bold</b>')} Click a column header to sort.</p>",
        f'<table id="leaderboard" class="sortable"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>',
    ]
    failed = _incomplete_rows(lb)
    if failed:
        keys = ["strategy", "scenario", "backbone", "seed", "status", "experiences", "error", "file"]
        rows = "".join("<tr>" + "".join(f"<td>{escape(str(f[k]))}</td>" for k in keys) + "</tr>" for f in failed)
        ths = "".join(f'<th data-type="text">{k}</th>' for k in keys)
        parts.append(
            "<h2>Failed or incomplete runs (not averaged)</h2>"
            f'<table id="incomplete" class="sortable"><thead><tr>{ths}</tr></thead><tbody>{rows}</tbody></table>'
        )
    if lb.skipped:
        items = "".join(f"<li>{escape(str(p))}: {escape(why)}</li>" for p, why in lb.skipped)
        parts.append(f"<h2>Skipped files</h2><ul>{items}</ul>")
    if results:
        from clbench.reporting import plots

        figures = "".join(
            f'<figure><img alt="{escape(caption)}" src="data:image/png;base64,{b64}"><figcaption>{escape(caption)}</figcaption></figure>'
            for caption, b64 in plots.embedded_figures(results, lb)
        )
        parts.append(f"<h2>Plots</h2>{figures}")
    return _PAGE.format(title=escape(title), body="\n".join(parts))


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 14px; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; white-space: nowrap; }}
td:nth-child(-n+4), th:nth-child(-n+4) {{ text-align: left; }}
th {{ background: #f3f3f3; cursor: pointer; user-select: none; }}
th.asc::after {{ content: " \\25B2"; }} th.desc::after {{ content: " \\25BC"; }}
td.best {{ font-weight: bold; background: #e6f4e6; }}
figure {{ display: inline-block; margin: 1em; }} img {{ max-width: 640px; }}
</style></head><body>
{body}
<script>
document.querySelectorAll("table.sortable").forEach(function (table) {{
  table.querySelectorAll("th").forEach(function (th, index) {{
    th.addEventListener("click", function () {{
      var asc = !th.classList.contains("asc");
      table.querySelectorAll("th").forEach(function (h) {{ h.classList.remove("asc", "desc"); }});
      th.classList.add(asc ? "asc" : "desc");
      var numeric = th.dataset.type === "num";
      var rows = Array.from(table.tBodies[0].rows);
      rows.sort(function (a, b) {{
        var x = a.cells[index], y = b.cells[index];
        if (numeric) {{
          var u = parseFloat(x.dataset.value), v = parseFloat(y.dataset.value);
          if (isNaN(u)) return 1; if (isNaN(v)) return -1;  // missing values last
          return asc ? u - v : v - u;
        }}
        return asc ? x.textContent.localeCompare(y.textContent) : y.textContent.localeCompare(x.textContent);
      }});
      rows.forEach(function (r) {{ table.tBodies[0].appendChild(r); }});
    }});
  }});
}});
</script>
</body></html>
"""


FORMATTERS = {"md": to_markdown, "csv": to_csv, "json": to_json}


def render(lb: Leaderboard, fmt: str, results: Sequence[RunResult] | None = None) -> str:
    if fmt == "html":
        return to_html(lb, results)
    if fmt not in FORMATTERS:
        raise UsageError(f"leaderboard format {fmt!r} is unknown; expected md, csv, html or json")
    return FORMATTERS[fmt](lb)


# --------------------------------------------------------------------------- CLI
def cmd_leaderboard(args) -> int:
    loaded = load_results(args.results_dir, args.scenario)
    for path, why in loaded.skipped:
        print(f"clbench: warning: skipped {path}: {why}", file=sys.stderr)
    lb = build(loaded.results, loaded.paths, loaded.skipped)
    text = render(lb, args.format, loaded.results)
    if args.out:
        out = Path(args.out)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text, encoding="utf-8")
        except OSError as e:
            raise UsageError(f"--out {args.out!r} cannot be written ({e.strerror or e}); expected a file path in a "
                             f"writable directory") from None
        print(f"leaderboard: {len(lb.rows)} rows, {len(lb.incomplete)} failed/incomplete runs -> {out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
