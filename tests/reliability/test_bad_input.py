"""Every bad input: one line on stderr naming the bad value and what was expected, exit 2, no result file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

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
    other_model = tmp_path / "other.pt"
    torch.save({"x": torch.zeros(2)}, other_model)
    text_weights = tmp_path / "weights.txt"
    text_weights.write_text("not a checkpoint")
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
        ("boolean band weight", ["--strategy", "er", "--aux", "freq_kd:low_weight=true"], ["freq_kd low_weight='true'", "expected a number"]),
        ("boolean feature weight", ["--strategy", "er", "--aux", "multi_teacher:feature_weight=true"],
         ["multi_teacher feature_weight='true'", "expected a number"]),
        ("negative feature weight", ["--strategy", "er", "--aux", "multi_teacher:feature_weight=-1"],
         ["feature_weight=-1", "number >= 0"]),
        ("bad teacher policy", ["--strategy", "er", "--aux", "multi_teacher:policy=vote"], ["policy='vote'", "task_owner, rl"]),
        ("zero agent steps", ["--strategy", "er", "--aux", "multi_teacher:policy=rl,agent_steps=0"],
         ["agent_steps=0", "positive integer"]),
        ("zero agent lr", ["--strategy", "er", "--aux", "multi_teacher:policy=rl,agent_lr=0"], ["agent_lr=0", "positive number"]),
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
        ("negative class-order seed", ["--strategy", "er", "--class-order", "seed:-1"], ["'seed:-1'", "N >= 0"]),
        ("bad buffer policy", ["--strategy", "er", "--set", "buffer_policy=fifo"], ["'fifo'", "class_balanced"]),
        ("missing pretrained weights", ["--strategy", "er", "--backbone", "resnet18", "--pretrained"], ["resnet18.a1_in1k", "not found locally", "--download", "--weights"]),
        ("missing weights file", ["--strategy", "er", "--backbone", "resnet18", "--pretrained", "--weights", str(tmp_path / "w.pth")], ["w.pth", "not found"]),
        ("no pretrained for own nets", ["--strategy", "er", "--pretrained"], ["'clbench_mlp'", "no pretrained"]),
        ("output dir not writable", ["--strategy", "er", "--output-dir", str(not_a_dir / "sub")], ["not writable"]),
        ("no paper setting", ["--strategy", "er", "--paper-settings"], ["'digits-5'", "cifar10-5"]),
        ("gpu without CUDA", ["--strategy", "er", "--accelerator", "gpu"], ["accelerator='gpu'", "no CUDA device"]),
        ("bad seed", ["--strategy", "er", "--seed", "one"], ["'one'", "int"]),
        ("seed out of range", ["--strategy", "er", "--seed", "-1"], ["seed=-1", "0..4294967295"]),
        ("bad accelerator name", ["--strategy", "er", "--accelerator", "bogus"], ["accelerator='bogus'", "Lightning refuses"]),
        ("bad precision", ["--strategy", "er", "--precision", "bogus"], ["precision='bogus'", "Lightning refuses"]),
        ("zero devices", ["--strategy", "er", "--devices", "0"], ["devices='0'", "Lightning refuses"]),
        ("negative momentum", ["--strategy", "er", "--set", "momentum=-1"], ["momentum=-1.0", ">= 0"]),
        ("negative batch limit", ["--strategy", "er", "--set", "limit_train_batches=-1"],
         ["limit_train_batches=-1", "positive integer"]),
        ("bad normalization", ["--strategy", "er", "--set", "normalization=bogus"], ["normalization='bogus'", "imagenet"]),
        ("add-on weight not a number", ["--strategy", "er", "--aux", "logit_kd:weight=abc"],
         ["logit_kd weight='abc'", "expected a number"]),
        ("add-on weight nan", ["--strategy", "er", "--aux", "logit_kd:weight=nan"], ["logit_kd weight='nan'", "finite number"]),
        ("add-on flag not a boolean", ["--strategy", "er", "--aux", "relation_kd:exclude_diagonal=maybe"],
         ["exclude_diagonal='maybe'", "boolean (true/false)"]),
        ("unknown add-on setting", ["--strategy", "er", "--aux", "logit_kd:bogus=1"], ["'bogus'", "--aux logit_kd", "valid keys", "temperature"]),
        ("zero replay batch", ["--strategy", "er", "--set", "replay_batch_size=0"], ["replay_batch_size=0", "positive integer"]),
        ("zero distillation temperature", ["--strategy", "lwf", "--set", "temperature=0"], ["temperature=0", "positive"]),
        ("weights imply pretrained: not for own nets", ["--strategy", "er", "--weights", str(other_model)], ["'clbench_mlp'", "no pretrained weights", "--weights"]),
        ("weights of another model", ["--strategy", "er", "--backbone", "resnet18", "--pretrained", "--weights", str(other_model)],
         ["other.pt", "holds no weights of 'resnet18'"]),
        ("unreadable weights", ["--strategy", "er", "--backbone", "resnet18", "--pretrained", "--weights", str(text_weights)],
         ["weights.txt", "not a readable checkpoint"]),
        ("output dir the system refuses", ["--strategy", "er", "--output-dir", "/proc/clbench-results"], ["not writable"]),
        ("feature map found only in training", ["--strategy", "naive", "--scenario", "synthetic32-3", "--aux", "freq_kd:layer=head"],
         ["layer='head'", "[N, C, H, W]"]),
        ("missing data root", ["--strategy", "er", "--scenario", "cifar10-5", "--data-root", str(tmp_path / "no-data")], ["no-data"]),
    ]


CASE_IDS = [c[0] for c in _bad(Path("/tmp"))]


@pytest.mark.parametrize("case", CASE_IDS)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, case):
    _, argv, expected = next(c for c in _bad(tmp_path) if c[0] == case)
    if "cifar10-5" in argv and "cifar10-5" not in SCENARIOS.names():
        pytest.skip("cifar scenarios not registered")
    if "/proc/clbench-results" in argv and not Path("/proc").is_dir():
        pytest.skip("no /proc here")
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
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()], "nothing may be left: no result, no resume state"


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


@pytest.mark.parametrize("argv, expected", [
    (["--seeds", "3-1", "--dry-run"], ["'3-1'", "empty range"]),
    (["--seeds", "0", "--aux", "logit_kd:weight=abc", "--dry-run"], ["weight='abc'", "expected a number"]),
    (["--seeds", "0", "--accelerator", "bogus", "--dry-run"], ["accelerator='bogus'", "Lightning refuses"]),
    (["--seeds", "0", "--output-dir", "{file}"], ["is a file", "expected a directory"]),
], ids=["reversed seed range", "bad add-on setting", "bad accelerator", "output dir is a file"])
def test_sweep_checks_the_whole_grid_before_any_run(tmp_path, capsys, argv, expected):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    argv = [a.replace("{file}", str(a_file)) for a in argv]
    if "--output-dir" not in argv:
        argv += ["--output-dir", str(tmp_path / "out")]
    code = main(["sweep", "--strategies", "naive", "--scenarios", "digits-5", "--epochs", "1", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    for fragment in expected:
        assert fragment in err, (fragment, err)
    assert not (tmp_path / "out").exists()


def test_leaderboard_and_plot_refuse_an_out_path_they_cannot_write(tmp_path, capsys):
    results = Path(__file__).parents[1] / "fixtures" / "sweep"
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for argv in (["leaderboard", str(results), "--out", str(a_file / "board.md")],
                 ["plot", str(results), "--out", str(a_file)]):
        code = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and "Traceback" not in "\n".join(err), err
        assert err[-1].startswith("clbench: error: --out") and "cannot be written" in err[-1]


def test_a_result_with_a_non_numeric_metric_is_skipped_with_a_warning(tmp_path, capsys):
    import shutil

    shutil.copytree(Path(__file__).parents[1] / "fixtures" / "sweep", tmp_path, dirs_exist_ok=True)
    broken = next(tmp_path.rglob("*.json"))
    data = json.loads(broken.read_text())
    data["metrics"]["final_avg_acc"] = "high"
    broken.write_text(json.dumps(data))
    code = main(["leaderboard", str(tmp_path), "--format", "md"])
    captured = capsys.readouterr()
    assert code == 0 and "Traceback" not in captured.err
    assert f"skipped {broken}" in captured.err and "metric 'final_avg_acc' is 'high'; expected a number" in captured.err
    for other in tmp_path.rglob("*.json"):  # with only unreadable files the error names the first one
        if other != broken:
            other.unlink()
    assert main(["leaderboard", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "1 unreadable file(s)" in err and str(broken) in err


def test_a_corrupt_resume_state_is_a_clear_error(tmp_path):
    from clbench.engine import checkpoint
    from clbench.errors import UsageError

    (tmp_path / checkpoint.META).write_text(json.dumps({"state_file": "state-1.pt"}))
    (tmp_path / "state-1.pt").write_bytes(b"garbage, not a torch file")
    with pytest.raises(UsageError, match="is unreadable \\(UnpicklingError\\); delete it to start over"):
        checkpoint.load(tmp_path)


def test_wandb_without_a_login_is_refused_before_training(tmp_path, capsys, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    out = tmp_path / "out"
    code = main(RUN + ["--strategy", "er", "--wandb", "proj", "--output-dir", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "no W&B login" in err and "WANDB_MODE=offline" in err
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()]
