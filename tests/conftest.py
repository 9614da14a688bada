"""Shared fixtures: a fast CPU RunConfig, a tiny backbone and the synthetic scenarios.

Everything here runs offline on CPU in well under a second per run: the synthetic
scenarios are Gaussian clusters of 1x8x8 inputs, and the fast RunConfig trains one
epoch capped at two batches.
"""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch

from clbench.config import RunConfig

# `CLBENCH_TEST_ACCELERATOR=gpu pytest tests/test_registry.py` runs the contract tests of every
# strategy on a CUDA GPU (tests that compare numbers computed on the CPU expect "cpu")
TEST_ACCELERATOR = os.environ.get("CLBENCH_TEST_ACCELERATOR", "cpu")


def fast_config(output_dir, **overrides) -> RunConfig:
    """One epoch, two batches per fit, CPU (or $CLBENCH_TEST_ACCELERATOR), no progress bar, results under `output_dir`."""
    base = RunConfig(
        epochs=1,
        batch_size=16,
        eval_batch_size=256,
        accelerator=TEST_ACCELERATOR,
        limit_train_batches=2,
        progress=False,
        output_dir=str(output_dir),
    )
    return replace(base, **overrides)


@pytest.fixture(autouse=True, scope="session")
def _quiet_lightning():
    from clbench.engine.runner import quiet_lightning

    quiet_lightning()


@pytest.fixture(autouse=True, scope="session")
def _one_thread_per_xdist_worker():
    """Under pytest-xdist (`make test` runs one worker per core) each worker keeps to one intra-op
    thread: two workers with a thread per core each would thrash the cores they share."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests: on a 2-core machine, two threads per convolution
    thrash under any other load (measured up to 20x slower detection steps)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def fast_run_config(tmp_path) -> RunConfig:
    return fast_config(tmp_path)


@pytest.fixture(scope="session")
def synthetic_scenario():
    """`synthetic-2` (2 experiences x 2 classes of 1x8x8 clusters), built once per session."""
    from clbench.engine.runner import create_scenario

    return create_scenario("synthetic-2")


@pytest.fixture
def tiny_backbone():
    from clbench.models.backbones import build_backbone

    torch.manual_seed(0)
    return build_backbone("clbench_mlp_tiny", in_chans=1, img_size=8)


def make_strategy(name: str, scenario, backbone=None, seed: int = 0, **cfg_overrides):
    """A registered strategy on `scenario` with its default Config plus overrides (`backbone`: a module,
    a backbone name, or None for the scenario's default)."""
    from clbench.engine.runner import create_strategy, strategy_config
    from clbench.models.backbones import build_backbone

    if scenario.task_type == "detection":  # detection methods build their detector from their Config
        torch.manual_seed(seed)
    elif backbone is None or isinstance(backbone, str):
        torch.manual_seed(seed)
        backbone = build_backbone(
            backbone or scenario.default_backbone, in_chans=scenario.input_shape[0], img_size=scenario.input_shape[-1]
        )
    strategy = create_strategy(name, backbone, scenario.num_classes, strategy_config(name, cfg_overrides), seed=seed)
    strategy.augment = scenario.augment
    return strategy


def first_batch(dataset, n: int = 16):
    """The first `n` samples of a dataset as a `Batch`."""
    from clbench.datasets import make_loader

    return next(iter(make_loader(dataset, n, shuffle=False)))


@pytest.fixture
def strategy_factory(synthetic_scenario, tiny_backbone):
    """`strategy_factory(name, **cfg)`: the strategy on synthetic-2 with the tiny backbone."""

    def build(name: str, **cfg_overrides):
        return make_strategy(name, synthetic_scenario, tiny_backbone, **cfg_overrides)

    return build


@pytest.fixture(scope="session")
def build_strategy():
    """`build_strategy(name, scenario, backbone=None, seed=0, **cfg)` (helpers are fixtures: tests is not a package)."""
    return make_strategy


@pytest.fixture(scope="session")
def batch_of():
    """`batch_of(dataset, n=16)`: its first n samples as a Batch."""
    return first_batch


def interrupted_and_resumed(spec, out, stop_after: int = 2):
    """(an uninterrupted run, the same run stopped by Ctrl-C after experience `stop_after` and then
    resumed); `spec(output_dir, resume)` builds the RunSpec, runs go under `out`."""
    from clbench.engine.runner import run

    whole = run(spec(out / "whole", False))

    def stop(i, result, strategy):
        if i == stop_after:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(spec(out / "cut", False), on_experience=stop)
    return whole, run(spec(out / "cut", True))


@pytest.fixture(scope="session")
def resume_pair():
    """`resume_pair(spec, out, stop_after=2)`: see `interrupted_and_resumed`."""
    return interrupted_and_resumed


@pytest.fixture(scope="session")
def fast_config_for():
    """`fast_config_for(output_dir, **overrides)`: the fast RunConfig with changes."""
    return fast_config


@pytest.fixture
def task_end_recorder():
    """An add-on that records every experience its `on_experience_end` is handed: whether a strategy's
    task-end hook reaches the run's add-ons."""
    from clbench.auxiliary.base import Aux

    class TaskEndRecorder(Aux):
        def __init__(self):
            super().__init__()
            self.ended = []

        def on_experience_end(self, strategy, exp):
            self.ended.append(exp)

    return TaskEndRecorder()
