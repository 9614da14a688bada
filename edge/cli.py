"""`clbench profile`: a per-experience cost table (FLOPs, memory, time, Jetson time) for one strategy."""

from __future__ import annotations

import sys
import tempfile
from dataclasses import replace
from typing import Any

from clbench.errors import UsageError


def cmd_profile(args) -> int:
    from clbench.edge import devices
    from clbench.edge.profiler import EdgeProfiler

    from clbench.cli import spec_from_args
    from clbench.engine.runner import quiet_lightning, run

    devices.load(args.device)  # fail on a bad name before training
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps {args.steps} is invalid; expected a positive number of steps per experience")
    spec = spec_from_args(args, args.seed)
    run_cfg = replace(spec.run, progress=False)
    tmp = None
    if args.steps is not None:
        # a truncated run is not a result: it goes to a scratch folder, never into results/
        tmp = tempfile.TemporaryDirectory(prefix="clbench-profile-")
        run_cfg = replace(run_cfg, limit_train_batches=args.steps, epochs=1, output_dir=tmp.name)
    profiler = EdgeProfiler(flops=spec.run.flops, device=args.device, planned_epochs=spec.run.epochs if args.steps else None)
    quiet_lightning()
    try:
        result = run(replace(spec, run=run_cfg), profiler=profiler)
    finally:
        if tmp is not None:
            tmp.cleanup()
    print(format_profile(result.edge, title=f"{spec.strategy} on {spec.scenario} (backbone {result.backbone})",
                         steps=args.steps, planned_epochs=spec.run.epochs))
    if result.status != "completed":
        print(f"clbench: run {result.status}: {result.error}", file=sys.stderr)
        return 1
    return 0


def format_profile(edge: dict[str, Any], title: str = "", steps: int | None = None, planned_epochs: int | None = None) -> str:
    rows = edge.get("per_experience", [])
    totals = edge.get("totals", {})
    lines = []
    if title:
        lines.append(title)
    if steps is not None:
        lines.append(f"profiled {steps} step(s) per experience; 'planned' columns extrapolate to {planned_epochs} epoch(s)")
    header = ["exp", "steps", "samples", "train FLOPs", "counted", "fwd FLOPs/sample", "params train/total",
              "peak mem", "time s", "samples/s", "Jetson time"]
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
    return f"{b / 2**20:.1f} MiB ({kind})"


def _jetson(j) -> str:
    if not j:
        return "-"
    if "error" in j:
        return f"n/a ({j['error']})"
    return j.get("label", "-")
