"""Checks against the real datasets under the data root ($CLBENCH_DATA or ~/.cache/clbench/data).

Each test skips when its dataset is absent; run them with `pytest -m data tests/scenarios`.
"""

from __future__ import annotations

import pytest
import torch
from clbench.scenarios.base import ScenarioOptions

from clbench.datasets import make_loader
from clbench.errors import DataNotFoundError
from clbench.registry import SCENARIOS

pytestmark = pytest.mark.data


def build_or_skip(name: str):
    try:
        return SCENARIOS.get(name)(ScenarioOptions())
    except DataNotFoundError as e:
        pytest.skip(f"data not present: {e}")


@pytest.mark.parametrize(
    "name, train, test",
    [
        ("cifar10-5", 50_000, 10_000),
        ("cifar100-10", 50_000, 10_000),
        ("tinyimagenet-10", 100_000, 10_000),
        ("cub-10", 5_994, 5_794),
        ("imagenet-r-10", None, None),  # 30,000 in all; the split depends on the layout
        ("imagenet-subset-10", None, 5_000),
    ],
)
def test_real_dataset_sizes_and_a_batch(name, train, test):
    s = build_or_skip(name)
    n_train, n_test = sum(len(d) for d in s.train_sets), sum(len(d) for d in s.test_sets)
    if train is not None:
        assert n_train == train
    if test is not None:
        assert n_test == test
    if name == "imagenet-r-10":
        assert n_train + n_test == 30_000
    batch = next(iter(make_loader(s.train_sets[0], 8, shuffle=True)))
    assert batch.x.shape == (8, *s.input_shape) and torch.isfinite(batch.x).all()
    assert set(batch.y.tolist()) <= set(s.experience_classes(0))
    assert s.augment(batch.x).shape == batch.x.shape
