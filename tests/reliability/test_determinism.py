"""Same seed, same machine: identical results; another seed: different ones."""

from __future__ import annotations

import json

import pytest

from clbench.config import RunConfig
from clbench.engine.runner import RunSpec, run

TIMING_KEYS = {"train_time_s", "samples_per_s", "train_time_e2e_s", "peak_memory_bytes", "peak_rss_bytes",
               "peak_alloc_bytes", "peak_reserved_bytes", "process_peak_rss_bytes", "rss_baseline_bytes"}


def _strip_timings(obj):
    if isinstance(obj, dict):
        return {k: _strip_timings(v) for k, v in obj.items() if k not in TIMING_KEYS and "time" not in k}
    if isinstance(obj, list):
        return [_strip_timings(v) for v in obj]
    return obj


@pytest.mark.parametrize("strategy", ["er", "lwf"])
def test_same_seed_gives_identical_result_json(tmp_path, strategy):
    cfg = lambda d: RunConfig(epochs=1, progress=False, output_dir=str(tmp_path / d), limit_train_batches=4)  # noqa: E731
    a = run(RunSpec(strategy, "synthetic-5", run=cfg("a"), seed=4))
    b = run(RunSpec(strategy, "synthetic-5", run=cfg("b"), seed=4))
    c = run(RunSpec(strategy, "synthetic-5", run=cfg("c"), seed=5))
    assert a.accuracy_matrix == b.accuracy_matrix
    ja, jb = (json.loads(next((tmp_path / d).rglob("*.json")).read_text()) for d in "ab")
    for j in (ja, jb):
        j.pop("run_config")  # holds the output directory
        j.pop("environment")
    assert _strip_timings(ja) == _strip_timings(jb)
    assert a.accuracy_matrix != c.accuracy_matrix
