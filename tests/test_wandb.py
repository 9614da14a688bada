"""wandb mirror: an offline run holds the config, per-step metrics on one global step, tables and summary."""

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
    experiences = [h["experience"] for h in history if "experience" in h]
    assert experiences == [0, 1]


def test_offline_run_holds_tables_and_summary(offline_run):
    run_dir, result = offline_run
    (matrix_file,) = list(run_dir.glob("files/media/table/accuracy_matrix_*.table.json"))
    table = json.loads(matrix_file.read_text())
    assert table["columns"] == ["after_experience", "exp_1", "exp_2"]
    assert [row[1:] for row in table["data"]] == result["accuracy_matrix"]
    (edge_file,) = list(run_dir.glob("files/media/table/edge_per_experience_*.table.json"))
    edge = json.loads(edge_file.read_text())
    k = edge["columns"].index("samples")
    assert [row[k] for row in edge["data"]] == [r["samples"] for r in result["edge"]["per_experience"]]

    summary = {}
    for r in read_wandb_records(next(run_dir.glob("run-*.wandb"))):
        if r.WhichOneof("record_type") == "summary":
            summary.update({item.key: json.loads(item.value_json) for item in r.summary.update})
    assert summary["metrics/final_avg_acc"] == pytest.approx(result["metrics"]["final_avg_acc"])
    assert summary["status"] == "completed"


def test_wandb_flag_without_wandb_installed_is_a_usage_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    code = main(["run", "--strategy", "naive", "--scenario", "synthetic-2", "--epochs", "1", "--quiet",
                 "--output-dir", str(tmp_path), "--wandb"])
    assert code == 2
    err = capsys.readouterr().err
    assert "wandb" in err and "pip install" in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.rglob("*.json"))  # failed before training, nothing stored
