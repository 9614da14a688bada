"""`Aux`: an add-on that contributes one named loss term or wraps modules once in `setup`."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

import torch
from torch import nn

from clbench.errors import UsageError

if TYPE_CHECKING:
    from clbench.base import CLStrategy
    from clbench.types import Batch, ExperienceInfo, Output


class Aux(nn.Module):
    """Base add-on; the four hooks are no-ops so a component overrides only what it needs."""

    name: ClassVar[str] = "aux"  # set by @register_aux
    family: ClassVar[str] = "aux"  # "distill", "quantize", "forecast": what strategies accept
    # families this add-on cannot be combined with in one run
    incompatible_with: ClassVar[set[str]] = set()
    # strategy output kinds (`CLStrategy.output_kind`) this add-on cannot use, with the one-line
    # reason the refusal before training gives
    refuses: ClassVar[dict[str, str]] = {}
    # backbone the registry contract test builds its strategy with (None: the tiny MLP); an
    # add-on that reads convolutional feature maps names a small CNN
    contract_backbone: ClassVar[str | None] = None

    def __init__(self, weight: float = 1.0, **hparams: Any):
        super().__init__()
        self.weight = float(checked(self.name, "weight", weight, lambda v: math.isfinite(v) and v >= 0,
                                    "a finite number >= 0"))
        self.hparams = hparams

    def setup(self, strategy: "CLStrategy") -> None:
        pass

    def on_experience_start(self, strategy: "CLStrategy", exp: "ExperienceInfo") -> None:
        pass

    def loss(self, batch: "Batch", out: "Output", strategy: "CLStrategy") -> torch.Tensor | None:
        return None

    def on_experience_end(self, strategy: "CLStrategy", exp: "ExperienceInfo") -> None:
        pass

    def after_evaluation(self, strategy: "CLStrategy", exp: "ExperienceInfo",
                         evaluate: Callable[[Callable[[torch.Tensor], torch.Tensor]], list[float]]) -> dict[str, Any] | None:
        """After the runner evaluated the experience: `evaluate(predict_logits)` gives the accuracy
        row of another version of the model on every test set (a quantized snapshot, ...).
        What this returns is stored in the run's `aux_results[name]`, one entry per experience."""
        return None

    def report(self) -> dict[str, Any]:
        return {}


def choice(add_on: str, name: str, value: Any, allowed: Sequence) -> Any:
    """`value` if it is one of `allowed`, else the one-line usage error naming add-on, setting and value."""
    if value not in allowed:
        raise UsageError(f"{add_on} {name}={value!r} is invalid; expected one of {', '.join(map(str, allowed))}")
    return value


def checked(add_on: str, name: str, value: Any, ok: Callable[[Any], bool], expected: str, integer: bool = False) -> Any:
    """`value` if it is a number (an integer with `integer`; never a bool) for which `ok` holds, else
    the one-line usage error naming add-on, setting and value and what was `expected`."""
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) or not ok(value):
        raise UsageError(f"{add_on} {name}={value!r} is invalid; expected {expected}")
    return value


def positive(add_on: str, name: str, value: Any) -> float:
    return float(checked(add_on, name, value, lambda v: v > 0, "a positive number"))


def flag(add_on: str, name: str, value: Any) -> bool:
    """`value` if it is a boolean (`true`/`false` on the command line), else the one-line usage error."""
    if not isinstance(value, bool):
        raise UsageError(f"{add_on} {name}={value!r} is invalid; expected true or false")
    return value


def non_negative(add_on: str, name: str, value: Any) -> float:
    return float(checked(add_on, name, value, lambda v: v >= 0, "a number >= 0"))
