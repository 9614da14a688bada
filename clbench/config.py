"""Typed configuration: the engineering `RunConfig` and the base of every strategy `Config`.

Overrides (`--set key=value`, YAML files, `PAPER_SETTINGS`) are validated against the
dataclass fields: an unknown key is an error listing the valid keys, and a value is
converted to the field's declared type or rejected naming that type.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Sequence

from clbench.errors import UsageError

NORMALIZATIONS = ("dataset", "imagenet", "inception", "none")
SEED_RANGE = (0, 2**32 - 1)  # what numpy's and Lightning's seeding accept


def check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise UsageError(f"seed={seed!r} is invalid; expected an integer in {SEED_RANGE[0]}..{SEED_RANGE[1]}")
    return seed


def require(config, names, ok: Callable[[Any], bool], expected: str) -> None:
    """The one-line usage error for the first of `config`'s fields `names` whose value fails `ok`
    (a NaN fails every comparison, so it is refused too)."""
    for name in names:
        value = getattr(config, name)
        if not ok(value):
            raise UsageError(f"{name}={value} is invalid; expected {expected}")


def positive_integers(config, *names: str) -> None:
    require(config, names, lambda v: v >= 1, "a positive integer")


def positive_numbers(config, *names: str) -> None:
    require(config, names, lambda v: v > 0, "a positive number")


def non_negative_numbers(config, *names: str) -> None:
    require(config, names, lambda v: v >= 0, "a number >= 0")


def non_negative_integers(config, *names: str) -> None:
    require(config, names, lambda v: v >= 0, "an integer >= 0")


def unit_interval(config, *names: str) -> None:
    require(config, names, lambda v: 0 <= v <= 1, "a number in [0, 1]")


def probabilities_below_one(config, *names: str) -> None:
    """Dropout rates and the like: 1 would drop everything."""
    require(config, names, lambda v: 0 <= v < 1, "a number in [0, 1)")


@dataclass(frozen=True)
class RunConfig:
    """Engineering settings of a run: nothing here changes what a method is."""

    epochs: int = 5
    batch_size: int = 32  # per device
    # the batch one optimiser step sees, summed over devices and accumulated batches (a paper's "8 GPUs x 24
    # = 192"); the runner accumulates global / (batch_size x devices) batches per step. None: batch_size x devices
    global_batch_size: int | None = None
    eval_batch_size: int = 256
    num_workers: int = 0
    accelerator: str = "auto"
    devices: str = "auto"
    num_nodes: int = 1
    precision: str = "32-true"
    trainer_strategy: str = "auto"
    backbone: str | None = None
    pretrained: bool = False
    weights: str | None = None  # local pretrained weight file for --pretrained
    class_order: str = "default"
    image_size: int | None = None  # image scenarios: input side (None: the benchmark's own)
    normalization: str = "dataset"  # image scenarios: dataset | imagenet | inception | none
    data_root: str | None = None
    download: bool = False
    output_dir: str = "results"
    limit_train_batches: int | None = None  # cap batches per epoch (tests, smoke runs)
    # classification: score each test experience on its first N samples only (tests, smoke runs; None: all)
    limit_eval_samples: int | None = None
    deterministic: bool = True
    checkpoint: bool = True  # save resume state after every experience
    progress: bool = True
    profile: bool = True  # the EdgeProfiler callback (FLOPs, memory, time); it never changes results
    flops: str = "sample"  # its FLOP counting: sample (a few steps per step shape), all (every step) or off

    def __post_init__(self):
        positive_integers(self, "epochs", "batch_size", "eval_batch_size", "num_nodes")
        non_negative_integers(self, "num_workers")
        if self.flops not in ("sample", "all", "off"):
            raise UsageError(f"flops={self.flops!r} is invalid; expected sample, all or off")
        for name in ("limit_train_batches", "limit_eval_samples", "image_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"{name}={value} is invalid; expected a positive integer (or unset)")
        if self.global_batch_size is not None and (self.global_batch_size < 1 or self.global_batch_size % self.batch_size):
            raise UsageError(f"global_batch_size={self.global_batch_size} is not a multiple of batch_size={self.batch_size}; "
                             f"expected batch_size x devices x accumulated batches (e.g. {self.batch_size * 8})")
        if self.weights is not None and not self.pretrained:
            raise UsageError(f"weights={self.weights!r} is given without pretrained; expected --pretrained --weights FILE")
        if self.normalization not in NORMALIZATIONS:
            raise UsageError(f"normalization={self.normalization!r} is invalid; expected one of: {', '.join(NORMALIZATIONS)}")


LR_SCHEDULES = ("constant", "cosine", "step", "multistep")


@dataclass(frozen=True)
class StrategyConfig:
    """Optimiser settings shared by every strategy.

    The defaults are clbench's common recipe (SGD, lr 0.05, momentum 0.9), the setup
    the digits reference figures were measured on; a method's published optimiser
    settings live in its `PAPER_SETTINGS` and are applied with `--paper-settings`.
    """

    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    # "cosine": the learning rate follows a cosine from lr to 0 over each fit's epochs, stepped
    # once per epoch (torch's CosineAnnealingLR, as the pre-trained-model methods' code does);
    # "step": it is multiplied by lr_step_gamma every lr_step_epochs epochs of a fit (StepLR)
    lr_schedule: str = "constant"
    lr_step_epochs: int = 30
    lr_step_gamma: float = 0.1
    # "multistep": multiplied by lr_step_gamma at each of these epochs of a fit (MultiStepLR), the
    # detection recipes' "LR steps at 8 and 11" of 12 epochs
    lr_milestones: tuple[int, ...] = ()
    # the schedules `CLStrategy.lr_schedule` knows; a method whose code has its own extends this
    lr_schedules: ClassVar[tuple[str, ...]] = LR_SCHEDULES

    def __post_init__(self):
        if self.optimizer not in ("sgd", "adam", "adamw"):
            raise UsageError(f"optimizer={self.optimizer!r} is invalid; expected one of: sgd, adam, adamw")
        if self.lr_schedule not in self.lr_schedules:
            raise UsageError(f"lr_schedule={self.lr_schedule!r} is invalid; expected one of: {', '.join(self.lr_schedules)}")
        milestones = list(self.lr_milestones)
        if any(m < 1 for m in milestones) or milestones != sorted(set(milestones)):
            raise UsageError(f"lr_milestones={self.lr_milestones} is invalid; expected increasing epochs >= 1, e.g. 8,11")
        if self.lr_schedule == "multistep" and not milestones:
            raise UsageError("lr_schedule='multistep' needs lr_milestones; expected e.g. --set lr_milestones=8,11")
        positive_integers(self, "lr_step_epochs")
        if not 0 < self.lr_step_gamma <= 1:
            raise UsageError(f"lr_step_gamma={self.lr_step_gamma} is invalid; expected a number in (0, 1]")
        positive_numbers(self, "lr")
        non_negative_numbers(self, "momentum", "weight_decay")
        # option dataclasses a Config mixes in after its base (FDINet's, CLFD's) come after this
        # class in the MRO: their checks run here
        mixed_in = getattr(super(), "__post_init__", None)
        if mixed_in is not None:
            mixed_in()


def field_names(cls) -> list[str]:
    return [f.name for f in fields(cls)]


def split_overrides(
    overrides: Mapping[str, Any], strategy_cfg_cls, source: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Route each key to RunConfig or the strategy Config; unknown keys are an error."""
    run_keys, strat_keys = set(field_names(RunConfig)), set(field_names(strategy_cfg_cls))
    run, strat = {}, {}
    for key, value in overrides.items():
        k = key.replace("-", "_")
        if k in strat_keys:
            strat[k] = coerce(value, _field_type(strategy_cfg_cls, k), k)
        elif k in run_keys:
            run[k] = coerce(value, _field_type(RunConfig, k), k)
        else:
            valid = ", ".join(sorted(strat_keys | run_keys))
            raise UsageError(f"unknown key {key!r} in {source}; valid keys: {valid}")
    return run, strat


def parse_set(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"malformed --set {item!r}; expected key=value")
        out[key.strip()] = value.strip()
    return out


def load_yaml(path: str) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"config file {path!r} not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UsageError(f"config file {path!r} is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"config file {path!r} must hold a mapping of key: value, got {type(data).__name__}")
    return data


def build(cls, values: Mapping[str, Any]):
    try:
        return cls(**values)
    except TypeError as e:
        raise UsageError(str(e)) from None


def to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _field_type(cls, name: str):
    return typing.get_type_hints(cls)[name]


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def coerce(value: Any, typ, key: str) -> Any:
    """Convert a CLI/YAML value to the declared field type, or fail naming that type."""
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, key)
            except UsageError as e:
                errors.append(e)
        raise UsageError(f"{key}={value!r} is invalid; expected {_type_name(typ)}")
    if origin in (tuple, list):
        items = value
        if isinstance(value, str):
            items = [v for v in value.strip("()[] ").split(",") if v.strip()]
        if not isinstance(items, (list, tuple)):
            raise UsageError(f"{key}={value!r} is invalid; expected {_type_name(typ)}")
        inner = args[0] if args else str
        return origin(coerce(v.strip() if isinstance(v, str) else v, inner, key) for v in items)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise UsageError(f"{key}={value!r} is invalid; expected a boolean (true/false)")
    if typ is int:
        if isinstance(value, bool):
            raise UsageError(f"{key}={value!r} is invalid; expected an integer")
        if isinstance(value, int):
            return value
        try:
            return int(str(value).strip())
        except ValueError:
            raise UsageError(f"{key}={value!r} is invalid; expected an integer") from None
    if typ is float:
        if isinstance(value, bool):
            raise UsageError(f"{key}={value!r} is invalid; expected a number")
        try:
            out = float(str(value).strip()) if isinstance(value, str) else float(value)
        except (TypeError, ValueError):
            raise UsageError(f"{key}={value!r} is invalid; expected a number") from None
        if out != out or out in (float("inf"), float("-inf")):
            raise UsageError(f"{key}={value!r} is invalid; expected a finite number")
        return out
    if typ is str:
        if isinstance(value, (dict, list)):
            raise UsageError(f"{key}={value!r} is invalid; expected a string")
        return str(value)
    return value


def _type_name(typ) -> str:
    names = {int: "an integer", float: "a number", bool: "a boolean", str: "a string", type(None): "none"}
    args = typing.get_args(typ)
    if args and typing.get_origin(typ) in (typing.Union, types.UnionType):
        return " or ".join(names.get(a, str(a)) for a in args)
    return names.get(typ, str(typ))


# --------------------------------------------------------------------------- more checks and typed values
def finite_non_negative_numbers(config, *names: str) -> None:
    """Loss weights and the like: infinity would swamp every other term."""
    require(config, names, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")


def integers_at_least(config, low: int, *names: str) -> None:
    require(config, names, lambda v: v >= low, f"an integer >= {low}")


def open_unit_interval(config, *names: str) -> None:
    require(config, names, lambda v: 0 < v < 1, "a number in (0, 1)")


def one_of(config, name: str, allowed) -> None:
    """The one-line usage error when field `name` is not one of `allowed` (strings or numbers)."""
    value = getattr(config, name)
    if value not in tuple(allowed):
        raise UsageError(f"{name}={value!r} is invalid; expected one of: {', '.join(map(str, allowed))}")


def typed_values(cls, values: Mapping[str, Any], source: str) -> dict[str, Any]:
    """`values` converted to the declared types of `cls`'s fields, as `--set` values are (a string
    from the command line becomes an int, float, bool, ...); an unknown key is an error listing the
    valid keys."""
    check_keys(cls, values, source)
    return {k.replace("-", "_"): coerce(v, _field_type(cls, k.replace("-", "_")), k.replace("-", "_"))
            for k, v in values.items()}


def check_keys(cls, values: Mapping[str, Any], source: str) -> None:
    """The one-line usage error for the first key of `values` that is not a field of `cls`."""
    keys = field_names(cls)
    for key in values:
        if key.replace("-", "_") not in keys:
            raise UsageError(f"unknown key {key!r} in {source}; valid keys: {', '.join(sorted(keys))}")


def parse_aux(items: Sequence[str]) -> list[tuple[str, dict[str, str]]]:
    """`NAME[:key=value,...]` -> (name, {key: raw string}): the add-on's Config converts each value
    to its field's type (`clbench.auxiliary.base.create_aux`), as `--set` values are for strategies."""
    out = []
    for item in items:
        name, _, params = item.partition(":")
        if not name:
            raise UsageError(f"malformed --aux {item!r}; expected NAME[:key=value,...]")
        kv = {}
        for part in filter(None, params.split(",")):
            k, sep, v = part.partition("=")
            if not sep or not k.strip():
                raise UsageError(f"malformed --aux {item!r}; expected NAME[:key=value,...]")
            kv[k.strip()] = v.strip()
        out.append((name.replace("-", "_"), kv))
    return out
