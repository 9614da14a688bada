"""benchmarks/profiler_overhead.py: its verdict arithmetic, and one short run end to end."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "profiler_overhead.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("profiler_overhead", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_equal_ratios_give_a_point_interval(bench):
    assert bench.bootstrap_interval([1.02] * 7) == (1.02, 1.02)


def test_interval_lies_within_the_ratios_and_holds_their_median(bench):
    ratios = [0.97, 0.99, 1.0, 1.01, 1.03, 1.2, 1.3]
    low, high = bench.bootstrap_interval(ratios)
    assert min(ratios) <= low <= 1.01 <= high <= max(ratios)
    assert low < high
    assert bench.bootstrap_interval(ratios) == (low, high)  # seeded: the same ratios print the same interval


def test_verdict_needs_the_whole_interval_on_one_side_of_the_target(bench):
    assert bench.verdict(high=1.049, low=0.95) == "met"
    assert bench.verdict(high=1.2, low=1.05) == "missed"
    assert bench.verdict(high=1.06, low=1.01) == "not decided at this many repeats"


def test_one_pair_of_runs_prints_every_line(bench, capsys):
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--scenario", "synthetic-2", "--epochs", "1", "--repeats", "1"]) == 0
    finally:
        torch.set_num_threads(threads)  # the script sets one thread for the process
    out = capsys.readouterr().out
    assert "er on synthetic-2 (default backbone), 1 epoch(s), 1 repeat(s)" in out
    assert "1 intra-op thread(s)" in out
    assert "95% bootstrap interval of the median" in out
    assert "identical accuracy matrix: True" in out
