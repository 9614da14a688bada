"""Backbones come from timm by name; clbench's small nets are registered with timm's `register_model`.

`build_backbone` always returns a timm model built with `num_classes=0`, so calling it
gives pooled features of width `model.num_features`; the classifier is a clbench head.
"""

from __future__ import annotations

import os
from pathlib import Path

import timm
import torch
from timm.models import register_model
from torch import nn

from clbench.errors import UsageError


class _TimmStyleNet(nn.Module):
    """The parts of timm's model API that clbench uses, for the small nets defined here."""

    num_features: int

    def __init__(self, num_classes: int = 0):
        super().__init__()
        self.num_classes = num_classes

    def _make_head(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def reset_classifier(self, num_classes: int, *args, **kwargs) -> None:
        self._make_head(num_classes)

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pool(x)
        return x if pre_logits else self.head(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class MLP(_TimmStyleNet):
    """Flatten, then `depth` Linear+ReLU layers (the 64-256-256 net of the digits reference setup)."""

    def __init__(self, in_features: int = 64, hidden: int = 256, depth: int = 2, num_classes: int = 0, in_chans: int = 1, img_size: int = 8, **_):
        super().__init__(num_classes)
        in_features = in_chans * img_size * img_size if in_features is None else in_features
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.num_features = width
        self._make_head(num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class ConvNet(_TimmStyleNet):
    """Three 3x3 conv blocks with BatchNorm and global average pooling; for 8x8 to 32x32 inputs."""

    def __init__(self, in_chans: int = 3, width: int = 32, num_classes: int = 0, **_):
        super().__init__(num_classes)

        def block(cin, cout, stride):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.body = nn.Sequential(block(in_chans, width, 1), block(width, 2 * width, 2), block(2 * width, 4 * width, 2))
        self.num_features = 4 * width
        self._make_head(num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


@register_model
def clbench_mlp(pretrained: bool = False, **kwargs) -> MLP:
    """64-256-256 MLP for flattened 8x8 inputs."""
    return MLP(**{"in_features": None, **kwargs})


@register_model
def clbench_mlp_tiny(pretrained: bool = False, **kwargs) -> MLP:
    """A 32-unit single-layer MLP for tests."""
    return MLP(**{"in_features": None, "hidden": 32, "depth": 1, **kwargs})


@register_model
def clbench_convnet(pretrained: bool = False, **kwargs) -> ConvNet:
    """Small 3-block CNN (32-64-128 channels)."""
    return ConvNet(**kwargs)


def build_backbone(
    name: str,
    *,
    pretrained: bool = False,
    weights: str | None = None,
    in_chans: int = 3,
    img_size: int | None = None,
) -> nn.Module:
    """A timm model without classifier (`num_classes=0`), exposing `num_features`."""
    if name not in timm.list_models() and name not in timm.list_models(pretrained=True):
        close = [m for m in timm.list_models() if m.startswith(name.split("_")[0])][:8]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise UsageError(f"unknown backbone {name!r}; expected a timm model name, e.g. clbench_mlp, clbench_convnet, resnet18{hint}")
    kwargs: dict = {"num_classes": 0, "in_chans": in_chans}
    if img_size is not None and name.startswith("clbench_mlp"):
        kwargs["img_size"] = img_size
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs)
    if name.startswith("clbench_"):
        raise UsageError(f"backbone {name!r} has no pretrained weights; drop --pretrained")
    if weights is not None:
        if not Path(weights).is_file():
            raise UsageError(f"pretrained weights file {weights!r} not found")
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(weights)}, **kwargs)
    return _from_local_cache(name, kwargs)


def _from_local_cache(name: str, kwargs: dict) -> nn.Module:
    """Load weights that timm/Hugging Face already cached locally; never download."""
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as e:  # timm raises several types when the file is absent offline
        cache = os.environ.get("HF_HUB_CACHE", os.path.expanduser("~/.cache/huggingface/hub"))
        raise UsageError(
            f"pretrained weights for {name!r} are not available locally (looked in {cache}; {type(e).__name__}); "
            f"download them once with timm on a machine with network, or pass --weights FILE"
        ) from None
    finally:
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous
