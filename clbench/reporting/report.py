"""Plain-text rendering of one run for the terminal."""

from __future__ import annotations

import math

from clbench.metrics import FWT, METRICS
from clbench.reporting.results import RunResult
from clbench.tasks import task_of


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
    task_of(r).print_matrix(r, out)
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
            kind = totals.get("peak_memory_kind")
            if kind == "cpu_rss":  # a rise above each experience's starting RSS, not the process's size
                parts.append(f"peak memory {mem / 2**20:.1f} MiB (cpu_rss: rise above the RSS at experience start)")
            else:
                parts.append(f"peak memory {mem / 2**20:.1f} MiB ({kind})")
        if totals.get("process_peak_rss_bytes") is not None:
            parts.append(f"process peak RSS {totals['process_peak_rss_bytes'] / 2**20:.1f} MiB")
        if totals.get("rss_baseline_bytes") is not None:
            parts.append(f"RSS baseline {totals['rss_baseline_bytes'] / 2**20:.1f} MiB")
        print("efficiency: " + ", ".join(p for p in parts if p), file=out)
        jetson = totals.get("jetson") or {}
        if jetson.get("label"):  # says "measured" or "estimated ± band" itself
            print(f"Jetson {jetson.get('device')} ({jetson.get('power_mode', '?')}): {jetson['label']}", file=out)
    from clbench.reporting.results import result_path

    print(f"result: {result_path(r.run_config.get('output_dir', 'results'), r)}", file=out)
