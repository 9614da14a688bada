"""Add-on settings are a frozen `Config` dataclass per add-on, built the way strategy Configs are:
`--aux name:key=value` strings are converted to the field's declared type by the code that
converts `--set`, range-checked by the Config, and an unknown key lists the valid keys."""

from __future__ import annotations

import dataclasses
import json

import pytest

from clbench import config as C
from clbench.auxiliary.base import Aux, AuxConfig, aux_config, create_aux
from clbench.cli import main, parse_aux
from clbench.errors import UsageError
from clbench.registry import AUXILIARY
from clbench.reporting.results import RunResult, load, save

AUX_NAMES = AUXILIARY.names()


def _one(spec: str) -> Aux:
    (add_on,) = create_aux(parse_aux([spec]))
    return add_on


# --------------------------------------------------------------------------- every add-on
@pytest.mark.parametrize("name", AUX_NAMES)
def test_every_registered_add_on_declares_a_frozen_config(name):
    cls = AUXILIARY.get(name)
    assert "Config" in vars(cls), f"{name} declares no Config of its own"
    cfg_cls = cls.Config
    assert dataclasses.is_dataclass(cfg_cls) and cfg_cls.__dataclass_params__.frozen
    assert issubclass(cfg_cls, AuxConfig) and "weight" in C.field_names(cfg_cls)
    cfg = cfg_cls()  # every setting has a default
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.weight = 2.0  # type: ignore[misc]
    # the resolved Config is a fixed point: re-checking its own values changes nothing
    assert dataclasses.replace(cfg) == cfg
    add_on = create_aux([(name, {})])[0]
    assert type(add_on) is cls and add_on.cfg == cfg and add_on.weight == cfg.weight
    assert add_on.report().items() >= C.to_dict(cfg).items()  # the run JSON records every setting


@pytest.mark.parametrize("name", AUX_NAMES)
def test_every_add_on_refuses_a_negative_weight(name):
    with pytest.raises(UsageError, match=rf"^{name} weight=-1.0 is invalid; expected a finite number >= 0$"):
        create_aux([(name, {"weight": "-1"})])


# --------------------------------------------------------------------------- typed values
def test_parse_aux_keeps_the_raw_strings():
    assert parse_aux(["multi-teacher:teachers=3, policy=rl", "logit_kd"]) == [
        ("multi_teacher", {"teachers": "3", "policy": "rl"}), ("logit_kd", {})]


def test_a_cli_string_becomes_the_field_type():
    mt = _one("multi_teacher:teachers=3,temperature=2,policy=confidence,agent_lr=1e-2")
    assert mt.cfg.teachers == 3 and type(mt.cfg.teachers) is int  # int
    assert mt.cfg.temperature == 2.0 and type(mt.cfg.temperature) is float  # float, though written as an integer
    assert mt.cfg.agent_lr == 0.01 and type(mt.cfg.agent_lr) is float
    assert mt.cfg.policy == "confidence" and mt.policy == "confidence"  # str among choices
    for text, value in (("true", True), ("false", False), ("1", True), ("off", False)):
        rk = _one(f"relation_kd:exclude_diagonal={text}")
        assert rk.cfg.exclude_diagonal is value and rk.exclude_diagonal is value  # bool
    assert _one("feature_kd:layer=none").cfg.layer is None  # optional: none is unset
    assert _one("feature_kd:layer=body").cfg.layer == "body"
    q = _one("quantize:weight_bits=4,act_bits=8,quantize_first_last=true,percentile=99")
    assert (q.cfg.weight_bits, q.cfg.act_bits, q.cfg.quantize_first_last, q.cfg.percentile) == (4, 8, True, 99.0)
    # a value that names a choice but is spelt as a number stays a string and is refused by the choice
    with pytest.raises(UsageError, match="policy='1' is invalid; expected one of: equal, confidence, task_owner, rl"):
        _one("multi_teacher:policy=1")


def test_keyword_construction_goes_through_the_same_conversion():
    from clbench.auxiliary.distill import LogitKD

    by_keyword = LogitKD(temperature=3)
    by_cli = _one("logit_kd:temperature=3")
    by_config = LogitKD(LogitKD.Config(temperature=3.0))
    assert by_keyword.cfg == by_cli.cfg == by_config.cfg == LogitKD.Config(temperature=3.0)
    assert type(by_keyword.temperature) is float
    with pytest.raises(TypeError, match="not both"):
        LogitKD(LogitKD.Config(), temperature=3.0)
    with pytest.raises(UsageError, match="unknown key 'temp' in add-on 'logit_kd'; valid keys: samples, temperature, weight"):
        LogitKD(temp=3)


def test_defaults_resolve_into_the_config():
    fk = _one("feature_kd")
    assert (fk.cfg.weight, fk.cfg.normalize) == (2000.0, "l2")
    fk = _one("feature_kd:layer=body")
    assert (fk.cfg.weight, fk.cfg.normalize) == (5.0, "none")
    q = _one("quantize:preset=W4A8")
    assert (q.cfg.weight_bits, q.cfg.act_bits, q.cfg.weight_calib) == (4, 8, "mse")
    assert aux_config(type(q), C.to_dict(q.cfg)) == q.cfg  # its record builds the same add-on again
    assert _one("logit_mse").cfg.weight == 0.1


# --------------------------------------------------------------------------- errors through the CLI
def _run(tmp_path, capsys, *aux: str) -> tuple[int, list[str]]:
    out = tmp_path / "out"
    argv = ["run", "--strategy", "naive", "--scenario", "synthetic-2", "--accelerator", "cpu", "--quiet",
            "--output-dir", str(out)]
    for a in aux:
        argv += ["--aux", a]
    code = main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert not out.exists() or not list(out.rglob("*.json"))
    return code, err


def test_an_unknown_key_lists_the_valid_keys(tmp_path, capsys):
    code, err = _run(tmp_path, capsys, "multi_teacher:teacher=3")
    valid = ", ".join(sorted(C.field_names(AUXILIARY.get("multi_teacher").Config)))
    assert code == 2 and err == [f"clbench: error: unknown key 'teacher' in --aux multi_teacher; valid keys: {valid}"]


@pytest.mark.parametrize("spec, expected", [
    ("logit_kd:temperature=-1", "logit_kd temperature=-1.0 is invalid; expected a positive number"),
    ("logit_kd:temperature=hot", "logit_kd temperature='hot' is invalid; expected a number"),
    ("multi_teacher:teachers=0", "multi_teacher teachers=0 is invalid; expected a positive integer"),
    ("multi_teacher:teachers=1.5", "multi_teacher teachers='1.5' is invalid; expected an integer"),
    ("relation_kd:min_rows=1", "relation_kd min_rows=1 is invalid; expected an integer >= 2"),
    ("relation_kd:exclude_diagonal=2", "relation_kd exclude_diagonal='2' is invalid; expected a boolean (true/false)"),
    ("freq_kd:levels=3", "freq_kd levels=3 is invalid; expected one of: 1, 2"),
    ("freq_kd:domain=wavelet", "freq_kd domain='wavelet' is invalid; expected one of: haar, fft"),
    ("logit_mse:samples=old", "logit_mse samples='old' is invalid; expected one of: current, replay, all"),
    ("quantize:smooth_alpha=1", "quantize smooth_alpha=1.0 is invalid; expected a number in (0, 1)"),
    ("quantize:weight_bits=17", "quantize weight_bits=17 is invalid; expected an integer from 2 to 16"),
    ("logit_kd:weight=inf", "logit_kd weight='inf' is invalid; expected a finite number"),
])
def test_an_out_of_range_value_is_one_line_exit_2(tmp_path, capsys, spec, expected):
    code, err = _run(tmp_path, capsys, spec)
    assert code == 2 and err == [f"clbench: error: {expected}"], err
    assert not any("Traceback" in line for line in err)


def test_the_duplicate_and_family_checks_stay(tmp_path, capsys):
    code, err = _run(tmp_path, capsys, "logit_kd", "logit_kd:temperature=3")
    assert code == 2 and len(err) == 1 and "'logit_kd' given 2 times" in err[0]


def test_sweep_checks_add_on_settings_with_the_same_code(tmp_path, capsys):
    base = ["sweep", "--strategies", "naive", "--scenarios", "synthetic-2", "--epochs", "1", "--dry-run",
            "--output-dir", str(tmp_path / "out")]
    assert main([*base, "--aux", "logit_kd:temperature=3"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main([*base, "--aux", "logit_kd:temperature=0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["clbench: error: logit_kd temperature=0.0 is invalid; expected a positive number"]


# --------------------------------------------------------------------------- stored results
def test_a_result_written_before_configs_still_loads(tmp_path):
    """Results stored while `--aux` values were guessed into int/float/bool (and add-ons reported
    only a few settings) load as before, and their settings still build the add-on."""
    old = RunResult("er", "digits-5", "clbench_mlp", 0, aux=[{"name": "logit_kd", "temperature": 3},
                                                             {"name": "relation_kd", "exclude_diagonal": True}])
    old.strategy_report = {"add_ons": {"freq_kd": {"layer": "body"}}}
    path = save(old, tmp_path)
    data = json.loads(path.read_text())
    assert data["aux"][0] == {"name": "logit_kd", "temperature": 3}
    loaded = load(path)
    assert loaded.aux == old.aux and loaded.strategy_report == old.strategy_report
    rebuilt = create_aux([(a["name"], {k: v for k, v in a.items() if k != "name"}) for a in loaded.aux])
    assert rebuilt[0].cfg.temperature == 3.0 and rebuilt[1].cfg.exclude_diagonal is True
