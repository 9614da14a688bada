"""The profiler's cost table for the terminal: per-experience FLOPs, memory, time and Jetson time."""

from __future__ import annotations

from typing import Any



def format_profile(edge: dict[str, Any], title: str = "", steps: int | None = None, planned_epochs: int | None = None) -> str:
    rows = edge.get("per_experience", [])
    totals = edge.get("totals", {})
    lines = []
    if title:
        lines.append(title)
    if steps is not None:
        lines.append(f"profiled {steps} step(s) per experience; 'planned' columns extrapolate to {planned_epochs} epoch(s)")
    header = ["exp", "steps", "samples", "train FLOPs", "counted", "fwd FLOPs/sample", "params train/total",
              "peak mem", "process RSS", "time s", "samples/s", "Jetson time"]
    table = [header]
    for r in rows:
        table.append([
            str(r.get("experience", "?") + 1 if isinstance(r.get("experience"), int) else "?"),
            str(r.get("steps", "")),
            str(r.get("samples", "")),
            _e(r.get("train_flops_exp")),
            f"{r.get('flops_counted_steps', 0)} ({r.get('flops_method', '-')})",
            _e(r.get("fwd_flops_per_sample")),
            f"{_si(r.get('trainable_params'))}/{_si(r.get('total_params'))}",
            _mem(r.get("peak_memory_bytes"), r.get("peak_memory_kind")),
            _mib(r.get("process_peak_rss_bytes")),
            f"{r.get('train_time_s', 0):.2f}",
            f"{r['samples_per_s']:.0f}" if r.get("samples_per_s") else "-",
            _jetson(r.get("jetson")),
        ])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        lines.append("  ".join(c.rjust(w) if i < len(header) - 1 else c for i, (c, w) in enumerate(zip(row, widths))))
    lines.append("")
    lines.append(
        f"total: {totals.get('steps', 0)} steps, train FLOPs {_e(totals.get('train_flops_total'))}, "
        f"peak memory {_mem(totals.get('peak_memory_bytes'), totals.get('peak_memory_kind'))}, "
        f"host time {totals.get('train_time_s', 0):.2f} s ({totals.get('train_time_source', '')})"
    )
    lines.append(memory_line(totals))
    if "train_flops_total_planned" in totals:
        lines.append(f"planned full run: train FLOPs {_e(totals['train_flops_total_planned'])}")
    j = totals.get("jetson")
    if j:
        lines.append(f"Jetson {j.get('device')} [{j.get('source', '')}]: {_jetson(j)}")
        if "planned_time_s" in j:
            lines.append(f"  planned full run: {j['planned_time_s']:.1f} s estimated [{j['planned_low_s']:.1f}, {j['planned_high_s']:.1f}]")
        if j.get("note"):
            lines.append(f"  {j['note']} ({j.get('n_calibration_points')} calibration points, band = leave-one-out max error)")
    if totals.get("flops_convention"):
        lines.append(totals["flops_convention"])
    return "\n".join(lines)


def memory_line(totals: dict[str, Any]) -> str:
    """What the peak-memory figure means, with the process peak RSS and the baseline beside the rise."""
    from clbench.reporting.results import describe_kind

    parts = [f"peak memory: {describe_kind(totals.get('peak_memory_kind'))}"]
    if totals.get("process_peak_rss_bytes") is not None:
        parts.append(f"process peak RSS {totals['process_peak_rss_bytes'] / 2**20:.1f} MiB")
    if totals.get("rss_baseline_bytes") is not None:
        parts.append(f"RSS before the first experience {totals['rss_baseline_bytes'] / 2**20:.1f} MiB")
    return "; ".join(parts)


def _e(v) -> str:
    return "-" if v is None else f"{v:.3e}"


def _si(v) -> str:
    if v is None:
        return "-"
    for unit, div in (("M", 1e6), ("k", 1e3)):
        if v >= div:
            return f"{v / div:.2f}{unit}"
    return str(v)


def _mem(b, kind) -> str:
    if b is None:
        return "-"
    label = "cpu_rss rise" if kind == "cpu_rss" else kind
    return f"{b / 2**20:.1f} MiB ({label})"


def _mib(b) -> str:
    return "-" if b is None else f"{b / 2**20:.1f} MiB"


def _jetson(j) -> str:
    if not j:
        return "-"
    if "error" in j:
        return f"n/a ({j['error']})"
    return j.get("label", "-")
