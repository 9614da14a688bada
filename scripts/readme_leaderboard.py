"""The README's CPU leaderboard: sweep every registered strategy, then print the Markdown tables.

    .venv/bin/python scripts/readme_leaderboard.py > leaderboard.md
    .venv/bin/python scripts/readme_leaderboard.py --grid digits-5=all --grid synthetic32-3=er,er_clfd

Each `--grid SCENARIO=STRATEGIES` (STRATEGIES: comma-separated names or `all`, every
registered strategy defined for the scenario's images) is one `clbench sweep` with the
given seeds into `--output-dir`; the default is `digits-5=all` and `synthetic32-3=all`
(the 3-channel scenario on which the CLFD family runs beside its bases);
runs already stored there are skipped, so an interrupted generation continues where
it stopped.  With `--add-ons` (repeatable: an add-on spec such as `logit_kd` or
`multi_teacher:policy=task_owner`, or `none` for the plain strategies) each grid is swept
once per add-on set, and the table compares them.  The sweep log goes to stderr; stdout
holds only the Markdown (one table per scenario, with the commands that reproduce it),
ready to paste.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

from clbench.reporting import leaderboard, render
from clbench.cli import main
from clbench.errors import UsageError


def cli(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grid", action="append", default=None, metavar="SCENARIO=STRATEGIES",
                   help="repeatable; default: digits-5=all and synthetic32-3=all")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--jobs", default="1", help="runs at a time (1 keeps wall times comparable)")
    p.add_argument("--output-dir", default="results/readme")
    p.add_argument("--add-ons", action="append", default=None, metavar="SPEC",
                   help="repeatable: sweep each grid once per add-on (`none`: without); default: none only")
    args = p.parse_args(argv)
    grids = []
    for item in args.grid or ["digits-5=all", "synthetic32-3=all"]:
        scenario, sep, strategies = item.partition("=")
        if not sep or not scenario or not strategies:
            p.error(f"--grid {item!r}: expected SCENARIO=STRATEGIES")
        grids.append((scenario, strategies))
    status = 0
    for scenario, strategies in grids:
        sweeps = []
        for add_on in args.add_ons or ["none"]:
            sweep = ["sweep", "--strategies", strategies, "--scenarios", scenario, "--seeds", args.seeds,
                     "--jobs", args.jobs, "--output-dir", args.output_dir]
            sweeps.append(sweep + ([] if add_on == "none" else ["--aux", add_on]))
            with contextlib.redirect_stdout(sys.stderr):
                status |= main(sweeps[-1])
        try:
            board = leaderboard.from_dir(args.output_dir, scenario)
        except UsageError as e:
            print(f"clbench: error: {e}", file=sys.stderr)
            return 2
        print(f"### {scenario}\n")
        commands = "; ".join(f"`clbench {' '.join(sweep)}`" for sweep in sweeps)
        print(f"Produced with {commands} then `clbench leaderboard {args.output_dir} --scenario {scenario}`.\n")
        print(render.to_markdown(board, headings=False))
    return status


if __name__ == "__main__":
    sys.exit(cli())
