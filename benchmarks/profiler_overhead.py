"""Wall-time overhead of the EdgeProfiler: the same run with and without it (target: under 1.05x).

    python benchmarks/profiler_overhead.py [--strategy er] [--scenario synthetic32-3] [--epochs 5] [--repeats 30]
                                           [--threads 1] [--accelerator cpu|gpu|auto] [--flops sample|all|off]

The default run is CIFAR-shaped: ER on `synthetic32-3` (3x32x32 images, the scenario's
convnet), the shape of the image scenarios clbench targets (cifar100-10 and the like cannot
be downloaded here).  `--scenario digits-5` is the worst case: `make demo`'s sub-second run,
whose experiences last about 0.15 s, so the profiler's fixed cost per experience (a few
counted steps, the inference FLOPs, the Jetson estimate) is a visible share of it.

Runs alternate in pairs (without, with, then with, without, ...) so drifting machine load
hits both sides; the ratios of the medians, of the fastest runs and the median of the
per-pair ratios are printed, with a 95% bootstrap interval of that median: the target is
"met" when the whole interval lies under 1.05x, "missed" when it lies at or above, and
undecided otherwise (more `--repeats` narrow it; on the 2-core development machine, whose run
times scatter by tens of percent, about thirty pairs decide it: some nine minutes).  Runs use one intra-op thread by default:
with a thread per core, any other load on a small machine stalls every op and scatters run
times by tens of percent.  The accuracy matrices are compared.  It also checks the
profiler's reported training time: `train_time_s` (counting overhead removed) against the
fit time of the unprofiled runs, timed by a callback both kinds of run carry; and prints
the profiler's own time as it timed it inside the runs (`profiler_time_s`; it does not
depend on pairing runs, but it still slows down with the machine).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time

import pytorch_lightning as pl
import torch

from clbench import config as C
from clbench.engine.runner import RunSpec, quiet_lightning, run


class FitTimer(pl.Callback):
    """Wall time of every fit of a run (both kinds of run carry it, so it costs both the same)."""

    def __init__(self):
        self.seconds = 0.0

    def on_fit_start(self, trainer, pl_module):
        self._t0 = time.perf_counter()

    def on_fit_end(self, trainer, pl_module):
        self.seconds += time.perf_counter() - self._t0


def timed(spec: RunSpec) -> tuple[float, float, list, dict]:
    """Wall seconds, process CPU seconds (less sensitive to other jobs on a shared machine), accuracy
    matrix, and the training-time figures: fit time, the profiler's `train_time_s`, its raw
    value, and the time spent in FLOP-counted steps and their number."""
    fits = FitTimer()
    t0, c0 = time.perf_counter(), time.process_time()
    result = run(spec, callbacks=[fits])
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    totals = result.edge.get("totals", {})
    records = result.edge.get("per_experience", [])
    times = {"fit": fits.seconds, "reported": totals.get("train_time_s"), "raw": totals.get("train_time_raw_s"),
             "own": totals.get("profiler_time_s"),
             "counting": sum(r.get("flop_count_time_s", 0.0) for r in records),
             "counted": sum(r.get("flops_counted_steps", 0) for r in records)}
    return wall, cpu, result.accuracy_matrix, times


def bootstrap_interval(ratios: list[float], draws: int = 4000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the median of `ratios` (pairs resampled with replacement)."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(draws))
    return medians[int(0.025 * draws)], medians[int(0.975 * draws) - 1]


def verdict(high: float, low: float, target: float = 1.05) -> str:
    if high < target:
        return "met"
    return "missed" if low >= target else "not decided at this many repeats"


def device_name(accelerator: str) -> str:
    if accelerator != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"the CPU ({os.cpu_count()} cores)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--strategy", default="er")
    p.add_argument("--scenario", default="synthetic32-3")
    p.add_argument("--backbone", default=None, help="default: the scenario's")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--accelerator", default="cpu", choices=("cpu", "gpu", "auto"))
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (0: torch's default); one leaves the other cores to absorb other load")
    p.add_argument("--flops", default="sample", choices=("sample", "all", "off"),
                   help="the profiled runs' FLOP counting; 'off' shows what the rest of the profiler costs")
    args = p.parse_args(argv)
    quiet_lightning()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    times = {True: [], False: []}
    cpu = {True: [], False: []}
    matrices = {}
    figures: dict[bool, list[dict]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as out:
        def spec(profile: bool) -> RunSpec:
            cfg = C.RunConfig(epochs=args.epochs, backbone=args.backbone, progress=False,
                              output_dir=f"{out}/{int(profile)}", profile=profile, checkpoint=False,
                              flops=args.flops, accelerator=args.accelerator)
            return RunSpec(args.strategy, args.scenario, run=cfg, seed=args.seed)

        timed(spec(False))  # warm-up: imports, dataset cache, first-call costs
        for repeat in range(args.repeats):
            # ABBA order: a machine speeding up or slowing down within a pair does not favour one side
            for profile in ((False, True) if repeat % 2 == 0 else (True, False)):
                t, c, matrices[profile], figure = timed(spec(profile))
                figures[profile].append(figure)
                times[profile].append(t)
                cpu[profile].append(c)
    off, on = statistics.median(times[False]), statistics.median(times[True])
    print(f"{args.strategy} on {args.scenario} ({args.backbone or 'default backbone'}), {args.epochs} epoch(s), "
          f"{args.repeats} repeat(s), FLOP counting {args.flops}, on {device_name(args.accelerator)}, "
          f"{torch.get_num_threads()} intra-op thread(s)")
    print(f"  without profiler: {off:.2f} s (median of {[round(t, 2) for t in times[False]]})")
    print(f"  with profiler:    {on:.2f} s (median of {[round(t, 2) for t in times[True]]})")
    print(f"  ratio: {on / off:.3f}x wall (target < 1.05x); "
          f"{statistics.median(cpu[True]) / statistics.median(cpu[False]):.3f}x process CPU time; "
          f"{min(times[True]) / min(times[False]):.3f}x fastest runs (other load only adds time)")
    paired = sorted(on / off for off, on in zip(times[False], times[True]))
    low, high = bootstrap_interval(paired)
    print(f"  paired: {statistics.median(paired):.3f}x wall, median over the repeats of each profiled run over the "
          f"unprofiled run beside it (range {paired[0]:.3f}x to {paired[-1]:.3f}x; 95% bootstrap interval of the "
          f"median {low:.3f}x to {high:.3f}x: target {verdict(high, low)})")
    on_fits = figures[True]
    counted = on_fits[0]["counted"]
    counting = statistics.median(f["counting"] for f in on_fits)
    print(f"  FLOP-counted steps: {counted} per run, {counting:.2f} s inside them (their own compute included)")
    unprofiled_fit = statistics.median(f["fit"] for f in figures[False])
    reported = statistics.median(f["reported"] for f in on_fits)
    raw = statistics.median(f["raw"] for f in on_fits)
    print(f"  reported training time: train_time_s {reported:.3f} s, {reported / unprofiled_fit:.3f}x the unprofiled "
          f"fit time {unprofiled_fit:.3f} s (with counting left in: {raw / unprofiled_fit:.3f}x)")
    own = statistics.median(f["own"] for f in on_fits)
    print(f"  profiler's own time, timed inside the profiled runs: {own:.3f} s = {own / off:.3f} of the unprofiled "
          f"run's wall time (its hooks, plus what counting added to the counted steps; not Lightning's hook dispatch)")
    print(f"  identical accuracy matrix: {matrices[True] == matrices[False]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
