"""Regenerate `tests/fixtures/sweep/`: the small results fixture the leaderboard, plot and notebook tests read.

It is the output of real sweeps (nothing edited by hand):
  naive, er, lwf, joint on synthetic-5, seeds 0 and 1, one epoch;
  naive, er on synthetic-2, seeds 0 and 1, one epoch;
  ewc on synthetic-2, seed 0, with lr=1e30: its loss overflows, so the stored run is `failed`
  (the leaderboard must list it apart, never average it).

    .venv/bin/python scripts/make_results_fixture.py
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from clbench.cli import main

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "sweep"

SWEEPS = [
    ["--strategies", "naive,er,lwf,joint", "--scenarios", "synthetic-5", "--seeds", "0,1"],
    ["--strategies", "naive,er", "--scenarios", "synthetic-2", "--seeds", "0,1"],
    ["--strategies", "ewc", "--scenarios", "synthetic-2", "--seeds", "0", "--set", "lr=1e30"],
]


def generate(out: Path = OUT) -> Path:
    shutil.rmtree(out, ignore_errors=True)
    for args in SWEEPS:
        main(["sweep", *args, "--epochs", "1", "--accelerator", "cpu", "--output-dir", str(out)])
    shutil.rmtree(out / ".resume", ignore_errors=True)
    return out


if __name__ == "__main__":
    print(generate(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT))
