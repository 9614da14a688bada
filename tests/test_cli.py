"""`clbench.cli.main(argv)`: a run writes its JSON; bad input is one line on stderr, exit 2, no file."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from clbench.cli import main

FAST = ["--scenario", "synthetic-2", "--accelerator", "cpu", "--quiet", "--set", "epochs=1", "limit_train_batches=2"]


def test_run_writes_a_self_describing_json(tmp_path, capsys):
    code = main(["run", "--strategy", "naive", *FAST, "--output-dir", str(tmp_path), "--seed", "3"])
    assert code == 0, capsys.readouterr().err
    (path,) = list(tmp_path.rglob("*.json"))
    assert path.relative_to(tmp_path).parts[:2] == ("synthetic-2", "naive")
    data = json.loads(path.read_text())
    assert data["status"] == "completed" and data["seed"] == 3
    m = data["accuracy_matrix"]
    assert len(m) == 2 and all(len(row) == 2 for row in m)
    assert data["run_config"]["epochs"] == 1 and data["run_config"]["limit_train_batches"] == 2
    assert data["strategy_config"]["lr"] == 0.05
    assert data["scenario_info"]["class_order"] == [0, 1, 2, 3]
    assert {"schema_version", "environment", "device", "metrics"} <= set(data)
    assert data["metrics"]["final_avg_acc"] == pytest.approx(sum(m[-1]) / 2)


def test_seeds_run_once_each(tmp_path, capsys):
    code = main(["run", "--strategy", "naive", *FAST, "--output-dir", str(tmp_path), "--seeds", "0", "1"])
    assert code == 0, capsys.readouterr().err
    names = sorted(p.name for p in tmp_path.rglob("*.json"))
    assert len(names) == 2 and "seed0" in names[0] and "seed1" in names[1]


def _bad(argv, tmp_path, capsys):
    out = tmp_path / "out"
    code = main([*argv, "--output-dir", str(out)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert not out.exists() or not list(out.rglob("*.json")), "a failed run must write no result file"
    return lines[0]


def test_unknown_strategy(tmp_path, capsys):
    line = _bad(["run", "--strategy", "naiive", *FAST], tmp_path, capsys)
    assert "'naiive'" in line and "naive" in line and "er" in line and "lwf" in line


def test_unknown_scenario(tmp_path, capsys):
    line = _bad(["run", "--strategy", "naive", "--scenario", "digits-55x"], tmp_path, capsys)
    assert "'digits-55x'" in line and "digits-5" in line and "synthetic-2" in line


def test_unknown_backbone(tmp_path, capsys):
    line = _bad(["run", "--strategy", "naive", *FAST, "--backbone", "resnet_nope"], tmp_path, capsys)
    assert "'resnet_nope'" in line and "clbench_mlp" in line


def test_malformed_set(tmp_path, capsys):
    line = _bad(["run", "--strategy", "naive", "--scenario", "synthetic-2", "--set", "lr"], tmp_path, capsys)
    assert "'lr'" in line and "key=value" in line


def test_unknown_set_key_lists_valid_keys(tmp_path, capsys):
    line = _bad(["run", "--strategy", "er", "--scenario", "synthetic-2", "--set", "bufer_size=10"], tmp_path, capsys)
    assert "'bufer_size'" in line and "buffer_size" in line and "epochs" in line


def test_wrong_type_in_set(tmp_path, capsys):
    line = _bad(["run", "--strategy", "er", "--scenario", "synthetic-2", "--set", "buffer_size=many"], tmp_path, capsys)
    assert "buffer_size='many'" in line and "integer" in line


def test_unparsable_yaml(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("epochs: [1,\n")
    line = _bad(["run", "--strategy", "naive", "--scenario", "synthetic-2", "--config", str(cfg)], tmp_path, capsys)
    assert str(cfg) in line and "YAML" in line


def test_bad_value_in_one_of_several_seeds_trains_nothing(tmp_path, capsys):
    line = _bad(["run", "--strategy", "naive", *FAST, "--seeds", "0", "x"], tmp_path, capsys)
    assert "'x'" in line


def test_classification_strategy_on_a_detection_scenario_is_refused(tmp_path, capsys):
    line = _bad(["run", "--strategy", "er", "--scenario", "shapes-2+2"], tmp_path, capsys)
    assert "'er'" in line and "'shapes-2+2'" in line and "detection" in line


def test_missing_data_root_names_the_path(tmp_path, capsys):
    missing = tmp_path / "no-data-here"
    line = _bad(["run", "--strategy", "naive", "--scenario", "cifar10-5", "--data-root", str(missing)], tmp_path, capsys)
    assert str(missing) in line


def test_yaml_config_is_applied_and_saved(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("epochs: 1\nlimit_train_batches: 1\nbuffer_size: 12\nstrategy: ignored-here\n")
    code = main(["run", "--strategy", "er", "--scenario", "synthetic-2", "--accelerator", "cpu", "--quiet",
                 "--config", str(cfg), "--output-dir", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    (path,) = list((tmp_path / "out").rglob("*.json"))
    data = json.loads(path.read_text())
    assert data["strategy_config"]["buffer_size"] == 12 and data["run_config"]["limit_train_batches"] == 1


@pytest.mark.parametrize("argv", [["--help"], ["list", "strategies"], ["list", "scenarios"], ["run", "--help"]])
def test_help_and_list_are_fast_and_import_no_torch(argv):
    """In a fresh interpreter: no torch/avalanche/lightning import, and under 1 s for import + command."""
    probe = textwrap.dedent(
        f"""
        import json, sys, time
        t = time.perf_counter()
        from clbench.cli import main
        try:
            main({argv!r})
        except SystemExit:
            pass
        elapsed = time.perf_counter() - t
        heavy = [m for m in ("torch", "avalanche", "pytorch_lightning", "timm") if m in sys.modules]
        print("PROBE" + json.dumps({{"elapsed": elapsed, "heavy": heavy}}))
        """
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    (line,) = [l for l in proc.stdout.splitlines() if l.startswith("PROBE")]
    report = json.loads(line[len("PROBE"):])
    assert report["heavy"] == [], report
    assert report["elapsed"] < 1.0, report
    if argv == ["list", "strategies"]:
        listed = [l.split()[0] for l in proc.stdout.splitlines() if l and not l.startswith("PROBE")]
        assert {"naive", "joint", "er", "lwf", "ewc"} <= set(listed)
