"""Leaderboard pages: markdown and self-contained HTML (with the figures), and `clbench leaderboard`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from clbench.errors import UsageError
from clbench.reporting.leaderboard import (
    MISSING,
    Leaderboard,
    build,
    column_title,
    format_cell,
    incomplete_rows,
    load_results,
    shown_columns,
    to_csv,
    to_json,
)
from clbench.reporting.results import RunResult


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
    failed = incomplete_rows(lb)
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
    failed = incomplete_rows(lb)
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
