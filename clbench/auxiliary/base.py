"""`Aux`: an add-on that contributes one named loss term or wraps modules once in `setup`.

Like a strategy, every add-on declares its settings as a frozen `Config` dataclass (based on
`AuxConfig`), range-checked in `__post_init__` with the helpers of `clbench.config`. `create_aux`
is the one way the runner and the sweep build add-ons from `--aux name:key=value,...`: each value
is converted to its field's declared type by the code that converts `--set` for strategies, an
unknown key is an error listing the valid keys, and the add-on is constructed from the Config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Sequence

import torch
from torch import nn

from clbench import config as C
from clbench.errors import UsageError

if TYPE_CHECKING:
    from clbench.base import CLStrategy
    from clbench.types import Batch, ExperienceInfo, Output


@dataclass(frozen=True)
class AuxConfig:
    """Settings every add-on has: the weight of its loss term."""

    weight: float = 1.0

    def __post_init__(self):
        C.finite_non_negative_numbers(self, "weight")


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

    # the add-on's settings; every registered add-on declares its own (based on AuxConfig)
    Config: ClassVar[type[AuxConfig]] = AuxConfig

    def __init__(self, cfg: "AuxConfig | None" = None, /, **values: Any):
        """From a resolved `Config` (what `create_aux` passes), or from keyword settings, which are
        converted and checked by `aux_config` exactly as `--aux` values are."""
        super().__init__()
        if cfg is None:
            cfg = aux_config(type(self), values)
        elif values:
            raise TypeError(f"{type(self).__name__} takes a Config or keyword settings, not both")
        elif not isinstance(cfg, self.Config):
            raise TypeError(f"{type(self).__name__} expects a {self.Config.__qualname__}, got {type(cfg).__name__}")
        self.cfg = cfg
        self.weight = float(cfg.weight)

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
        """What the run's JSON stores under `strategy_report["add_ons"][name]`: the resolved settings
        (every field of the Config, defaults included); an add-on adds what it found out."""
        return C.to_dict(self.cfg)


def aux_config(cls: type[Aux], values: Mapping[str, Any], source: str | None = None) -> AuxConfig:
    """`cls.Config` from raw settings (strings from the command line, or Python values): each is
    converted to its field's declared type as `--set` values are, then range-checked by the Config.
    An unknown key is an error listing the valid keys; every error is one line naming the add-on."""
    C.check_keys(cls.Config, values, source or f"add-on {cls.name!r}")
    try:
        return C.build(cls.Config, C.typed_values(cls.Config, values, ""))
    except UsageError as e:
        raise UsageError(f"{cls.name} {e}") from None


def create_aux(specs: Sequence[tuple[str, Mapping[str, Any]]]) -> list[Aux]:
    """The add-ons of a run, from `(name, raw settings)` pairs (`clbench.config.parse_aux`): each
    looked up in `clbench.registry.AUXILIARY` and constructed from its resolved Config. Each add-on
    at most once, and no two whose families exclude each other."""
    from clbench.registry import AUXILIARY

    out = []
    for name, params in specs:
        cls = AUXILIARY.get(name)
        out.append(cls(aux_config(cls, params, f"--aux {name}")))
    names = [a.name for a in out]
    for name in set(names):
        if names.count(name) > 1:
            raise UsageError(f"add-on {name!r} given {names.count(name)} times; expected each add-on at most once")
    families = {a.family for a in out}
    for a in out:
        clash = a.incompatible_with & (families - {a.family})
        if clash:
            raise UsageError(f"add-on {a.name!r} cannot be combined with {sorted(clash)}")
    return out
