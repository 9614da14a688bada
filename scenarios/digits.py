"""Real handwritten digits bundled with scikit-learn: the embedded default scenario."""

from __future__ import annotations

import torch

from clbench.registry import register_scenario
from clbench.scenarios.base import (
    Scenario,
    ScenarioOptions,
    class_incremental_from_tensors,
    resolve_class_order,
    split_increments,
)


@register_scenario("digits-5")
def digits_5(options: ScenarioOptions) -> Scenario:
    """scikit-learn's 1,797 real 8x8 digits, 5 experiences x 2 classes; every 5th sample is test."""
    return digits(options, n=5)


@register_scenario("digits-{n}")
def digits(options: ScenarioOptions, n: int) -> Scenario:
    """The same digits split into n equal experiences (n must divide 10: 1, 2, 5 or 10)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(digits.target, dtype=torch.long)
    is_test = torch.arange(len(y)) % 5 == 0
    order = resolve_class_order(options.class_order, y.tolist())
    return class_incremental_from_tensors(
        f"digits-{n}",
        (x[~is_test], y[~is_test]),
        (x[is_test], y[is_test]),
        increments=split_increments(10, n),
        class_order=order,
        default_backbone="clbench_mlp",
        class_names=[str(c) for c in order],
        meta={"source": "sklearn.datasets.load_digits", "test_split": "every 5th sample"},
    )
