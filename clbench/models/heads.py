"""Classifier heads that grow with the classes seen so far."""

from __future__ import annotations

import warnings

import torch
from torch import nn


class IncrementalLinear(nn.Module):
    """A linear head whose output grows when new classes arrive; old rows are kept as they are."""

    def __init__(self, in_features: int, out_features: int = 0, bias: bool = True):
        super().__init__()
        self.in_features = in_features
        self.bias = bias
        with warnings.catch_warnings():  # a head with no classes yet is expected before the first experience
            warnings.simplefilter("ignore", UserWarning)
            self.fc = nn.Linear(in_features, max(out_features, 0), bias=bias)

    @property
    def out_features(self) -> int:
        return self.fc.out_features

    def grow(self, out_features: int) -> bool:
        """Extend to `out_features` outputs; returns True if parameters were replaced."""
        old = self.fc
        if out_features <= old.out_features:
            return False
        new = nn.Linear(self.in_features, out_features, bias=self.bias).to(old.weight.device, old.weight.dtype)
        with torch.no_grad():
            new.weight[: old.out_features] = old.weight
            if self.bias:
                new.bias[: old.out_features] = old.bias
        self.fc = new
        return True

    def resize(self, out_features: int) -> None:
        """Exactly `out_features` outputs (new parameters), e.g. to receive a saved state of that width."""
        if out_features != self.fc.out_features:
            old = self.fc
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                self.fc = nn.Linear(self.in_features, out_features, bias=self.bias).to(old.weight.device, old.weight.dtype)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features)


class CosineLinear(IncrementalLinear):
    """Cosine-similarity head, growable like IncrementalLinear: with a learnable scale (LUCIR/PODNet
    style), or with `scale=None` the plain cosines (TUNA's head: its loss applies a fixed scale)."""

    def __init__(self, in_features: int, out_features: int = 0, scale: float | None = 16.0):
        super().__init__(in_features, out_features, bias=False)
        self.scale = nn.Parameter(torch.tensor(float(scale))) if scale is not None else None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        w = nn.functional.normalize(self.fc.weight, dim=1)
        cosines = nn.functional.linear(nn.functional.normalize(features, dim=1), w)
        return cosines if self.scale is None else self.scale * cosines
