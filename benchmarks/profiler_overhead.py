"""Wall-time overhead of the EdgeProfiler: the same run with and without it (target: under 1.05x).

    python benchmarks/profiler_overhead.py [--strategy er] [--scenario digits-5] [--epochs 5] [--repeats 3]

Runs alternate (without, with, without, with, ...) so drifting machine load hits both
sides; the ratios of the medians and of the fastest runs are printed, and the accuracy
matrices are compared.  FLOP counting costs a few counted steps per step shape and
experience, so its share shrinks with steps per experience: compare `--epochs 5` with
`--epochs 50`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from clbench import config as C
from clbench.runner import RunSpec, quiet_lightning, run


def timed(spec: RunSpec) -> tuple[float, float, list, float, int]:
    """Wall seconds, process CPU seconds (less sensitive to other jobs on a shared machine), accuracy
    matrix, seconds spent in FLOP-counted steps, and how many steps were counted."""
    t0, c0 = time.perf_counter(), time.process_time()
    result = run(spec)
    records = result.edge.get("per_experience", [])
    counting = sum(r.get("flop_count_time_s", 0.0) for r in records)
    counted = sum(r.get("flops_counted_steps", 0) for r in records)
    return time.perf_counter() - t0, time.process_time() - c0, result.accuracy_matrix, counting, counted


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--strategy", default="er")
    p.add_argument("--scenario", default="digits-5")
    p.add_argument("--backbone", default=None, help="default: the scenario's")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    quiet_lightning()
    times = {True: [], False: []}
    cpu = {True: [], False: []}
    matrices = {}
    counted_steps: list[tuple[float, int]] = []
    with tempfile.TemporaryDirectory() as out:
        def spec(profile: bool) -> RunSpec:
            cfg = C.RunConfig(epochs=args.epochs, backbone=args.backbone, progress=False,
                              output_dir=f"{out}/{int(profile)}", profile=profile, checkpoint=False)
            return RunSpec(args.strategy, args.scenario, run=cfg, seed=args.seed)

        timed(spec(False))  # warm-up: imports, dataset cache, first-call costs
        for _ in range(args.repeats):
            for profile in (False, True):
                t, c, matrices[profile], counting, counted = timed(spec(profile))
                if profile:
                    counted_steps.append((counting, counted))
                times[profile].append(t)
                cpu[profile].append(c)
    off, on = statistics.median(times[False]), statistics.median(times[True])
    print(f"{args.strategy} on {args.scenario} ({args.backbone or 'default backbone'}), {args.epochs} epoch(s), "
          f"{args.repeats} repeat(s)")
    print(f"  without profiler: {off:.2f} s (median of {[round(t, 2) for t in times[False]]})")
    print(f"  with profiler:    {on:.2f} s (median of {[round(t, 2) for t in times[True]]})")
    print(f"  ratio: {on / off:.3f}x wall (target < 1.05x); "
          f"{statistics.median(cpu[True]) / statistics.median(cpu[False]):.3f}x process CPU time; "
          f"{min(times[True]) / min(times[False]):.3f}x fastest runs (other load only adds time)")
    counting, counted = min(counted_steps)
    print(f"  FLOP-counted steps: {counted} per run, {counting:.2f} s inside them (their own compute included)")
    print(f"  identical accuracy matrix: {matrices[True] == matrices[False]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
