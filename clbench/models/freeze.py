"""Snapshots and mode helpers: frozen teacher copies, evaluation and eval-mode contexts."""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import torch
from torch import nn

from clbench.types import Output


def frozen_snapshot(modules: dict[str, nn.Module]) -> nn.ModuleDict:
    """Deep copies of `modules` in eval mode with gradients off; `CLStrategy.train()` keeps
    such a snapshot in eval mode."""
    teacher = copy.deepcopy(nn.ModuleDict(modules))
    teacher.eval()
    teacher.frozen_snapshot = True
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def teacher_outputs(teacher: nn.Module, x: torch.Tensor) -> Output:
    """A backbone-and-head snapshot's logits and features on `x`, without gradients."""
    with torch.no_grad():
        features = teacher["backbone"](x)
        return Output(teacher["head"](features), features)


def teacher_logits(teacher: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return teacher_outputs(teacher, x).logits


@contextlib.contextmanager
def evaluating(strategy: nn.Module, device=None) -> Iterator[torch.device]:
    """Evaluate `strategy` on `device` (default: where it is) in eval mode; afterwards every
    module gets its own mode back (frozen teachers stay in eval) and the strategy its device."""
    modes = [(m, m.training) for m in strategy.modules()]
    original_device = next(strategy.parameters()).device
    device = device or original_device
    strategy.to(device)
    strategy.eval()
    try:
        yield device
    finally:
        for module, mode in modes:
            module.training = mode
        strategy.to(original_device)


@contextlib.contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Run `modules` in eval mode (no dropout, BatchNorm statistics untouched), then give each back
    the mode it had: Lightning keeps submodules' modes across fits, so a mode left switched
    would carry into the next phase's training."""
    modes = [[(m, m.training) for m in module.modules()] for module in modules]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for saved in modes:
            for m, training in saved:
                m.training = training
