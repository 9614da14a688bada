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
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(digits.target, dtype=torch.long)
    is_test = torch.arange(len(y)) % 5 == 0
    order = resolve_class_order(options.class_order, y.tolist())
    return class_incremental_from_tensors(
        "digits-5",
        (x[~is_test], y[~is_test]),
        (x[is_test], y[is_test]),
        increments=split_increments(10, 5),
        class_order=order,
        default_backbone="clbench_mlp",
        class_names=[str(c) for c in order],
        meta={"source": "sklearn.datasets.load_digits", "test_split": "every 5th sample"},
    )
