"""wandb mirror: an offline run holds the config, per-step metrics on one global step, a row per finished
experience (%, numbered from 1), tables (unseen cells blank), heatmap and curve images and the summary."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest

from clbench.cli import main

pytest.importorskip("wandb")


def read_wandb_records(path: Path) -> list:
    """Decode an offline `run-*.wandb` file: a 7-byte wandb header, then LevelDB log blocks of protobuf Records."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("wandb")
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_DIR", str(root))
    mp.setenv("WANDB_SILENT", "true")
    mp.chdir(root)
    out = root / "results"
    code = main(["run", "--strategy", "er", "--scenario", "synthetic-2", "--epochs", "2", "--quiet",
                 "--output-dir", str(out), "--wandb", "clbench-test"])
    mp.undo()
    assert code == 0
    (run_dir,) = list((root / "wandb").glob("offline-run-*"))
    (result_file,) = list(out.rglob("*.json"))
    return run_dir, json.loads(result_file.read_text())


def test_offline_run_holds_config_and_global_step_metrics(offline_run):
    run_dir, result = offline_run
    records = read_wandb_records(next(run_dir.glob("run-*.wandb")))
    config = {}
    for r in records:
        if r.WhichOneof("record_type") == "config":
            config.update({item.key: json.loads(item.value_json) for item in r.config.update})
        if r.WhichOneof("record_type") == "run":
            assert r.run.project == "clbench-test"
            assert r.run.display_name == "er-synthetic-2-seed0"
    assert config["strategy"] == "er" and config["scenario"] == "synthetic-2" and config["seed"] == 0
    assert config["strategy_config"]["buffer_size"] == result["strategy_config"]["buffer_size"]
    assert config["run_config"]["epochs"] == 2

    history = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item})
    losses = [(h["trainer/global_step"], h["experience"] if "experience" in h else None, h["train/loss"])
              for h in history if "train/loss" in h]
    steps = [s for s, _, _ in losses]
    # one global step across both experiences: as many logged steps as the run took, strictly increasing
    total_steps = result["edge"]["totals"]["steps"]
    assert len(losses) == total_steps
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    assert max(steps) == total_steps - 1
    # experiences numbered from 1: each fit's start, then each experience's end
    experiences = [h["experience"] for h in history if "experience" in h]
    assert experiences == [1, 1, 2, 2]


def _history(run_dir) -> list[dict]:
    rows = []
    for r in read_wandb_records(next(run_dir.glob("run-*.wandb"))):
        if r.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item})
    return rows


def test_each_experience_is_logged_when_it_ends_in_percent(offline_run):
    run_dir, result = offline_run
    R = result["accuracy_matrix"]
    rows = [h for h in _history(run_dir) if "accuracy/seen_avg" in h]
    assert [h["experience"] for h in rows] == [1, 2]  # 1-based, one row per finished experience
    for i, h in enumerate(rows):
        # the seen part of the matrix row, in %; unseen experiences are not logged
        assert [h.get(f"accuracy/exp_{j + 1}") for j in range(2)] == pytest.approx(
            [100 * R[i][j] if j <= i else None for j in range(2)])
        assert h["accuracy/seen_avg"] == pytest.approx(100 * sum(R[i][: i + 1]) / (i + 1))
        assert h["metrics/final_avg_acc"] == pytest.approx(100 * sum(R[i][: i + 1]) / (i + 1))
        assert h["edge/train_time_s"] == pytest.approx(result["edge"]["per_experience"][i]["train_time_s"])
    # on the run's global step: after the experience's last training step
    assert rows[-1]["trainer/global_step"] == result["edge"]["totals"]["steps"] - 1
    # the summary so far after the last experience is the run's summary
    assert rows[-1]["metrics/avg_incremental_acc"] == pytest.approx(100 * result["metrics"]["avg_incremental_acc"])


def test_experience_metrics_of_a_run_that_stopped_early():
    """What `log_experience` sends after the first of three experiences (unit: no wandb needed)."""
    from clbench.engine.loggers import experience_metrics
    from clbench.reporting.results import RunResult

    r = RunResult("er", "synthetic-3", "mlp", 0, scenario_info={"task_type": "classification", "num_experiences": 3},
                  accuracy_matrix=[[0.9, 0.1, 0.0]])
    m = experience_metrics(r, 0)
    assert m["experience"] == 1
    assert m["accuracy/exp_1"] == pytest.approx(90.0) and "accuracy/exp_2" not in m
    assert m["accuracy/seen_avg"] == pytest.approx(90.0) and m["metrics/final_avg_acc"] == pytest.approx(90.0)
    assert r.metrics == {}  # the summary so far is computed on a copy


def test_matrix_rows_leave_unseen_cells_blank():
    from clbench.engine.loggers import matrix_rows

    assert matrix_rows([[0.5, 0.25], [0.4, 0.8]]) == [[1, 50.0, None], [2, 40.0, 80.0]]


def test_offline_run_holds_tables_and_summary(offline_run):
    run_dir, result = offline_run
    (matrix_file,) = list(run_dir.glob("files/media/table/accuracy_matrix_*.table.json"))
    table = json.loads(matrix_file.read_text())
    assert table["columns"] == ["after_experience", "exp_1", "exp_2"]
    R = result["accuracy_matrix"]
    assert [row[0] for row in table["data"]] == [1, 2]
    # in %, experiences not yet seen blank (not 0.0)
    assert table["data"][0][2] is None
    cells = [c for row in table["data"] for c in row[1:] if c is not None]
    assert cells == pytest.approx([100 * R[0][0], 100 * R[1][0], 100 * R[1][1]])
    (edge_file,) = list(run_dir.glob("files/media/table/edge_per_experience_*.table.json"))
    edge = json.loads(edge_file.read_text())
    k = edge["columns"].index("samples")
    assert [row[k] for row in edge["data"]] == [r["samples"] for r in result["edge"]["per_experience"]]

    summary = {}
    for r in read_wandb_records(next(run_dir.glob("run-*.wandb"))):
        if r.WhichOneof("record_type") == "summary":
            summary.update({item.key: json.loads(item.value_json) for item in r.summary.update})
    assert summary["metrics/final_avg_acc"] == pytest.approx(100 * result["metrics"]["final_avg_acc"])
    assert summary["status"] == "completed"
    assert summary["edge/jetson"] == result["edge"]["totals"]["jetson"]
    assert summary["strategy_report"] == result["strategy_report"]
    k = edge["columns"].index("experience")
    assert [row[k] for row in edge["data"]] == [1, 2]


def test_offline_run_holds_heatmap_and_curve_images(offline_run):
    run_dir, _ = offline_run
    assert list(run_dir.glob("files/media/images/accuracy_heatmap_*.png"))
    assert list(run_dir.glob("files/media/images/accuracy_curve_*.png"))


def test_wandb_flag_without_wandb_installed_is_a_usage_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    code = main(["run", "--strategy", "naive", "--scenario", "synthetic-2", "--epochs", "1", "--quiet",
                 "--output-dir", str(tmp_path), "--wandb"])
    assert code == 2
    err = capsys.readouterr().err
    assert "wandb" in err and "pip install" in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.rglob("*.json"))  # failed before training, nothing stored
