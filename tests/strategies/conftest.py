"""Fixtures shared by the method tests."""

import pytest
import pytorch_lightning as pl
import torch

from clbench.engine.runner import create_scenario


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def scenario():
    """3 experiences x 2 classes of 3x32x32 images: the CNN-sized tiny configuration."""
    return create_scenario("synthetic32-3")


class FitSnapshots(pl.Callback):
    """Copies of `parts(module)` (a dict of tensors, lists or state dicts) at the start and end of
    every fit: `at[(experience, when)]`, or `at[(experience, phase, when)]` with `by_phase`. The
    callbacks' on_fit_end runs before the module's own, so "end" is what the fit's steps left."""

    def __init__(self, parts, by_phase: bool = False):
        self.parts, self.by_phase, self.at = parts, by_phase, {}

    def _keep(self, when, pl_module):
        key = (pl_module.experience.index, *((pl_module.phase.name,) if self.by_phase else ()), when)
        self.at[key] = {name: _copied(value) for name, value in self.parts(pl_module).items()}

    def on_fit_start(self, trainer, pl_module):
        self._keep("start", pl_module)

    def on_fit_end(self, trainer, pl_module):
        self._keep("end", pl_module)


def _copied(value):
    if isinstance(value, dict):
        return {k: _copied(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_copied(v) for v in value]
    return value.detach().clone()


@pytest.fixture(scope="session")
def fit_snapshots():
    """`fit_snapshots(parts, by_phase=False)`: a `FitSnapshots` callback (tests is not a package)."""
    return FitSnapshots


def _sign_elected_by_hand(thetas: torch.Tensor) -> torch.Tensor:
    """TUNA's merge written out element by element: the sign of the sum over the adapters wins,
    then the largest magnitude among the adapters of that sign (0 where the sum is 0)."""
    merged = []
    for column in thetas.double().T.tolist():
        total = sum(column)
        agreeing = [v for v in column if v != 0 and (v > 0) == (total > 0)]
        merged.append(max(agreeing, key=abs) if total != 0 else 0.0)
    return torch.tensor(merged, dtype=thetas.dtype)


@pytest.fixture(scope="session")
def sign_elected_by_hand():
    """The sign-elected merge of TUNA and SAEF, re-implemented independently of the code under test."""
    return _sign_elected_by_hand


@pytest.fixture
def task_ends_reach_add_ons(task_end_recorder):
    """Build strategy `name` the way a run does (create_strategy with the run's seed 5 and an add-on)
    and take it through synthetic32-3's task starts and ends: asserts that the seed and the add-on
    reach the strategy, that each start sets the running experience, and that the add-on sees
    every task end (a strategy overriding the hooks must still hand them on)."""
    from clbench.engine.runner import create_strategy, strategy_config

    def check(name: str, backbone, overrides: dict) -> None:
        strategy = create_strategy(name, backbone, 6, strategy_config(name, overrides), aux=[task_end_recorder], seed=5)
        assert strategy.seed == 5 and list(strategy.aux) == [task_end_recorder]
        scenario = create_scenario("synthetic32-3")
        tasks = [scenario.info(t) for t in range(3)]
        for task, data in zip(tasks, scenario.train_sets):
            strategy.on_experience_start(task)
            assert strategy.experience == task
            strategy.on_experience_end(task, data)
        assert task_end_recorder.ended == tasks

    return check
