"""Sweep scaling: the same small grid with `--jobs 1` and `--jobs 2`; prints both wall times and their ratio.

    .venv/bin/python benchmarks/sweep_scaling.py [--strategies naive,er,lwf] [--scenario digits-5]
                                                 [--seeds 0,1] [--epochs 1] [--jobs 1,2]

Each setting starts from an empty results folder, so every run is executed (a sweep
skips stored results).  Every run gets a fresh worker process in both settings, so
the ratio measures parallelism, not process start-up; on a machine with fewer free
cores than jobs the ratio cannot reach the job count.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile
import time

from clbench.cli import main


def timed_sweep(args, jobs: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        argv = ["sweep", "--strategies", args.strategies, "--scenarios", args.scenario, "--seeds", args.seeds,
                "--epochs", str(args.epochs), "--accelerator", "cpu", "--jobs", str(jobs), "--output-dir", out]
        log = io.StringIO()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(log):
            code = main(argv)
        seconds = time.perf_counter() - t0
        if code != 0:
            raise SystemExit(f"sweep with --jobs {jobs} failed:\n{log.getvalue()}")
    return seconds


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--strategies", default="naive,er,lwf,ewc")
    p.add_argument("--scenario", default="digits-5")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--jobs", default="1,2", help="the job counts to compare, the first is the baseline")
    args = p.parse_args()
    counts = [int(j) for j in args.jobs.split(",")]
    runs = len(args.strategies.split(",")) * len(args.seeds.split(","))
    print(f"grid: {runs} runs ({args.strategies} on {args.scenario}, seeds {args.seeds}, {args.epochs} epoch(s)); "
          f"{os.cpu_count()} CPU cores")
    times = {}
    for jobs in counts:
        times[jobs] = timed_sweep(args, jobs)
        print(f"--jobs {jobs}: {times[jobs]:.1f} s wall")
    base = counts[0]
    for jobs in counts[1:]:
        print(f"speed-up --jobs {jobs} vs --jobs {base}: {times[base] / times[jobs]:.2f}x "
              f"(wall-time ratio {times[jobs] / times[base]:.2f})")


if __name__ == "__main__":
    cli()
