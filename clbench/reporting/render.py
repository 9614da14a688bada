"""Leaderboard pages: markdown and self-contained HTML (with the figures), and `clbench leaderboard`."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Sequence

from clbench.errors import UsageError
from clbench.reporting.leaderboard import (
    MISSING,
    Leaderboard,
    Table,
    build,
    column_title,
    format_cell,
    load_results,
    provenance,
    published_text,
    provenance_text,
    tables,
    to_csv,
    to_json,
)
from clbench.reporting.results import RunResult

_IDS = {"Backbone": "backbone", "Device": "device"}


def _shared_ids(table: Table) -> tuple[dict[str, str], list[str]]:
    """Backbone and device shared by every row of a table (said once above it) and those that vary (columns)."""
    shared = {k: getattr(table.rows[0], a) for k, a in _IDS.items()
              if table.rows and len({getattr(r, a) for r in table.rows}) == 1}
    return shared, [k for k in _IDS if k not in shared]


def _heading(table: Table) -> str:
    return f"{table.scenario} ({table.task})"


def _settings_note(table: Table) -> str:
    return "Settings that differ between rows: " + "; ".join(table.differing) + "."


def to_markdown(lb: Leaderboard, headings: bool = True) -> str:
    """One table per scenario (scenarios sorted, rows best-first by the task's headline), each with only the
    columns its rows have; under it the settings that differ between its rows, its † notes and its failed runs.
    Then one legend; the page opens with its provenance when `lb.provenance` is set."""
    out = [provenance_text(lb.provenance), ""] if lb.provenance else []
    for table in tables(lb):
        if headings:
            out += [f"## {_heading(table)}", ""]
        out += _markdown_table(table)
    out.append(_legend(lb))
    if lb.skipped:
        out += ["", "Skipped files:", ""] + [f"- {p}: {why}" for p, why in lb.skipped]
    return "\n".join(out) + "\n"


def _markdown_table(table: Table) -> list[str]:
    out = []
    if table.rows:
        shared, varying = _shared_ids(table)
        if shared:
            out += [" · ".join(f"{k}: {v}" for k, v in shared.items()), ""]
        cols = table.columns
        head = ["Strategy", *varying, "Seeds"] + [column_title(c) for c in cols]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "|".join(["---"] * (2 + len(varying)) + ["---:"] * len(cols)) + "|")
        for row in table.rows:
            cells = []
            for c in cols:
                text = format_cell(c, row.cells[c.key], table.units.get(c.key))
                cells.append(f"**{text}**" if row.cells[c.key].best else text)
            label = row.label + (" (reference)" if row.reference else "") + (" †" if row.notes else "")
            ids = [getattr(row, _IDS[k]) for k in varying]
            out.append("| " + " | ".join([label, *ids, str(len(row.seeds))] + cells) + " |")
        out.append("")
        if table.differing:
            out += [_settings_note(table), ""]
        notes = [f"- † {row.label}: {note}" for row in table.rows for note in row.notes]
        if notes:
            out += notes + [""]
        published = [text for row in table.rows if (text := published_text(row))]
        if published:
            out += [PUBLISHED_NOTE, ""] + [f"- {text}" for text in published] + [""]
    if table.incomplete:
        keys = ["strategy", "seed", "status", "experiences", "error"]
        out += ["Failed or incomplete runs (not averaged):", ""]
        out.append("| " + " | ".join(k.capitalize() for k in keys) + " |")
        out.append("|" + "|".join(["---"] * len(keys)) + "|")
        for f in table.incomplete:
            label = f["strategy"] + (f"+{f['addons']}" if f["addons"] else "")
            vals = [label] + [str(f[k]).replace("|", "\\|") for k in keys[1:]]
            out.append("| " + " | ".join(vals) + " |")
        out.append("")
    return out


PUBLISHED_NOTE = "Published numbers (rows run with --paper-settings, beside the measured mean):"


DETECTION_LEGEND = (
    "On detection scenarios the AP columns give the final per-task mean AP over all / old / new classes, under "
    "each scenario's convention (recorded in every result): VOC-style scenarios AP50, 11-point VOC07 on "
    "`-voc07` names and COCO-style 101-point otherwise; COCO scenarios AP at IoU .50:.95, 101-point. "
)


FORECAST_LEGEND = (
    "On forecasting scenarios: final MSE = mean over experiences of the MSE after the last one, forgetting = mean "
    "error increase since each experience's best (positive: forgot), both on the scaled values (scaler policy in "
    "each result). "
)

WALL_TIME_LEGEND = (
    "Wall time: training time only, on the row's device: the time inside each experience's fits (their data "
    "loading included) plus training work a strategy does outside them, summed over experiences, less the FLOP "
    "counter's overhead; evaluation, model building and data preparation are not in it."
)
JETSON_MEASURED_LEGEND = "Jetson time (measured): the same training time, measured on the Jetson."
JETSON_ESTIMATED_LEGEND = (
    "Jetson time (estimated): the training time a calibrated roofline model predicts for the Jetson from the "
    "run's traced steps; its uncertainty band [T/(1+e), T·(1+e)] in brackets."
)


def _has(lb: Leaderboard, key: str) -> bool:
    return any(r.cells[key].mean is not None for r in lb.rows)


def legend_items(lb: Leaderboard) -> list[str]:
    """The legend: what the cells mean, then one item per time column shown."""
    from clbench.reporting.results import describe_kind  # what each kind's peak memory is

    items = [
        "Mean ± sample std over seeds (no ± for a single seed). ↑ higher is better, ↓ lower is better; "
        "**bold**: best in its scenario. Accuracy metrics in %, forgetting = max-minus-last (Mammoth/PILOT). "
        + (DETECTION_LEGEND if _has(lb, "final_ap_all") else "")
        + (FORECAST_LEGEND if _has(lb, "final_mse") else "")
        + "FLOPs, memory and times are in a unit chosen per column of each table. "
        + f"Peak memory kind: {'; '.join(describe_kind(k) for k in sorted(lb.memory_kinds)) or MISSING}."
        + _jetson_legend(lb)
    ]
    for key, text in (("train_time_s", WALL_TIME_LEGEND), ("jetson_time_measured_s", JETSON_MEASURED_LEGEND),
                      ("jetson_time_estimated_s", JETSON_ESTIMATED_LEGEND)):
        if _has(lb, key):
            items.append(text)
    for name, what in sorted({(row.label, row.reference) for row in lb.rows if row.reference}):
        items.append(f"{name} (reference): {what}; listed last and never marked best.")
    return items


def _legend(lb: Leaderboard) -> str:
    return "\n".join(f"- {item}" for item in legend_items(lb))


def _jetson_legend(lb: Leaderboard) -> str:
    devices, bands = sorted(lb.jetson.get("device", ())), sorted(lb.jetson.get("band", ()))
    if not devices:
        return ""
    text = f" Jetson time on {', '.join(devices)}"
    if bands:
        text += f"; estimates come from a calibrated roofline model, uncertainty band ±{bands[-1]}%"
    return text + "."


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in text)


def to_html(lb: Leaderboard, results: Sequence[RunResult] | None = None, title: str = "clbench leaderboard") -> str:
    """One self-contained page: provenance, legend, then per scenario a heading, its sortable table (in a
    horizontally scrolling box), its notes and failed runs and its plots embedded as base64 PNG."""
    from html import escape

    figures = _figures(results, lb) if results else {}
    parts = [f"<h1>{escape(title)}</h1>"]
    if lb.provenance:
        parts.append(f'<p class="provenance">{_code(escape(provenance_text(lb.provenance)))}</p>')
    items = [escape(i).replace("**bold**", "<b>bold</b>") for i in legend_items(lb)]
    items[0] += " Click a column header to sort."
    parts.append('<ul class="legend">' + "".join(f"<li>{i}</li>" for i in items) + "</ul>")
    for table in tables(lb):
        slug = _slug(table.scenario)
        parts.append(f'<h2 id="scenario-{slug}">{escape(_heading(table))}</h2>')
        if table.rows:
            shared, varying = _shared_ids(table)
            if shared:
                parts.append(f'<p class="shared">{escape(" · ".join(f"{k}: {v}" for k, v in shared.items()))}</p>')
            head = "".join(f'<th data-type="text" class="id">{escape(h)}</th>' for h in ("Strategy", *varying))
            head += '<th data-type="num" class="id">Seeds</th>' + "".join(
                f'<th data-type="num" title="{"higher" if c.higher_is_better else "lower"} is better">'
                f"{escape(column_title(c))}</th>" for c in table.columns)
            body = []
            for row in table.rows:
                label = row.label + (" (reference)" if row.reference else "") + (" †" if row.notes else "")
                tds = [f'<td class="id">{escape(v)}</td>' for v in (label, *(getattr(row, _IDS[k]) for k in varying))]
                tds.append(f'<td class="id" data-value="{len(row.seeds)}">{len(row.seeds)}</td>')
                for c in table.columns:
                    cell = row.cells[c.key]
                    value = "" if cell.mean is None else repr(cell.mean)
                    cls = ' class="best"' if cell.best else ""
                    text = format_cell(c, cell, table.units.get(c.key))
                    tds.append(f'<td data-value="{value}"{cls}>{escape(text)}</td>')
                note = f' title="{escape("; ".join(row.notes))}"' if row.notes else ""
                body.append(f"<tr{note}>{''.join(tds)}</tr>")
            parts.append(
                f'<div class="table-scroll"><table id="leaderboard-{slug}" class="sortable leaderboard" '
                f'data-scenario="{escape(table.scenario)}"><thead><tr>{head}</tr></thead>'
                f'<tbody>{"".join(body)}</tbody></table></div>'
            )
            if table.differing:
                parts.append(f'<p class="settings">{escape(_settings_note(table))}</p>')
            notes = "".join(f"<li>† {escape(row.label)}: {escape(note)}</li>" for row in table.rows for note in row.notes)
            if notes:
                parts.append(f'<ul class="notes">{notes}</ul>')
            published = "".join(f"<li>{escape(text)}</li>" for row in table.rows if (text := published_text(row)))
            if published:
                parts.append(f'<p class="published">{escape(PUBLISHED_NOTE)}</p><ul class="published">{published}</ul>')
        if table.incomplete:
            keys = ["strategy", "backbone", "seed", "status", "experiences", "error", "file"]
            rows = "".join("<tr>" + "".join(f"<td>{escape(str(f[k]))}</td>" for k in keys) + "</tr>"
                           for f in table.incomplete)
            ths = "".join(f'<th data-type="text">{k}</th>' for k in keys)
            parts.append(
                f"<h3>Failed or incomplete runs (not averaged)</h3>"
                f'<div class="table-scroll"><table id="incomplete-{slug}" class="sortable incomplete">'
                f"<thead><tr>{ths}</tr></thead><tbody>{rows}</tbody></table></div>"
            )
        parts += figures.get(table.scenario, [])
    if lb.skipped:
        items = "".join(f"<li>{escape(str(p))}: {escape(why)}</li>" for p, why in lb.skipped)
        parts.append(f"<h2>Skipped files</h2><ul>{items}</ul>")
    return _PAGE.format(title=escape(title), body="\n".join(parts))


def _code(text: str) -> str:
    """The command between backticks as <code>."""
    head, sep, rest = text.partition("`")
    if not sep:
        return text
    command, sep, tail = rest.partition("`")
    return f"{head}<code>{command}</code>{tail}" if sep else text


FIGURE_DPI = 150  # the PNG's pixels per inch
FIGURE_CSS_PX_PER_INCH = 120  # shown at this size (a 6.4 in figure is 768 CSS px wide, sharp on 2x screens too)


def _figures(results: Sequence[RunResult], lb: Leaderboard) -> dict[str, list[str]]:
    """Per scenario: its curves and Pareto plots as <figure> elements (heatmaps stay in `clbench plot`)."""
    import base64
    from html import escape

    from clbench.reporting import plots

    scenarios = sorted({r.scenario for r in results}, key=len, reverse=True)  # the longest name that prefixes a stem
    out: dict[str, list[str]] = {}
    for stem, caption, fig in plots.figures(results, lb):
        if "_heatmap_" in stem:
            continue
        scenario = next((s for s in scenarios if stem.startswith(f"{s}_")), "")
        width = round(fig.get_figwidth() * FIGURE_CSS_PX_PER_INCH)
        b64 = base64.b64encode(plots.png_bytes(fig, dpi=FIGURE_DPI)).decode("ascii")
        out.setdefault(scenario, []).append(
            f'<figure><img alt="{escape(caption)}" width="{width}" src="data:image/png;base64,{b64}">'
            f"<figcaption>{escape(caption)}</figcaption></figure>"
        )
    return out


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
.table-scroll {{ overflow-x: auto; max-width: 100%; margin: 1em 0; }}
table {{ border-collapse: collapse; font-size: 14px; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; white-space: nowrap; }}
td.id, th.id, table.incomplete td, table.incomplete th {{ text-align: left; }}
table.incomplete td {{ white-space: normal; }}
p.provenance {{ color: #555; font-size: 13px; }}
th {{ background: #f3f3f3; cursor: pointer; user-select: none; }}
th.asc::after {{ content: " \\25B2"; }} th.desc::after {{ content: " \\25BC"; }}
td.best {{ font-weight: bold; background: #e6f4e6; }}
figure {{ display: inline-block; margin: 1em 1em 1em 0; vertical-align: top; max-width: 100%; }}
figure img {{ max-width: 100%; height: auto; }}
figcaption {{ font-size: 14px; color: #444; }}
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
def command_line(args) -> str:
    """The `clbench leaderboard` command that produces this page, as one shell line."""
    argv = ["clbench", "leaderboard", args.results_dir]
    if args.scenario is not None:
        argv += ["--scenario", args.scenario]
    argv += ["--format", args.format]
    if args.out:
        argv += ["--out", args.out]
    return shlex.join(argv)


def cmd_leaderboard(args) -> int:
    loaded = load_results(args.results_dir, args.scenario)
    for path, why in loaded.skipped:
        print(f"clbench: warning: skipped {path}: {why}", file=sys.stderr)
    lb = build(loaded.results, loaded.paths, loaded.skipped)
    lb.provenance = provenance(args.results_dir, command_line(args))
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
