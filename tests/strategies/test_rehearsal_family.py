"""Every method of the rehearsal family beats naive fine-tuning on `synthetic32-3` (3 seeds, mean final accuracy)."""

from __future__ import annotations

import statistics

import pytest
import torch

from clbench.config import RunConfig
from clbench.engine.runner import RunSpec, run

# CLFD is one wrapper over each base: it is checked here over ER and DER++ (its other bases are
# checked alone above and in combination by the contract suite), which keeps the suite's time
METHODS = {
    "der_pp": {}, "er_ace": {}, "icarl": {}, "cls_er": {}, "lord": {"search_samples": 20, "search_noise": 8},
    "er_clfd": {}, "der_pp_clfd": {}, "fdinet": {"nf": 8},
}
# LoRD trains a compressed student (40% of an 8-channel ResNet's width in the second task) whose final
# accuracy on this tiny setup swings by up to 0.3 between seeds: five seeds keep its mean from deciding
# the comparison by one unlucky seed (naive varies little across seeds)
SEEDS = {"lord": 5}


def final_accuracy(strategy: str, seed: int, out, **overrides) -> float:
    cfg = RunConfig(epochs=2, batch_size=16, accelerator="cpu", progress=False, output_dir=str(out), backbone="resnet18_cifar_nf8")
    result = run(RunSpec(strategy, "synthetic32-3", run=cfg, strategy_overrides=overrides, seed=seed))
    assert result.status == "completed", result.error
    return result.metrics["final_avg_acc"]


@pytest.fixture(scope="module")
def naive_accuracy(tmp_path_factory):
    torch.set_num_threads(1)
    return statistics.mean(final_accuracy("naive", seed, tmp_path_factory.mktemp("naive")) for seed in range(3))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(METHODS))
def test_beats_naive_over_three_seeds(name, naive_accuracy, tmp_path):
    torch.set_num_threads(1)
    overrides = {"buffer_size": 20, "replay_batch_size": 16, **METHODS[name]}
    if name == "icarl":
        overrides.pop("replay_batch_size")
    accuracy = statistics.mean(final_accuracy(name, seed, tmp_path, **overrides) for seed in range(SEEDS.get(name, 3)))
    assert accuracy > naive_accuracy + 0.05, (name, accuracy, naive_accuracy)
