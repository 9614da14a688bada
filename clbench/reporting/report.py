"""Plain-text rendering of one run for the terminal."""

from __future__ import annotations

import math

from clbench.reporting.metrics import FWT, METRICS
from clbench.reporting.results import RunResult


def format_matrix(R: list[list[float]]) -> str:
    if not R:
        return "(no experience finished)"
    n = len(R[0])
    header = "after \\ on " + " ".join(f"{'e' + str(j + 1):>6s}" for j in range(n))
    lines = [header]
    for i, row in enumerate(R):
        cells = " ".join(f"{100 * v:6.1f}" if j <= i else f"{'·':>6s}" for j, v in enumerate(row))
        lines.append(f"{'exp ' + str(i + 1):>10s} {cells}")
    return "\n".join(lines)


def format_metrics(metrics: dict[str, float]) -> str:
    rows = []
    for name, value in metrics.items():
        spec = METRICS.get(name, FWT if name == 'fwt' else None)
        arrow = "" if spec is None else (" (higher is better)" if spec.higher_is_better else " (lower is better)")
        shown = "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:6.2f}"
        rows.append(f"  {name:22s} {shown}{arrow}")
    return "\n".join(rows)


def print_result(r: RunResult, file=None) -> None:
    import sys

    out = file or sys.stdout
    print(f"\n{r.strategy} on {r.scenario} (backbone {r.backbone}, seed {r.seed}): {r.status}", file=out)
    if r.forecasting:
        _print_forecasting(r.forecasting, out)
    else:
        what = "per-task mean AP" if r.detection else "accuracy"
        print(f"{what} matrix (%), rows: after training experience i; columns: test experience j", file=out)
        print(format_matrix(r.accuracy_matrix), file=out)
    if r.metrics:
        print("metrics (%):", file=out)
        print(format_metrics(r.metrics), file=out)
    totals = r.edge.get("totals", {})
    if totals:
        t = totals.get("train_time_s")
        mem = totals.get("peak_memory_bytes")
        flops = totals.get("train_flops_total")
        parts = [f"train time {t:.2f} s" if t is not None else None]
        if flops:
            parts.append(f"train FLOPs {flops:.3e}")
        if mem:
            parts.append(f"peak memory {mem / 2**20:.1f} MiB ({totals.get('peak_memory_kind')})")
        print("efficiency: " + ", ".join(p for p in parts if p), file=out)
        jetson = totals.get("jetson") or {}
        if jetson.get("label"):  # says "measured" or "estimated ± band" itself
            print(f"Jetson {jetson.get('device')} ({jetson.get('power_mode', '?')}): {jetson['label']}", file=out)
    from clbench.reporting.results import result_path

    print(f"result: {result_path(r.run_config.get('output_dir', 'results'), r)}", file=out)


def _print_forecasting(record: dict, out) -> None:
    """The MSE matrix (scaled values, lower is better) and the error metrics."""
    R = record.get("mse_matrix") or []
    print("MSE matrix (scaled values, lower is better), rows: after training experience i; columns: test experience j",
          file=out)
    if not R:
        print("(no experience finished)", file=out)
        return
    print("after \\ on " + " ".join(f"{'e' + str(j + 1):>7s}" for j in range(len(R[0]))), file=out)
    for i, row in enumerate(R):
        print(f"{'exp ' + str(i + 1):>10s} " + " ".join(f"{v:7.4f}" for v in row), file=out)
    metrics = (record.get("metrics") or {}).get("mse") or {}
    for name in ("final_avg_error", "forgetting", "bwt_err", "plasticity_error"):
        value = metrics.get(name)
        shown = "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"
        print(f"  {name:22s} {shown} (lower is better)", file=out)
