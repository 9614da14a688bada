"""Real handwritten digits bundled with scikit-learn: the embedded default scenario."""

from __future__ import annotations

import torch
from clbench.scenarios.base import (
    Scenario,
    ScenarioOptions,
    class_incremental_from_tensors,
    resolve_class_order,
    split_increments,
)

from clbench.registry import register_scenario


@register_scenario("digits-5")
def digits_5(options: ScenarioOptions) -> Scenario:
    """scikit-learn's 1,797 real 8x8 digits, 5 experiences x 2 classes; every 5th sample is test."""
    return digits(options, n=5)


@register_scenario("digits-{n}")
def digits(options: ScenarioOptions, n: int) -> Scenario:
    """The same digits split into n equal experiences (n must divide 10: 1, 2, 5 or 10)."""
    x, y = _load_digits()
    return _split(f"digits-{n}", x, y, options, n, default_backbone="clbench_mlp")


@register_scenario("digits32-{n}")
def digits32(options: ScenarioOptions, n: int) -> Scenario:
    """The digits upsampled (bilinear) to 3x32x32, in n experiences: the tiny image configuration of the pre-trained-model methods."""
    x, y = _load_digits()
    # the tiny configurations for pre-trained-model methods feed a 32x32 RGB ViT; the
    # three channels are identical copies
    x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    return _split(f"digits32-{n}", x.contiguous(), y, options, n, default_backbone="clbench_convnet",
                  meta={"upsampled": "bilinear to 32x32, channel repeated 3 times"})


def _load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    return x, torch.tensor(digits.target, dtype=torch.long)


def _split(name: str, x: torch.Tensor, y: torch.Tensor, options: ScenarioOptions, n: int, *, default_backbone: str,
           meta: dict | None = None) -> Scenario:
    is_test = torch.arange(len(y)) % 5 == 0
    order = resolve_class_order(options.class_order, y.tolist())
    return class_incremental_from_tensors(
        name,
        (x[~is_test], y[~is_test]),
        (x[is_test], y[is_test]),
        increments=split_increments(10, n),
        class_order=order,
        default_backbone=default_backbone,
        class_names=[str(c) for c in order],
        meta={"source": "sklearn.datasets.load_digits", "test_split": "every 5th sample", **(meta or {})},
    )
