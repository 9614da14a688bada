"""Leaderboard pages on a mixed results folder (classification, detection, forecasting, a failed run): one table
per scenario, human units, std and Jetson bands, provenance, differing settings; every expected string by hand."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import shutil
import struct
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import pytest

from clbench._version import __version__
from clbench.cli import main
from clbench.reporting import leaderboard as L
from clbench.reporting import render as R
from clbench.reporting.results import RunResult, load, save

LEGACY = Path(__file__).parent / "fixtures" / "legacy"
NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def variant(r: RunResult, strategy: str, seed: int = 0, **changes) -> RunResult:
    out = RunResult.from_dict(json.loads(json.dumps(r.to_dict())))
    out.strategy, out.seed = strategy, seed
    for key, value in changes.items():
        target, _, field = key.partition("__")
        if target == "totals":
            out.edge["totals"][field] = value
        elif target == "metrics":
            out.metrics[field] = value
        elif target == "run":
            out.run_config[field] = value
        elif target == "strategy":
            out.strategy_config[field] = value
    return out


@pytest.fixture
def mixed(tmp_path) -> Path:
    """The three legacy results (one per task) plus, on digits-5, naive at 5 epochs (seed 0 at lr 0.05, seed 1
    at lr 0.1), a failed ewc run, and on shapes-2+2 an erd row that took 400 s."""
    root = tmp_path / "results"
    shutil.copytree(LEGACY, root)
    er = load(next((root / "digits-5").rglob("*.json")))
    jetson = {"time_s": 3.0, "band": 0.5, "source": "estimated:jetson-orin-nx-16gb:MAXN:cal",
              "device": "jetson-orin-nx-16gb", "power_mode": "MAXN"}  # no stored low/high: [3/1.5, 3*1.5]
    for seed, acc, seconds, lr in ((0, 0.30, 90.0, 0.05), (1, 0.40, 92.0, 0.1)):
        save(variant(er, "naive", seed, metrics__final_avg_acc=acc, run__epochs=5, strategy__lr=lr,
                     totals__train_flops_total=2.72e9, totals__train_time_s=seconds, totals__jetson=dict(jetson)), root)
    failed = variant(er, "ewc", status="failed")
    failed.status, failed.error, failed.metrics = "failed", "loss term 'ce' is nan\nat experience 2", {}
    failed.accuracy_matrix = failed.accuracy_matrix[:1]
    save(failed, root)
    gfl = load(next((root / "shapes-2+2").rglob("*.json")))
    save(variant(gfl, "erd", totals__train_time_s=400.0), root)
    return root


def md_table(md: str, scenario: str) -> list[str]:
    """The lines of one scenario's section, up to the next heading."""
    lines = md.splitlines()
    start = lines.index(next(line for line in lines if line.startswith(f"## {scenario} (")))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ") or lines[i].startswith("- ")
                and "higher is better" in lines[i]), len(lines))
    return lines[start:end]


# --------------------------------------------------------------------------- one table per scenario
def test_markdown_has_one_table_per_scenario_with_its_own_columns_and_human_units(mixed):
    lb = L.from_dir(mixed)
    md = R.to_markdown(lb)
    headings = [line for line in md.splitlines() if line.startswith("## ")]
    assert headings == ["## co2-4 (forecasting)", "## digits-5 (classification)", "## shapes-2+2 (detection)"]

    co2 = md_table(md, "co2-4")
    assert co2[2] == "Backbone: stella_like_mlp · Device: cpu"
    # forecasting: no accuracy or AP columns; 70506496 FLOP, 98304 B = 96 KiB, 10.2668 s, Jetson 1.859 s
    # estimated with its stored band [1.399, 2.471]; 9860 parameters
    assert co2[4] == ("| Strategy | Seeds | Final MSE ↓ | Forgetting (MSE) ↓ | Train FLOPs ↓ | Peak mem ↓ | Wall time ↓ | "
                      "Jetson time (estimated) ↓ | Trainable params ↓ |")
    assert co2[6] == "| stella_mlp | 1 | 0.7708 | -0.3539 | 70.51 MFLOP | 96.0 KiB | 10.27 s | 1.86 s [1.40, 2.47] | 9,860 |"

    digits = md_table(md, "digits-5")
    head = digits[4]
    assert head.startswith("| Strategy | Seeds | Final acc (%) ↑ |") and "Final MSE" not in head and "AP" not in head
    # rows best-first by final accuracy: naive (30% and 40%: mean 35.0, sample std 7.07) before er (16.1%)
    assert digits[6].startswith("| naive † | 2 | **35.0 ± 7.1** |") and digits[7].startswith("| er | 1 | 16.1 |")
    # FLOPs in GFLOP (the typical value, 1.36e9, is a GFLOP): 2.72e9 on both seeds: no "± 0"; the lower
    # median of (13.40 s, 91 s) is seconds: 90 and 92 s are 91.00 ± 1.41 s; the Jetson estimate shows its band
    # [3/1.5, 3*1.5] instead of "± 0.00"
    assert "| **1.36 GFLOP** |" in digits[7] and "| 2.72 GFLOP |" in digits[6]
    assert "| **13.40 s** |" in digits[7] and "| 91.00 ± 1.41 s |" in digits[6]
    assert "| **1.49 s [1.12, 1.98]** |" in digits[7] and "| 3.00 s [2.00, 4.50] |" in digits[6]
    assert "±" not in digits[7] and "±" not in co2[6]  # a single seed: no std at all (it was "± 0.0")
    # the settings that differ between rows (values in row order), then which setting the dagger is about
    assert "Settings that differ between rows: epochs: 5 (naive) vs 1 (er)." in digits
    assert "- † naive: seeds were run with different settings: lr: 0.05 (seed 0) vs 0.1 (seed 1)" in digits
    # the failed run sits under its own scenario, first line of its error only
    assert "| ewc | 0 | failed | 1/5 | loss term 'ce' is nan |" in digits

    shapes = md_table(md, "shapes-2+2")
    # times in minutes: the lower median of (189.49 s, 400 s) is past a minute: 3.16 and 6.67 min;
    # 55341056 B = 52.78 MiB; 108324615168 FLOP = 108.32 GFLOP
    # (erd and gfl_finetune tie on final AP: by name)
    assert shapes[6].startswith("| erd | 1 |") and shapes[7].startswith("| gfl_finetune | 1 |")
    assert "| 6.67 min |" in shapes[6] and "| **3.16 min** |" in shapes[7]
    assert "| 52.8 MiB |" in shapes[6] and "| 108.32 GFLOP |" in shapes[6]
    assert not any("Settings that differ" in line for line in shapes)

    legend = md[md.index("- Mean ± sample std"):]
    assert "(no ± for a single seed)" in legend
    assert "- Wall time: training time only, on the row's device" in legend and "evaluation" in legend
    assert "- Jetson time (estimated): the training time a calibrated roofline model predicts" in legend


def test_scenario_filter_still_gives_one_table(mixed, capsys):
    assert main(["leaderboard", str(mixed), "--scenario", "shapes-2+2"]) == 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith("## ")] == ["## shapes-2+2 (detection)"]
    assert "digits-5" not in out and "co2-4" not in out


def test_single_seed_std_is_empty_in_csv_and_null_in_json_and_rows_say_scenario_and_task(mixed, capsys):
    assert main(["leaderboard", str(mixed), "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    by = {(r["strategy"], r["status"]): r for r in rows}
    assert [(r["strategy"], r["scenario"], r["task"]) for r in rows] == [
        ("stella_mlp", "co2-4", "forecasting"), ("naive", "digits-5", "classification"),
        ("er", "digits-5", "classification"), ("erd", "shapes-2+2", "detection"),
        ("gfl_finetune", "shapes-2+2", "detection"), ("ewc", "digits-5", "classification")]
    assert by["er", "ok"]["final_avg_acc_std"] == "" and by["er", "ok"]["final_avg_acc_mean"] == "0.16144578313253014"
    assert float(by["naive", "ok"]["train_time_s_std"]) == pytest.approx(2 ** 0.5)
    assert by["ewc", "failed"]["notes"] == "1/5 experiences; loss term 'ce' is nan"

    assert main(["leaderboard", str(mixed), "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    rows = {r["strategy"]: r for r in data["rows"]}
    assert rows["er"]["values"]["final_avg_acc"]["std"] is None and rows["er"]["task"] == "classification"
    assert rows["gfl_finetune"]["scenario"] == "shapes-2+2" and rows["gfl_finetune"]["task"] == "detection"
    assert rows["naive"]["values"]["jetson_time_estimated_s"] == {"mean": 3.0, "std": 0.0, "n": 2, "best": False,
                                                                  "low": 2.0, "high": 4.5}
    assert data["incomplete"][0]["task"] == "classification" and data["incomplete"][0]["status"] == "failed"
    scenarios = {s["scenario"]: s for s in data["scenarios"]}
    assert scenarios["digits-5"]["differing_settings"] == ["epochs: 5 (naive) vs 1 (er)"]
    assert scenarios["digits-5"]["units"] == {"train_flops_total": "GFLOP", "peak_memory_bytes": "KiB",
                                              "train_time_s": "s", "jetson_time_estimated_s": "s"}
    assert scenarios["shapes-2+2"]["units"]["train_time_s"] == "min" and scenarios["co2-4"]["task"] == "forecasting"
    assert "final_avg_acc" not in scenarios["co2-4"]["columns"] and "final_mse" in scenarios["co2-4"]["columns"]


# --------------------------------------------------------------------------- provenance
def test_provenance_outside_git_is_said_and_git_failure_is_soft(tmp_path, monkeypatch):
    folder = tmp_path / "plain"
    folder.mkdir()
    monkeypatch.chdir(folder)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # tmp_path may sit inside a checkout
    p = L.provenance(folder, "clbench leaderboard plain", now=NOW)
    assert p == {"clbench_version": __version__, "generated": "2025-01-02T03:04:05Z",
                 "command": "clbench leaderboard plain", "git_commit": None, "git_checkout": None, "git_dirty": None}
    assert L.provenance_text(p) == (f"Generated 2025-01-02T03:04:05Z by clbench {__version__} with "
                                    f"`clbench leaderboard plain`; not in a git checkout.")

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)  # git not installed: still a page
    assert L.provenance(folder, "x", now=NOW)["git_commit"] is None


def test_provenance_names_the_commit_of_the_results_checkout(mixed, tmp_path, monkeypatch, capsys):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    git = ["git", "-C", str(mixed), "-c", "user.name=t", "-c", "user.email=t@example.org"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "results"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    monkeypatch.chdir(tmp_path)
    assert main(["leaderboard", str(mixed), "--format", "json"]) == 0
    p = json.loads(capsys.readouterr().out)["provenance"]
    assert p["git_commit"] == head and Path(p["git_checkout"]).resolve() == mixed.resolve()
    assert p["git_dirty"] is False and p["clbench_version"] == __version__
    assert p["command"] == f"clbench leaderboard {mixed} --format json"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", p["generated"])
    out = tmp_path / "page.md"
    assert main(["leaderboard", str(mixed), "--out", str(out)]) == 0
    first = out.read_text().splitlines()[0]
    assert first == (f"Generated {first.split()[1]} by clbench {__version__} with `clbench leaderboard {mixed} "
                     f"--format md --out {out}`; git commit {head} of {p['git_checkout']}.")


# --------------------------------------------------------------------------- HTML
def test_html_has_a_scrolling_table_per_scenario_readable_figures_and_provenance(mixed, tmp_path):
    out = tmp_path / "lb.html"
    assert main(["leaderboard", str(mixed), "--format", "html", "--out", str(out)]) == 0
    page = out.read_text()
    assert ".table-scroll { overflow-x: auto;" in page
    for scenario in ("co2-4", "digits-5", "shapes-2+2"):
        assert f'<div class="table-scroll"><table id="leaderboard-{scenario.replace("+", "-")}"' in page
    assert page.index('id="scenario-co2-4"') < page.index('id="scenario-digits-5"') < page.index('id="scenario-shapes-2-2"')
    assert '<p class="provenance">Generated ' in page and f"<code>clbench leaderboard {mixed} --format html" in page
    assert '<td data-value="3.0">3.00 s [2.00, 4.50]</td>' in page and '<td data-value="91.0">91.00 ± 1.41 s</td>' in page
    assert "Settings that differ between rows: epochs: 5 (naive) vs 1 (er)." in page
    assert '<table id="incomplete-digits-5"' in page
    images = re.findall(r'<img alt="[^"]*" width="(\d+)" src="data:image/png;base64,([^"]+)"', page)
    assert images
    for width, b64 in images:
        png = base64.b64decode(b64)
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        pixels = struct.unpack(">I", png[16:20])[0]
        # 150 dpi shown at 120 CSS px per inch: sharp, and at least 600 px wide on the page
        assert int(width) >= 600 and abs(pixels - int(width) * 150 / 120) <= 2
