"""Typed configuration: --set coercion, unknown keys, wrong types, YAML files."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from clbench import config as C
from clbench.errors import UsageError


@dataclass(frozen=True)
class ToyConfig(C.StrategyConfig):
    buffer_size: int = 200
    alpha: float = 1.0
    warmup: bool = False
    policy: str = "reservoir"
    cap: int | None = None
    milestones: tuple[int, ...] = (10, 20)


def test_parse_set_splits_on_the_first_equals():
    assert C.parse_set(["lr=0.1", " alpha = 2 ", "name=a=b"]) == {"lr": "0.1", "alpha": "2", "name": "a=b"}


@pytest.mark.parametrize("item", ["lr", "=3", "lr0.1", " =x"])
def test_parse_set_rejects_malformed_items(item):
    with pytest.raises(UsageError, match="malformed --set") as e:
        C.parse_set([item])
    assert repr(item) in str(e.value) and "key=value" in str(e.value)


@pytest.mark.parametrize(
    "key, raw, expected",
    [
        ("buffer_size", "500", 500),
        ("alpha", "0.5", 0.5),
        ("alpha", "3", 3.0),
        ("alpha", "1e-3", 1e-3),
        ("warmup", "true", True),
        ("warmup", "No", False),
        ("warmup", "1", True),
        ("policy", "class_balanced", "class_balanced"),
        ("cap", "none", None),
        ("cap", "64", 64),
        ("milestones", "5,15,30", (5, 15, 30)),
        ("milestones", "[7]", (7,)),
        ("lr", "0.01", 0.01),
    ],
)
def test_set_values_are_coerced_to_the_field_type(key, raw, expected):
    _, strat = C.split_overrides({key: raw}, ToyConfig, "--set")
    assert strat[key] == expected and type(strat[key]) is type(expected)


def test_keys_route_to_run_or_strategy_config():
    run, strat = C.split_overrides({"epochs": "3", "batch-size": "8", "alpha": "2", "output_dir": "x"}, ToyConfig, "--set")
    assert run == {"epochs": 3, "batch_size": 8, "output_dir": "x"}
    assert strat == {"alpha": 2.0}


def test_unknown_key_lists_the_valid_keys():
    with pytest.raises(UsageError) as e:
        C.split_overrides({"buffer_sise": "10"}, ToyConfig, "--set")
    msg = str(e.value)
    assert "'buffer_sise'" in msg and "--set" in msg
    for valid in ("buffer_size", "alpha", "lr", "epochs", "batch_size"):
        assert valid in msg
    assert "\n" not in msg


@pytest.mark.parametrize(
    "key, raw, type_name",
    [
        ("buffer_size", "lots", "an integer"),
        ("buffer_size", "1.5", "an integer"),
        ("alpha", "big", "a number"),
        ("alpha", "nan", "a finite number"),
        ("warmup", "maybe", "a boolean"),
        ("cap", "x", "an integer or none"),
        ("epochs", "two", "an integer"),
    ],
)
def test_wrong_type_names_the_expected_type(key, raw, type_name):
    with pytest.raises(UsageError) as e:
        C.split_overrides({key: raw}, ToyConfig, "--set")
    assert f"{key}={raw!r}" in str(e.value)
    assert f"expected {type_name}" in str(e.value)


def test_yaml_values_keep_their_types_and_are_validated(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("epochs: 2\nalpha: 0.25\nwarmup: true\nmilestones: [3, 4]\ncap: null\n")
    data = C.load_yaml(str(path))
    run, strat = C.split_overrides(data, ToyConfig, str(path))
    assert run == {"epochs": 2}
    assert strat == {"alpha": 0.25, "warmup": True, "milestones": (3, 4), "cap": None}
    assert C.build(ToyConfig, strat).milestones == (3, 4)


def test_yaml_bool_is_not_an_integer(tmp_path):
    with pytest.raises(UsageError, match="expected an integer"):
        C.split_overrides({"epochs": True}, ToyConfig, "x.yaml")


def test_empty_yaml_is_no_overrides(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    assert C.load_yaml(str(path)) == {}


def test_unparsable_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("epochs: 2\nalpha: [1, 2\nlr: 3\n")
    with pytest.raises(UsageError) as e:
        C.load_yaml(str(path))
    assert str(path) in str(e.value) and "not valid YAML" in str(e.value) and "line" in str(e.value)


def test_yaml_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(UsageError, match="mapping"):
        C.load_yaml(str(path))


def test_missing_yaml_file(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        C.load_yaml(str(tmp_path / "nope.yaml"))


def test_range_checks_in_post_init():
    with pytest.raises(UsageError, match="epochs=0"):
        C.RunConfig(epochs=0)
    with pytest.raises(UsageError, match="optimizer='rmsprop'.*sgd, adam, adamw"):
        C.StrategyConfig(optimizer="rmsprop")
    with pytest.raises(UsageError, match="lr=-1"):
        C.StrategyConfig(lr=-1)


@pytest.mark.parametrize("check, good, bad, expected", [
    (C.positive_integers, 1, 0, "a positive integer"),
    (C.non_negative_integers, 0, -1, "an integer >= 0"),
    (C.positive_numbers, 1e-9, 0.0, "a positive number"),
    (C.non_negative_numbers, 0.0, -1e-9, "a number >= 0"),
    (C.non_negative_numbers, 0.0, float("nan"), "a number >= 0"),
    (C.positive_numbers, 1.0, float("nan"), "a positive number"),
])
def test_shared_range_checks_name_the_first_bad_field(check, good, bad, expected):
    @dataclass
    class Settings:
        a: float
        b: float

    check(Settings(good, good), "a", "b")
    with pytest.raises(UsageError, match=rf"^b={bad} is invalid; expected {expected}$"):
        check(Settings(good, bad), "a", "b")


@pytest.mark.parametrize("strategy, key, value, expected", [
    ("er", "buffer_size", -1, "an integer >= 0"),
    ("der_pp", "alpha", -0.1, "a number >= 0"),
    ("der_pp_clfd", "replay_batch_size", 0, "a positive integer"),  # inherited through the replay settings
    ("cls_er", "stable_alpha", 1.5, r"a number in \[0, 1\]"),
    ("clfd", "plastic_update_freq", -0.2, r"a number in \[0, 1\]"),
    ("icarl", "wd_reg", -1e-5, "a number >= 0"),
    ("stella_er", "buffer_size", -5, "an integer >= 0"),
    ("aper", "adapter_dropout", 1.0, r"a number in \[0, 1\)"),  # the shared adapter recipe
    ("ranpac", "bottleneck", 0, "a positive integer"),
    ("tuna", "align_lr", 0.0, "a positive number"),  # the TUNA family's recipe, for DAF/SAEF/SGDS too
    ("sgds", "align_epochs", -1, "an integer >= 0"),
    ("daf", "fisher_samples", -1, "an integer >= 0"),
    ("lord", "size_cap", 1.5, r"a number in \[0, 1\]"),
    ("fdinet", "nf", 0, "a positive integer"),
    ("der_pp_fdinet", "nf", 0, "a positive integer"),
    ("etag", "temperature", 0.0, "a positive number"),
    ("etag", "generator_epochs", -1, "an integer >= 0"),
    ("preprompt", "grad_clip", 0.0, "a positive number"),
    ("preprompt", "prompt_momentum", 1.5, r"a number in \[0, 1\]"),
])
def test_method_settings_are_range_checked(strategy, key, value, expected):
    from clbench.engine.runner import strategy_config

    with pytest.raises(UsageError, match=rf"^{key}={value} is invalid; expected {expected}$"):
        strategy_config(strategy, {key: value})


def test_a_nan_weight_is_refused_by_the_strategy_configs():
    with pytest.raises(UsageError, match="momentum=nan"):
        C.StrategyConfig(momentum=float("nan"))


def test_build_turns_bad_keywords_into_usage_errors():
    with pytest.raises(UsageError):
        C.build(ToyConfig, {"nope": 1})


def test_resolved_config_round_trips_through_a_dict():
    cfg = C.build(ToyConfig, {"alpha": 2.0, "milestones": (1, 2)})
    assert C.build(ToyConfig, C.to_dict(cfg)) == cfg


def test_every_strategy_config_has_defaults_and_is_frozen():
    import dataclasses

    from clbench.registry import STRATEGIES

    for name in STRATEGIES.names():
        cfg_cls = STRATEGIES.get(name).Config
        cfg = cfg_cls()  # every field has a default (the paper's)
        assert dataclasses.is_dataclass(cfg) and issubclass(cfg_cls, C.StrategyConfig)
        with pytest.raises(dataclasses.FrozenInstanceError):
            cfg.lr = 1.0  # type: ignore[misc]
