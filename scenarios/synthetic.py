"""Synthetic Gaussian-cluster scenarios for fast offline tests."""

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


def _clusters(num_classes: int, shape: tuple[int, ...], smooth: bool):
    """Class means plus noise, train and test drawn around the same means.

    The data never depends on the run seed (only the model's initialisation does).
    """
    g = torch.Generator().manual_seed(1)
    if smooth:  # low-frequency class patterns, so frequency-domain encoders keep the signal
        c, h, w = shape
        coarse = torch.randn((num_classes, c, 4, 4), generator=g)
        means = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False) * 2
    else:
        means = torch.randn((num_classes, *shape), generator=g)

    def draw(per_class: int):
        y = torch.arange(num_classes).repeat_interleave(per_class)
        return means[y] + 0.8 * torch.randn((len(y), *shape), generator=g), y

    return draw(60), draw(20)


def _build(name: str, experiences: int, per_exp: int, shape, backbone: str, options: ScenarioOptions, smooth=False):
    num_classes = experiences * per_exp
    train, test = _clusters(num_classes, shape, smooth)
    order = resolve_class_order(options.class_order, train[1].tolist())
    return class_incremental_from_tensors(
        name,
        train,
        test,
        increments=split_increments(num_classes, experiences),
        class_order=order,
        default_backbone=backbone,
        meta={"source": "synthetic gaussian clusters"},
    )


@register_scenario("synthetic-2")
def synthetic_2(options: ScenarioOptions) -> Scenario:
    """2 experiences x 2 classes of 1x8x8 Gaussian clusters (tests)."""
    return _build("synthetic-2", 2, 2, (1, 8, 8), "clbench_mlp_tiny", options)


@register_scenario("synthetic-5")
def synthetic_5(options: ScenarioOptions) -> Scenario:
    """5 experiences x 2 classes of 1x8x8 Gaussian clusters (tests, golden numbers)."""
    return _build("synthetic-5", 5, 2, (1, 8, 8), "clbench_mlp_tiny", options)


@register_scenario("synthetic32-3")
def synthetic32_3(options: ScenarioOptions) -> Scenario:
    """3 experiences x 2 classes of smooth 3x32x32 images (CNN-sized tests)."""
    return _build("synthetic32-3", 3, 2, (3, 32, 32), "clbench_convnet", options, smooth=True)
