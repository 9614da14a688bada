"""`clbench sweep`: the grid, skipping stored runs, resuming stopped ones, process pool and Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clbench import config as C
from clbench.cli import main
from clbench.engine import sweep as S
from clbench.errors import UsageError

FAST = ["--epochs", "1", "--accelerator", "cpu"]


def stored(root: Path) -> dict[str, dict]:
    return {str(p.relative_to(root)): json.loads(p.read_text()) for p in root.rglob("*.json") if ".resume" not in p.parts}


def test_parse_seeds():
    assert S.parse_seeds("0,1,2") == [0, 1, 2]
    assert S.parse_seeds("0-3,3,7") == [0, 1, 2, 3, 7]
    for bad in ("a", "1,,x", ""):
        with pytest.raises(UsageError):
            S.parse_seeds(bad)


def test_plan_routes_set_keys_and_passes_lightning_scaling_through(tmp_path):
    jobs = S.plan(["naive", "er"], ["synthetic-2"], [0, 1],
                  overrides={"buffer_size": "50", "epochs": "2", "trainer_strategy": "ddp", "devices": "2", "num_nodes": 3},
                  output_dir=str(tmp_path))
    assert [(j.spec.strategy, j.spec.seed) for j in jobs] == [("naive", 0), ("naive", 1), ("er", 0), ("er", 1)]
    by = {j.spec.strategy: j.spec for j in jobs}
    assert by["er"].strategy_overrides == {"buffer_size": 50} and by["naive"].strategy_overrides == {}
    run = by["naive"].run
    assert (run.epochs, run.trainer_strategy, run.devices, run.num_nodes) == (2, "ddp", "2", 3)
    assert run.output_dir == str(tmp_path) and all(j.existing is None for j in jobs)


def test_all_strategies_means_those_defined_for_each_scenarios_images(tmp_path, capsys):
    from clbench.registry import STRATEGIES

    needs_rgb = {n for n in STRATEGIES.names() if STRATEGIES.get(n).input_channels == 3}
    assert {"clfd", "er_clfd", "der_pp_clfd"} <= needs_rgb
    needs_vit = {n for n in STRATEGIES.names() if STRATEGIES.get(n).needs_vit_backbone}
    assert {"aper", "ranpac", "tuna", "daf", "sgds", "saef", "preprompt"} <= needs_vit
    from clbench.engine.runner import strategy_defaults

    # a strategy with a backbone of its own for the scenario (the PTM family's tiny ViT on synthetic-*)
    # is judged on that backbone, as a run would build it
    own_backbone = {n for n in STRATEGIES.names() if any(v.get("backbone") for _, v in strategy_defaults(STRATEGIES.get(n), "synthetic-2"))}
    assert {"daf", "simplecil", "preprompt"} <= own_backbone
    kept, skipped = S.compatible_strategies(STRATEGIES.names(), "synthetic-2")  # 1-channel images, an MLP
    assert set(skipped) == needs_rgb | (needs_vit - own_backbone)
    assert set(kept) == set(STRATEGIES.names()) - set(skipped)
    assert skipped["clfd"] == "defined for 3-channel images, the scenario has 1"
    kept, skipped = S.compatible_strategies(["naive", "daf"], "synthetic-2", C.RunConfig(backbone="clbench_mlp_tiny"))
    assert kept == ["naive"]
    assert skipped["daf"].startswith("backbone MLP has no ViT blocks (norm2 + mlp); adapters need a timm Vision Transformer")
    assert S.compatible_strategies(["naive", "clfd"], "synthetic32-3") == (["naive", "clfd"], {})
    kept, skipped = S.compatible_strategies(["naive", "etag"], "synthetic32-3")  # the default backbone is a ConvNet
    assert kept == ["naive"] and skipped["etag"].startswith("etag needs a CIFAR ResNet backbone")
    resnet = C.RunConfig(backbone="resnet18_cifar_nf8")
    assert S.compatible_strategies(["naive", "etag"], "synthetic32-3", resnet) == (["naive", "etag"], {})
    vit = C.RunConfig(backbone="clbench_vit_tiny")
    assert S.compatible_strategies(["naive", "daf", "simplecil"], "digits32-5", vit) == (["naive", "daf", "simplecil"], {})

    assert main(["sweep", "--strategies", "all", "--scenarios", "synthetic-2,synthetic32-3", "--seeds", "0",
                 "--dry-run", "--output-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "skip  clfd on synthetic-2: defined for 3-channel images, the scenario has 1" in lines
    assert "run   clfd on synthetic32-3 seed 0" in lines and "run   naive on synthetic-2 seed 0" in lines
    assert not any(line.startswith("run   clfd on synthetic-2") for line in lines)

    # a key only the skipped strategies know is still valid for the grid as a whole
    assert main(["sweep", "--strategies", "all", "--scenarios", "synthetic-2,synthetic32-3", "--seeds", "0",
                 "--set", "kwta_ratio=0.5", "--dry-run", "--output-dir", str(tmp_path)]) == 0
    assert "run   clfd on synthetic32-3 seed 0" in capsys.readouterr().out.splitlines()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--strategies", "naive,nope"], "unknown strategy 'nope'"),
        (["--strategies", "naive", "--scenarios", "nope-3"], "unknown scenario 'nope-3'"),
        (["--strategies", "naive", "--set", "buffer_size=10"], "unknown key 'buffer_size'"),
        (["--strategies", "er", "--set", "buffer_size=many"], "expected an integer"),
        (["--strategies", "naive", "--jobs", "0"], "--jobs 0"),
    ],
)
def test_bad_grid_is_rejected_before_any_run(tmp_path, capsys, argv, message):
    argv = ["sweep", "--scenarios", "synthetic-2", *argv, "--output-dir", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.rglob("*.json"))


def test_sweep_runs_the_grid_then_skips_what_is_stored(tmp_path, capsys):
    out = tmp_path / "results"
    argv = ["sweep", "--strategies", "naive,er", "--scenarios", "synthetic-2", "--seeds", "0,1", "--in-process",
            "--output-dir", str(out), *FAST]
    assert main(argv) == 0
    first = stored(out)
    assert sorted(first) == [f"synthetic-2/{s}/clbench_mlp_tiny-seed{k}-cpu.json" for s in ("er", "naive") for k in (0, 1)]
    assert all(r["status"] == "completed" and len(r["accuracy_matrix"]) == 2 for r in first.values())
    assert "4 completed" in capsys.readouterr().out

    # everything stored: nothing runs, nothing is rewritten, and no spurious warning (lr_milestones is () asked
    # and [] stored once JSON has read it back: the same setting)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.json")}
    assert first["synthetic-2/er/clbench_mlp_tiny-seed0-cpu.json"]["strategy_config"]["lr_milestones"] == []
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "0 completed, 0 failed, 0 errors, 4 skipped" in text
    assert "warning" not in text and "different" not in text
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.json")} == mtimes

    # one result lost: only that run is redone, and it reproduces the same numbers
    lost = out / "synthetic-2/er/clbench_mlp_tiny-seed1-cpu.json"
    lost.unlink()
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "1 completed" in text and "3 skipped" in text and "[1/1] er on synthetic-2 seed 1" in text
    assert json.loads(lost.read_text())["accuracy_matrix"] == first[str(lost.relative_to(out))]["accuracy_matrix"]

    # asked with other settings: the stored run is kept and the mismatch is said, with the way to replace it
    other = [*argv[:-len(FAST)], "--epochs", "3", "--accelerator", "cpu", "--seeds", "0"]
    assert main(other) == 0
    text = capsys.readouterr().out
    assert (f"skip  er on synthetic-2 seed 0: {out / 'synthetic-2/er/clbench_mlp_tiny-seed0-cpu.json'} (warning: stored "
            f"with different epochs (epochs: 1 vs 3); rerun with --overwrite to replace it, or use another "
            f"--output-dir)") in text
    assert "2 skipped" in text
    assert json.loads(lost.read_text())["run_config"]["epochs"] == 1
    # --overwrite: those two runs are redone with the settings asked for and replace the stored ones
    assert main([*other, "--overwrite", "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines() == ["run   naive on synthetic-2 seed 0", "run   er on synthetic-2 seed 0"]
    assert main([*other, "--overwrite"]) == 0
    assert "2 completed, 0 failed, 0 errors, 0 skipped" in capsys.readouterr().out
    now = stored(out)
    assert [now[f"synthetic-2/{s}/clbench_mlp_tiny-seed{k}-cpu.json"]["run_config"]["epochs"]
            for s in ("er", "naive") for k in (0, 1)] == [3, 1, 3, 1]


def test_run_refuses_to_replace_a_result_made_with_other_settings(tmp_path, capsys):
    argv = ["run", "--strategy", "naive", "--scenario", "synthetic-2", "--quiet", "--output-dir", str(tmp_path),
            "--accelerator", "cpu", "--epochs", "1"]
    assert main(argv) == 0
    (path,) = [tmp_path / p for p in stored(tmp_path)]
    text, mtime = path.read_text(), path.stat().st_mtime_ns
    # other settings: refused before training, one line naming them and --overwrite, exit 2, nothing written
    assert main([*argv, "--epochs", "2", "--set", "lr=0.1"]) == 2
    err = capsys.readouterr().err
    assert err == (f"clbench: error: {path} holds a result made with other settings (stored vs now: epochs: 1 vs 2, "
                   f"lr: 0.05 vs 0.1); pass --overwrite to replace it, or use another --output-dir\n")
    assert path.read_text() == text and path.stat().st_mtime_ns == mtime
    assert sorted(stored(tmp_path)) == [str(path.relative_to(tmp_path))]  # and nothing else either
    # the same settings (--quiet, the output folder aside) overwrite as before
    assert main(argv) == 0 and path.stat().st_mtime_ns != mtime
    # --overwrite replaces it with the new settings
    assert main([*argv, "--epochs", "2", "--overwrite"]) == 0
    assert json.loads(path.read_text())["run_config"]["epochs"] == 2


def test_failed_run_is_reported_and_retried_on_request(tmp_path, capsys):
    argv = ["sweep", "--strategies", "naive", "--scenarios", "synthetic-2", "--in-process", "--set", "lr=1e30",
            "--output-dir", str(tmp_path), *FAST]
    assert main(argv) == 1
    assert "1 failed" in capsys.readouterr().out
    (result,) = stored(tmp_path).values()
    assert result["status"] == "failed" and "nan" in result["error"]
    assert main(argv) == 0 and "1 skipped" in capsys.readouterr().out  # failed runs are stored results too
    assert main([*argv, "--retry-failed"]) == 1 and "1 failed" in capsys.readouterr().out


def test_stopped_run_is_resumed_from_its_last_experience(tmp_path, capsys):
    from clbench.engine.runner import run

    (job,) = S.plan(["naive"], ["synthetic-2"], [0], overrides={"epochs": 1, "accelerator": "cpu"},
                    output_dir=str(tmp_path))

    def stop_after_first(i, result, strategy):
        if i == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(job.spec, on_experience=stop_after_first)
    assert not stored(tmp_path)  # an interrupted run stores no result, only its resume state
    (job,) = S.plan(["naive"], ["synthetic-2"], [0], overrides={"epochs": 1, "accelerator": "cpu"},
                    output_dir=str(tmp_path))
    assert job.spec.resume and job.existing is None
    counts = S.sweep([job], in_process=True)
    assert counts["completed"] == 1 and "(resumed)" in capsys.readouterr().out
    (result,) = stored(tmp_path).values()
    assert result["status"] == "completed" and len(result["accuracy_matrix"]) == 2


def test_process_pool_runs_each_job_in_a_fresh_process(tmp_path, capsys):
    argv = ["sweep", "--strategies", "naive", "--scenarios", "synthetic-2", "--seeds", "0,1", "--jobs", "2",
            "--output-dir", str(tmp_path), *FAST]
    assert main(argv) == 0
    results = stored(tmp_path)
    assert len(results) == 2 and all(r["status"] == "completed" for r in results.values())
    assert "2 completed" in capsys.readouterr().out


def test_ray_cluster(tmp_path):
    pytest.importorskip("ray")
    argv = ["sweep", "--strategies", "naive", "--scenarios", "synthetic-2", "--seeds", "0,1", "--ray-address", "local",
            "--output-dir", str(tmp_path), *FAST]
    assert main(argv) == 0
    assert len(stored(tmp_path)) == 2


def test_ray_address_without_ray_is_a_clear_error(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)
    argv = ["sweep", "--strategies", "naive", "--scenarios", "synthetic-2", "--ray-address", "local",
            "--output-dir", str(tmp_path), *FAST]
    assert main(argv) == 2
    assert "pip install 'clbench[ray]'" in capsys.readouterr().err
