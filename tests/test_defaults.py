"""A strategy's own DEFAULTS: the paper's backbone before the scenario's, and the precedence of every level."""

from __future__ import annotations

import time

import pytest

from clbench.cli import build_parser, main, spec_from_args
from clbench.engine.runner import RunSpec, resolve, resolve_sources, strategy_defaults
from clbench.registry import STRATEGIES

PILOT = ["l2p", "dualprompt", "coda_prompt", "simplecil", "aper", "ranpac", "ease", "tuna", "daf", "sgds", "saef"]
RESNET = ["etag", "lord", "clfd", "er_clfd", "der_pp_clfd", "er_ace_clfd", "cls_er_clfd", "der_pp", "er_ace", "icarl",
          "cls_er"]


@pytest.mark.parametrize("name", PILOT)
def test_pilot_methods_default_to_the_in21k_vit_at_224_without_normalisation(name):
    run, _ = resolve(RunSpec(name, "cifar100-10"))
    assert (run.backbone, run.pretrained, run.image_size, run.normalization) == (
        "vit_base_patch16_224.augreg_in21k", True, 224, "none")


def test_preprompt_defaults_to_the_original_in21k_checkpoint_and_its_input():
    run, cfg = resolve(RunSpec("preprompt", "cifar100-10"))
    assert (run.backbone, run.pretrained, run.image_size, run.normalization, run.class_order) == (
        "vit_base_patch16_224.orig_in21k", True, 224, "inception", "natural")
    assert cfg.prompt_blocks == 5


@pytest.mark.parametrize("name", PILOT + ["preprompt"])
def test_ptm_methods_take_the_tiny_vit_on_tiny_data(name):
    run, _ = resolve(RunSpec(name, "digits32-5"))
    assert (run.backbone, run.pretrained, run.image_size) == ("clbench_vit_tiny", False, None)


@pytest.mark.parametrize("name", RESNET)
def test_resnet_methods_default_to_mammoths_cifar_resnet18(name):
    for scenario in ("cifar10-5", "cifar100-10", "tinyimagenet-10"):
        run, _ = resolve(RunSpec(name, scenario))
        assert (run.backbone, run.pretrained) == ("resnet18_cifar", False), scenario
    run, _ = resolve(RunSpec(name, "synthetic32-3"))
    assert run.backbone is None  # no need of its own: the scenario's default


def test_patterns_apply_least_specific_first(monkeypatch):
    cls = STRATEGIES.get("naive")
    monkeypatch.setattr(cls, "DEFAULTS", {"cifar100-10": {"epochs": 3}, "*": {"epochs": 1, "batch_size": 5},
                                          "cifar100-*": {"epochs": 2}, "cifar*": {"epochs": 9, "num_workers": 1}},
                        raising=False)
    assert [p for p, _ in strategy_defaults(cls, "cifar100-10")] == ["*", "cifar*", "cifar100-*", "cifar100-10"]
    run, _, sources = resolve_sources(RunSpec("naive", "cifar100-10"))
    assert (run.epochs, run.batch_size, run.num_workers) == (3, 5, 1)
    assert sources["run_config"]["epochs"] == "strategy defaults (cifar100-10)"
    assert sources["run_config"]["batch_size"] == "strategy defaults (*)"
    run, _ = resolve(RunSpec("naive", "cifar10-5"))
    assert run.epochs == 9


def test_precedence_defaults_paper_config_set_flags(monkeypatch, tmp_path):
    """One key set at each level and above: the highest wins, and the result says where it came from."""
    cls = STRATEGIES.get("l2p")
    monkeypatch.setattr(cls, "DEFAULTS", {"*": {
        "epochs": 1, "batch_size": 1, "eval_batch_size": 1, "num_workers": 1, "limit_train_batches": 1,
        "top_k": 1, "pool_size": 11, "prompt_length": 1, "pull_weight": 0.1}})
    monkeypatch.setattr(cls, "PAPER_SETTINGS", {"cifar100-10": {
        "epochs": 2, "batch_size": 2, "eval_batch_size": 2, "num_workers": 2,
        "top_k": 2, "pool_size": 12, "prompt_length": 2}})
    config = tmp_path / "c.yaml"
    config.write_text("epochs: 3\nbatch_size: 3\neval_batch_size: 3\ntop_k: 3\npool_size: 13\n")
    args = build_parser().parse_args([
        "run", "--strategy", "l2p", "--scenario", "cifar100-10", "--paper-settings", "--config", str(config),
        "--set", "epochs=4", "batch_size=4", "top_k=4", "--epochs", "5"])
    run, cfg, sources = resolve_sources(spec_from_args(args, 0))
    expected_run = {"epochs": (5, "flag"), "batch_size": (4, "set"), "eval_batch_size": (3, "config"),
                    "num_workers": (2, "paper settings"), "limit_train_batches": (1, "strategy defaults (*)"),
                    "deterministic": (True, "default")}
    for key, (value, source) in expected_run.items():
        assert (getattr(run, key), sources["run_config"][key]) == (value, source), key
    expected_strategy = {"top_k": (4, "set"), "pool_size": (13, "config"), "prompt_length": (2, "paper settings"),
                         "pull_weight": (0.1, "strategy defaults (*)")}
    for key, (value, source) in expected_strategy.items():
        assert (getattr(cfg, key), sources["strategy_config"][key]) == (value, source), key


def test_a_backbone_of_another_architecture_takes_the_defaults_input_and_weights_with_it():
    run, _, sources = resolve_sources(RunSpec("l2p", "cifar100-10", run=_run(backbone="clbench_vit_tiny")))
    assert (run.backbone, run.pretrained, run.image_size, run.normalization) == ("clbench_vit_tiny", False, None, "dataset")
    assert sources["run_config"]["image_size"] == "default"
    # another weights tag of the same architecture keeps them
    run, _ = resolve(RunSpec("l2p", "cifar100-10", run=_run(backbone="vit_base_patch16_224.orig_in21k")))
    assert (run.backbone, run.pretrained, run.image_size, run.normalization) == (
        "vit_base_patch16_224.orig_in21k", True, 224, "none")


def test_values_given_equal_to_the_field_default_still_win_over_the_strategy_defaults():
    args = build_parser().parse_args(["run", "--strategy", "l2p", "--scenario", "cifar100-10", "--set",
                                      "pretrained=false", "normalization=dataset"])
    run, _, sources = resolve_sources(spec_from_args(args, 0))
    assert (run.pretrained, run.normalization, run.image_size) == (False, "dataset", 224)
    assert sources["run_config"]["pretrained"] == "set"


def test_the_preprompt_headline_command_fails_fast_naming_the_weights(tmp_path, monkeypatch, capsys):
    """No weights, no data: one line naming the exact hub repo and the ways to get it, before data is read."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    out = tmp_path / "results"
    argv = ["run", "--strategy", "preprompt", "--scenario", "cifar100-10", "--data-root", str(tmp_path / "data"),
            "--output-dir", str(out)]
    main(argv)  # the first call imports what the command line imports
    capsys.readouterr()
    start = time.perf_counter()
    code = main(argv)
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "timm/vit_base_patch16_224.orig_in21k (model.safetensors)" in err[0]
    assert "--download" in err[0] and "--weights FILE" in err[0]
    assert "CIFAR" not in err[0]  # the weights come first; the data was never looked for
    assert elapsed < 1.0
    assert not out.exists()


def test_a_run_records_where_each_setting_came_from(tmp_path, fast_config_for):
    from clbench.engine.runner import run

    result = run(RunSpec("simplecil", "digits32-5", run=fast_config_for(tmp_path)))
    assert result.status == "completed" and result.backbone == "clbench_vit_tiny"
    assert result.settings_source["run_config"]["backbone"] == "strategy defaults (digits*)"
    assert result.settings_source["run_config"]["epochs"] == "run spec"
    assert result.settings_source["run_config"]["precision"] == "default"
    naive = run(RunSpec("naive", "digits32-5", run=fast_config_for(tmp_path)))
    assert naive.settings_source["run_config"]["backbone"] == "scenario default (clbench_convnet)"


def _run(**values):
    from clbench.config import RunConfig

    return RunConfig(**values)
