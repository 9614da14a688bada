"""Every bad input: one line on stderr naming the bad value and what was expected, exit 2, no result file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clbench.cli import main
from clbench.registry import SCENARIOS

RUN = ["run", "--quiet", "--epochs", "1"]


def _bad(tmp_path: Path, yaml_text: str | None = None) -> list[tuple[str, list[str], list[str]]]:
    """(case id, argv, substrings the one-line message must contain)."""
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml_text or "lr: [0.1\n")
    unknown_key_cfg = tmp_path / "unknown.yaml"
    unknown_key_cfg.write_text("lrr: 0.1\n")
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("x")
    return [
        ("unknown strategy", ["--strategy", "erx"], ["'erx'", "naive", "er,"]),
        ("unknown scenario", ["--strategy", "er", "--scenario", "digits-five"], ["'digits-five'", "digits-5"]),
        ("unknown backbone", ["--strategy", "er", "--backbone", "resnet999"], ["'resnet999'", "timm model"]),
        ("unknown add-on", ["--strategy", "er", "--aux", "distil"], ["'distil'", "logit_kd"]),
        ("malformed add-on", ["--strategy", "er", "--aux", "logit_kd:weight"], ["'logit_kd:weight'", "NAME[:key=value"]),
        ("bad add-on value", ["--strategy", "er", "--aux", "logit_kd:temperature=-1"], ["temperature=-1", "positive"]),
        ("duplicate add-on", ["--strategy", "er", "--aux", "logit_kd", "--aux", "logit_kd"], ["'logit_kd'", "at most once"]),
        ("incompatible add-on", ["--strategy", "joint", "--aux", "logit_kd"], ["'joint'", "'logit_kd'"]),
        ("bad distilled samples", ["--strategy", "er", "--aux", "feature_kd:samples=old"], ["samples='old'", "current, replay, all"]),
        ("map add-on on an MLP", ["--strategy", "er", "--aux", "freq_kd"], ["freq_kd", "feature map", "Conv2d", "layer="]),
        ("unknown add-on layer", ["--strategy", "er", "--aux", "feature_kd:layer=stage9"], ["layer='stage9'", "module path"]),
        ("boolean band weight", ["--strategy", "er", "--aux", "freq_kd:low_weight=true"], ["low_weight=True", "number >= 0"]),
        ("boolean feature weight", ["--strategy", "er", "--aux", "multi_teacher:feature_weight=true"],
         ["feature_weight=True", "number >= 0"]),
        ("negative feature weight", ["--strategy", "er", "--aux", "multi_teacher:feature_weight=-1"],
         ["feature_weight=-1", "number >= 0"]),
        ("bad teacher policy", ["--strategy", "er", "--aux", "multi_teacher:policy=vote"], ["policy='vote'", "task_owner"]),
        ("malformed --set", ["--strategy", "er", "--set", "lr0.1"], ["'lr0.1'", "key=value"]),
        ("unknown --set key", ["--strategy", "er", "--set", "lrr=0.1"], ["'lrr'", "valid keys", "buffer_size", "epochs"]),
        ("wrong type int", ["--strategy", "er", "--set", "buffer_size=many"], ["buffer_size='many'", "integer"]),
        ("wrong type float", ["--strategy", "er", "--set", "lr=fast"], ["lr='fast'", "number"]),
        ("wrong type bool", ["--strategy", "lwf", "--set", "warmup=maybe"], ["warmup='maybe'", "boolean"]),
        ("non-finite float", ["--strategy", "er", "--set", "lr=nan"], ["lr='nan'", "finite"]),
        ("unparsable YAML", ["--strategy", "er", "--config", str(cfg)], ["bad.yaml", "not valid YAML"]),
        ("unknown YAML key", ["--strategy", "er", "--config", str(unknown_key_cfg)], ["'lrr'", "valid keys"]),
        ("missing YAML", ["--strategy", "er", "--config", str(tmp_path / "nope.yaml")], ["nope.yaml", "not found"]),
        ("negative buffer", ["--strategy", "er", "--set", "buffer_size=-5"], ["buffer_size=-5", ">= 0"]),
        ("buffer larger than data", ["--strategy", "er", "--set", "buffer_size=100000"], ["buffer_size=100000", "0..1437"]),
        ("uneven class split", ["--strategy", "er", "--scenario", "digits-3"], ["10 classes", "3 experiences"]),
        ("zero epochs", ["--strategy", "er", "--epochs", "0"], ["epochs=0", "positive"]),
        ("bad FLOP counting mode", ["--strategy", "er", "--flops", "every"], ["flops='every'", "sample, all or off"]),
        ("bad optimizer", ["--strategy", "er", "--set", "optimizer=lion"], ["'lion'", "sgd"]),
        ("bad class order", ["--strategy", "er", "--class-order", "shuffled"], ["'shuffled'", "seed:N"]),
        ("bad buffer policy", ["--strategy", "er", "--set", "buffer_policy=fifo"], ["'fifo'", "class_balanced"]),
        ("missing pretrained weights", ["--strategy", "er", "--backbone", "resnet18", "--pretrained"], ["'resnet18'", "not available locally", "--weights"]),
        ("missing weights file", ["--strategy", "er", "--backbone", "resnet18", "--pretrained", "--weights", str(tmp_path / "w.pth")], ["w.pth", "not found"]),
        ("no pretrained for own nets", ["--strategy", "er", "--pretrained"], ["'clbench_mlp'", "no pretrained"]),
        ("output dir not writable", ["--strategy", "er", "--output-dir", str(not_a_dir / "sub")], ["not writable"]),
        ("no paper setting", ["--strategy", "er", "--paper-settings"], ["'digits-5'", "cifar10-5"]),
        ("gpu without CUDA", ["--strategy", "er", "--accelerator", "gpu"], ["accelerator='gpu'", "no CUDA device"]),
        ("bad seed", ["--strategy", "er", "--seed", "one"], ["'one'", "int"]),
        ("missing data root", ["--strategy", "er", "--scenario", "cifar10-5", "--data-root", str(tmp_path / "no-data")], ["no-data"]),
    ]


CASE_IDS = [c[0] for c in _bad(Path("/tmp"))]


@pytest.mark.parametrize("case", CASE_IDS)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, case):
    _, argv, expected = next(c for c in _bad(tmp_path) if c[0] == case)
    if "cifar10-5" in argv and "cifar10-5" not in SCENARIOS.names():
        pytest.skip("cifar scenarios not registered")
    if case == "gpu without CUDA":
        import torch

        if torch.cuda.is_available():
            pytest.skip("a CUDA device is present")
    out = tmp_path / "results"
    if "--output-dir" not in argv:
        argv = argv + ["--output-dir", str(out)]
    code = main(RUN + argv)
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("clbench: error: ")
    assert "Traceback" not in err
    for fragment in expected:
        assert fragment in err, (fragment, err)
    assert not out.exists() or not any(out.rglob("*.json")), "no result may be written"


def test_corrupt_dataset_file_is_a_clear_error(tmp_path, capsys):
    if "cifar10-5" not in SCENARIOS.names():
        pytest.skip("cifar scenarios not registered")
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch", "batches.meta"]:
        (folder / name).write_bytes(b"\x80\x04\x95truncated")
    code = main(RUN + ["--strategy", "er", "--scenario", "cifar10-5", "--data-root", str(tmp_path),
                       "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert "cifar-10-batches-py" in err
    assert not (tmp_path / "out").exists()


def test_leaderboard_skips_a_newer_schema_result(tmp_path, capsys):
    good = Path(__file__).parents[1] / "fixtures" / "sweep"
    if not good.exists():
        pytest.skip("no results fixture")
    import shutil

    shutil.copytree(good, tmp_path, dirs_exist_ok=True)
    newer = tmp_path / "digits-5" / "er" / "future.json"
    newer.parent.mkdir(parents=True, exist_ok=True)
    newer.write_text(json.dumps({"schema_version": 99, "accuracy_matrix": [[1.0]]}))
    code = main(["leaderboard", str(tmp_path), "--format", "md"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "| er" in captured.out or "er " in captured.out, "the valid results still make a table"
    assert "schema_version 99" in captured.err and "Traceback" not in captured.err
