"""benchmarks/peer_avalanche.py: its arithmetic on hand-computed values, and one quick pair end to end."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "peer_avalanche.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("peer_avalanche", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


# --------------------------------------------------------------------------- mean and std
def test_mean_and_sample_std(bench):
    mean, std = bench.mean_std([0.2, 0.4])
    assert mean == pytest.approx(0.3)
    assert std == pytest.approx(math.sqrt(0.02))  # ((0.1)^2 + (0.1)^2) / (2 - 1)
    mean, std = bench.mean_std([0.5, 0.5, 0.8])
    assert mean == pytest.approx(0.6)
    assert std == pytest.approx(math.sqrt(0.03))  # (0.01 + 0.01 + 0.04) / 2


def test_one_value_has_no_std(bench):
    mean, std = bench.mean_std([0.7])
    assert mean == 0.7 and math.isnan(std)


# --------------------------------------------------------------------------- two standard errors
def test_difference_beyond_two_standard_errors(bench):
    # s1^2/n1 = 0.02/2 = 0.01, s2^2/n2 = 0.03/3 = 0.01: se = sqrt(0.02) = 0.1414, 2 se = 0.2828 < 0.3
    diff, se, inside = bench.two_se_verdict([0.2, 0.4], [0.5, 0.5, 0.8])
    assert diff == pytest.approx(-0.3)
    assert se == pytest.approx(math.sqrt(0.02))
    assert inside is False


def test_difference_within_two_standard_errors(bench):
    # both stds sqrt(0.02): se = sqrt(0.01 + 0.01) = 0.1414; |diff| = 0.05
    diff, se, inside = bench.two_se_verdict([0.2, 0.4], [0.25, 0.45])
    assert diff == pytest.approx(-0.05)
    assert se == pytest.approx(math.sqrt(0.02))
    assert inside is True


def test_identical_constant_runs_are_within(bench):
    assert bench.two_se_verdict([0.5, 0.5], [0.5, 0.5]) == (0.0, 0.0, True)


def test_single_runs_give_no_verdict(bench):
    diff, se, inside = bench.two_se_verdict([0.6], [0.5])
    assert diff == pytest.approx(0.1) and math.isnan(se) and inside is None


# --------------------------------------------------------------------------- paired ratio interval
def test_equal_ratios_give_a_point_interval(bench):
    assert bench.paired_ratio_interval([1.5, 3.0, 4.5], [1.0, 2.0, 3.0]) == (1.5, 1.5, 1.5)


def test_two_ratios_exact_bootstrap(bench):
    # ratios 1, 2; resamples (1,1) (1,2) (2,1) (2,2): medians 1, 1.5, 1.5, 2 with probability 1/4, 1/2, 1/4
    assert bench.paired_ratio_interval([1.0, 2.0], [1.0, 1.0]) == (1.5, 1.0, 2.0)


def test_three_ratios_exact_bootstrap(bench):
    # ratios 1, 2, 3; the median of a resample is 1 when at least two draws are 1: P = 3*(1/3)^2*(2/3) + (1/3)^3
    # = 7/27 = 0.259; likewise 3 with 7/27 and 2 with 13/27.  95%: the 2.5% and 97.5% points are 1 and 3
    assert bench.paired_ratio_interval([2.0, 4.0, 6.0], [2.0, 2.0, 2.0]) == (2.0, 1.0, 3.0)
    # 40%: the 30% point (cumulative 7/27 = 0.259 < 0.3, then 20/27 = 0.741) and the 70% point are both 2
    assert bench.paired_ratio_interval([2.0, 4.0, 6.0], [2.0, 2.0, 2.0], level=0.4) == (2.0, 2.0, 2.0)


def test_sampled_bootstrap_is_seeded_and_within_the_ratios(bench):
    ours, theirs = [1.0, 1.1, 0.9, 1.3, 1.2, 1.0, 0.95, 1.05, 1.15], [1.0] * 9  # 9^9 resamples: sampled
    median, low, high = bench.paired_ratio_interval(ours, theirs)
    assert median == pytest.approx(1.05)
    assert 0.9 <= low <= median <= high <= 1.3 and low < high
    assert bench.paired_ratio_interval(ours, theirs) == (median, low, high)


def test_unpaired_values_are_refused(bench):
    with pytest.raises(ValueError):
        bench.paired_ratio_interval([1.0, 2.0], [1.0])


# --------------------------------------------------------------------------- the command
def test_unknown_pair_is_refused(bench):
    with pytest.raises(SystemExit):
        bench.main(["--strategies", "gem"])


@pytest.mark.slow
def test_quick_naive_pair_end_to_end(bench, capsys):
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--quick", "--strategies", "naive"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "split checked" in out and "1 epochs" in out
    row = next(line for line in out.splitlines() if line.startswith("naive / Naive"))
    fields = row.split()
    ours, theirs = float(fields[3]), float(fields[4])
    assert 0.0 <= ours <= 1.0 and 0.0 <= theirs <= 1.0
    assert float(fields[5]) == pytest.approx(ours - theirs, abs=1.5e-3)
    assert fields[6] == "n/a" and fields[7] == "n/a"  # one seed: no standard error
    ratio = float(fields[8])
    assert ratio > 0 and f"[{ratio:.2f}, {ratio:.2f}]" in row
