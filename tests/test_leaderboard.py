"""Leaderboard: grouping, mean ± std over seeds, best per column, failed runs apart, four formats."""

from __future__ import annotations

import base64
import csv
import io
import json
import shutil
import statistics
from html.parser import HTMLParser
from pathlib import Path

import pytest

from clbench.cli import main
from clbench.reporting import leaderboard as L
from clbench.reporting import render as R
from clbench.metrics import METRICS, summarise
from clbench.reporting.results import RunResult, load, result_path, save

FIXTURE = Path(__file__).parent / "fixtures" / "sweep"


def make_result(strategy="er", scenario="toy-2", seed=0, R=((0.9, 0.0), (0.6, 0.8)), status="completed", **totals):
    r = RunResult(strategy, scenario, "mlp", seed, status=status)
    r.accuracy_matrix = [list(row) for row in R]
    r.scenario_info = {"num_experiences": len(R[0])}
    r.metrics = summarise(r.accuracy_matrix) if status == "completed" else {}
    r.edge = {"per_experience": [{"trainable_params": 100}], "totals": totals}
    return r


# --------------------------------------------------------------------------- hand-computed numbers
def test_mean_and_sample_std_over_seeds():
    # final accuracy = mean of the last row: 0.5, 0.6, 0.7 -> mean 0.6, sample std 0.1
    runs = [make_result(seed=s, R=((1.0, 0.0), (a, a))) for s, a in enumerate([0.5, 0.6, 0.7])]
    lb = L.build(runs)
    (row,) = lb.rows
    cell = row.cells["final_avg_acc"]
    assert row.seeds == [0, 1, 2] and cell.n == 3
    assert cell.mean == pytest.approx(0.6) and cell.std == pytest.approx(0.1)
    assert L.format_cell(L.COLUMN_BY_KEY["final_avg_acc"], cell) == "60.0 ± 10.0"
    # forgetting_max per seed = 1.0 - a -> 0.5, 0.4, 0.3
    assert row.cells["forgetting_max"].mean == pytest.approx(0.4)
    assert L.mean_std([2.0]) == (2.0, None) and L.mean_std([None]) == (None, None)  # one seed: no spread


def test_best_follows_higher_is_better_per_scenario():
    a = make_result("a", R=((1.0, 0.0), (0.9, 0.9)), train_flops_total=300.0)  # acc 0.9, forgetting 0.1
    b = make_result("b", R=((1.0, 0.0), (0.5, 1.0)), train_flops_total=100.0)  # acc 0.75, forgetting 0.5
    c = make_result("c", scenario="other-2", R=((1.0, 0.0), (0.1, 0.1)), train_flops_total=5.0)
    lb = L.build([a, b, c])
    rows = {(r.strategy, r.scenario): r for r in lb.rows}
    assert rows["a", "toy-2"].cells["final_avg_acc"].best and not rows["b", "toy-2"].cells["final_avg_acc"].best
    assert rows["a", "toy-2"].cells["forgetting_max"].best  # lower is better
    assert rows["b", "toy-2"].cells["train_flops_total"].best  # lower is better
    # alone in its scenario: nothing to beat, nothing marked
    assert not any(cell.best for cell in rows["c", "other-2"].cells.values())
    # trainable params tie everywhere: no column of equals gets bold
    assert not rows["a", "toy-2"].cells["trainable_params"].best
    assert [r.strategy for r in lb.rows if r.scenario == "toy-2"] == ["a", "b"]  # sorted by final accuracy
    for col in L.COLUMNS:
        if col.key in METRICS:
            assert col.higher_is_better == METRICS[col.key].higher_is_better


def test_rows_split_by_addons_and_device_and_note_mixed_settings():
    plain = make_result("er", seed=0)
    distill = make_result("er", seed=0)
    distill.aux = [{"name": "distill", "weight": 0.5}]
    gpu = make_result("er", seed=0)
    gpu.device = "NVIDIA H100"
    plain.strategy_config = {"lr": 0.05}
    other_lr = make_result("er", seed=1)
    other_lr.strategy_config = {"lr": 0.5}
    lb = L.build([plain, distill, gpu, other_lr])
    keys = sorted((r.label, r.device, len(r.seeds)) for r in lb.rows)
    assert keys == [("er", "NVIDIA H100", 1), ("er", "cpu", 2), ("er+distill:weight=0.5", "cpu", 1)]
    (mixed,) = [r for r in lb.rows if r.device == "cpu" and not r.addons]
    assert mixed.notes == ["seeds were run with different settings: lr: 0.05 (seed 0) vs 0.5 (seed 1)"]


def test_failed_and_incomplete_runs_are_listed_apart_never_averaged():
    good = make_result("er", seed=0, R=((1.0, 0.0), (0.5, 0.5)))
    failed = make_result("er", seed=1, R=((0.0, 0.0),), status="failed")
    failed.scenario_info = {"num_experiences": 2}
    failed.error = "loss term 'ce' is nan"
    short = make_result("er", seed=2, R=((1.0, 0.0), (0.5, 0.5)))
    short.accuracy_matrix = short.accuracy_matrix[:1]  # completed status but a missing row
    lb = L.build([good, failed, short])
    (row,) = lb.rows
    assert row.seeds == [0] and row.cells["final_avg_acc"].mean == pytest.approx(0.5)
    listed = {f["seed"]: f for f in L.incomplete_rows(lb)}
    assert listed[1]["status"] == "failed" and listed[1]["experiences"] == "1/2"
    assert listed[2]["status"] == "incomplete" and listed[2]["experiences"] == "1/2"
    md = R.to_markdown(lb)
    assert "Failed or incomplete runs (not averaged)" in md and "loss term 'ce' is nan" in md


def test_jetson_columns_keep_measured_and_estimated_apart():
    est = make_result("a", jetson={"time_s": 10.0, "source": "estimated:jetson-orin-nx-16gb:MAXN:cal", "band": 0.33,
                                   "device": "jetson-orin-nx-16gb", "power_mode": "MAXN"})
    meas = make_result("b", jetson={"time_s": 7.0, "source": "measured:jetson-orin-nx-16gb:MAXN",
                                    "device": "jetson-orin-nx-16gb", "power_mode": "MAXN"})
    bad = make_result("c", jetson={"time_s": 1.0, "source": "measured:x", "valid": False})
    assert L.jetson_time(est) == (10.0, "estimated") and L.jetson_time(meas) == (7.0, "measured")
    assert L.jetson_time(bad) == (None, None) and L.jetson_time(make_result()) == (None, None)
    lb = L.build([est, meas, bad])
    rows = {r.strategy: r for r in lb.rows}
    assert rows["a"].cells["jetson_time_estimated_s"].mean == 10.0 and rows["a"].cells["jetson_time_measured_s"].mean is None
    assert rows["b"].cells["jetson_time_measured_s"].mean == 7.0 and rows["b"].cells["jetson_time_estimated_s"].mean is None
    md = R.to_markdown(lb)
    assert "Jetson time (estimated) ↓" in md and "Jetson time (measured) ↓" in md
    assert "±33%" in md and L.MISSING in md
    # the estimate shows its band, 10 s with e = 0.33: [10/1.33, 10*1.33] = [7.52, 13.30]
    assert "| 10.00 s [7.52, 13.30] |" in md and "| 7.00 s |" in md


# --------------------------------------------------------------------------- the fixture sweep
def fixture_runs():
    return {p: load(p) for p in sorted(FIXTURE.rglob("*.json"))}


def test_fixture_rows_match_the_stored_results():
    runs = fixture_runs()
    assert runs, "tests/fixtures/sweep is empty: run scripts/make_results_fixture.py"
    lb = L.from_dir(FIXTURE)
    for row in lb.rows:
        same = [r for r in runs.values() if (r.strategy, r.scenario) == (row.strategy, row.scenario) and L.is_complete(r)]
        accs = [r.metrics["final_avg_acc"] for r in same]
        assert row.seeds == sorted(r.seed for r in same)
        assert row.cells["final_avg_acc"].mean == pytest.approx(statistics.mean(accs))
        if len(accs) > 1:
            assert row.cells["final_avg_acc"].std == pytest.approx(statistics.stdev(accs))
        else:
            assert row.cells["final_avg_acc"].std is None
        flops = [r.edge["totals"].get("train_flops_total") for r in same]
        if all(f is not None for f in flops):
            assert row.cells["train_flops_total"].mean == pytest.approx(statistics.mean(flops))
    for scenario in lb.scenarios():
        rows = [r for r in lb.rows if r.scenario == scenario and r.reference is None]  # joint bounds, not competes
        if len(rows) > 1:
            top = max(r.cells["final_avg_acc"].mean for r in rows)
            assert all(r.cells["final_avg_acc"].best == (r.cells["final_avg_acc"].mean == top) for r in rows)
        assert not any(r.cells["final_avg_acc"].best for r in lb.rows if r.scenario == scenario and r.reference)
    failed = [r for r in runs.values() if r.status == "failed"]
    assert failed and len(lb.incomplete) == len(failed)
    assert not any(r.strategy == failed[0].strategy and r.scenario == failed[0].scenario for r in lb.rows)


def test_cli_markdown_and_scenario_filter(capsys):
    assert main(["leaderboard", str(FIXTURE), "--scenario", "synthetic-5"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("Generated ") and "`clbench leaderboard" in lines[0]
    # one scenario under its heading; backbone and device shared: said once above the table
    assert lines[2] == "## synthetic-5 (classification)"
    assert lines[4] == "Backbone: clbench_mlp_tiny · Device: cpu"
    assert "synthetic-2" not in out
    header = lines[6]
    assert header.startswith("| Strategy | Seeds |") and "Final acc (%) ↑" in header and "Forgetting (%) ↓" in header
    body = [line for line in lines[8:] if line.startswith("| ") and not line.startswith("| Strategy")]
    assert len(body) == len(L.from_dir(FIXTURE, "synthetic-5").rows)
    assert main(["leaderboard", str(FIXTURE)]) == 0
    out = capsys.readouterr().out  # two scenarios: two tables, sorted, never a Scenario column
    assert out.index("## synthetic-2 (classification)") < out.index("## synthetic-5 (classification)")
    assert "| Scenario |" not in out
    assert main(["leaderboard", str(FIXTURE), "--scenario", "nope-3"]) == 2
    err = capsys.readouterr().err
    assert "nope-3" in err and "synthetic-5" in err and len(err.strip().splitlines()) == 1


def test_newer_schema_and_foreign_files_are_skipped_with_a_warning(tmp_path, capsys):
    root = tmp_path / "results"
    shutil.copytree(FIXTURE, root)
    one = next(root.rglob("*.json"))
    newer = json.loads(one.read_text())
    newer["schema_version"] = 99
    (one.parent / "from-the-future.json").write_text(json.dumps(newer))
    (root / "notes.json").write_text('{"hello": 1}')
    (root / "broken.json").write_text("{")
    assert main(["leaderboard", str(root), "--format", "json"]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    skipped = {Path(s["file"]).name for s in data["skipped"]}
    assert skipped == {"from-the-future.json", "notes.json", "broken.json"}
    assert captured.err.count("warning: skipped") == 3 and "schema_version 99" in captured.err
    assert len(data["rows"]) == len(L.from_dir(FIXTURE).rows)  # the future file is not counted twice


def test_missing_or_empty_results_dir_is_a_usage_error(tmp_path, capsys):
    assert main(["leaderboard", str(tmp_path / "absent")]) == 2
    assert main(["leaderboard", str(tmp_path)]) == 2
    assert "no clbench results" in capsys.readouterr().err


def test_csv_and_json_round_trip(tmp_path):
    lb = L.from_dir(FIXTURE)
    out = tmp_path / "lb.csv"
    assert main(["leaderboard", str(FIXTURE), "--format", "csv", "--out", str(out)]) == 0
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == len(lb.rows) and len(rows) - len(ok) == len(lb.incomplete)
    for r, row in zip(ok, lb.rows):
        assert (r["strategy"], r["scenario"]) == (row.strategy, row.scenario)
        assert float(r["final_avg_acc_mean"]) == row.cells["final_avg_acc"].mean  # repr round-trips exactly
        assert r["final_avg_acc_best"] == str(int(row.cells["final_avg_acc"].best))
    data = json.loads(L.to_json(lb))
    meta = {c["key"]: c for c in data["columns"]}
    assert meta["bwt"]["higher_is_better"] is True and meta["peak_memory_bytes"]["higher_is_better"] is False
    assert data["rows"][0]["values"]["final_avg_acc"]["mean"] == lb.rows[0].cells["final_avg_acc"].mean


# --------------------------------------------------------------------------- HTML structure
class PageParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tables: dict[str, dict] = {}
        self._table = None
        self.images: list[str] = []
        self.external: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._table = self.tables.setdefault(a.get("id"), {"th": 0, "rows": [], "classes": a.get("class", "")})
        elif tag == "th" and self._table is not None:
            self._table["th"] += 1
        elif tag == "tr" and self._table is not None:
            self._table["rows"].append([])
        elif tag == "td" and self._table is not None:
            self._table["rows"][-1].append(a)
        elif tag == "img":
            self.images.append(a.get("src", ""))
        elif tag == "script":
            self.scripts += 1
            if "src" in a:
                self.external.append(a["src"])
        elif tag == "link":
            self.external.append(a.get("href", ""))

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None


def test_html_is_one_self_contained_sortable_page(tmp_path):
    out = tmp_path / "lb.html"
    assert main(["leaderboard", str(FIXTURE), "--format", "html", "--out", str(out)]) == 0
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    p = PageParser()
    p.feed(page)
    lb = L.from_dir(FIXTURE)
    best_cells = 0
    for t in L.tables(lb):  # one table per scenario, with only its own columns
        table = p.tables[f"leaderboard-{t.scenario}"]
        body = [r for r in table["rows"] if r]  # header row has no td
        assert "sortable" in table["classes"] and len(body) == len(t.rows)
        assert table["th"] == 2 + len(t.columns)  # strategy, seeds (backbone and device are shared)
        for tr in body:
            for td in tr:
                if "data-value" in td and td["data-value"]:
                    float(td["data-value"])  # every sort key is a number
        best_cells += sum(td.get("class") == "best" for tr in body for td in tr)
    shown = {c.key for c in L.shown_columns(lb)}
    assert best_cells == sum(r.cells[k].best for r in lb.rows for k in shown) > 0
    incomplete = [t for k, t in p.tables.items() if k.startswith("incomplete-")]
    assert sum(len(t["rows"]) - 1 for t in incomplete) == len(lb.incomplete)
    assert p.scripts == 1 and not p.external and "http" not in page.replace("http-equiv", "")
    assert len(p.images) >= len(lb.scenarios())
    for src in p.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"


def test_results_written_by_the_runner_are_found_under_their_result_path(tmp_path):
    r = make_result("er", scenario="toy-2", seed=3)
    save(r, tmp_path)
    assert result_path(tmp_path, r).is_file()
    (row,) = L.from_dir(tmp_path).rows
    assert (row.strategy, row.seeds) == ("er", [3])


def test_quantized_columns_read_the_last_quantize_record():
    def with_quantize(seed, acc, size, mode="ptq"):
        r = make_result("er", seed=seed)
        r.aux = [{"name": "quantize", "preset": "W4A8"}]
        early = {"experience": 0, "mode": mode, "avg_acc": 0.99, "delta_acc": 0.0, "size_bytes": 1}
        last = {"experience": 1, "mode": mode, "size_bytes": size}
        if mode == "ptq":
            last.update(avg_acc=acc, delta_acc=r.metrics["final_avg_acc"] - acc)
        r.aux_results = {"quantize": [early, last]}
        return r

    # the plain run's final accuracy is 0.7 (last row 0.6, 0.8)
    runs = [with_quantize(0, 0.6, 2048), with_quantize(1, 0.5, 2048), make_result("er"),
            with_quantize(0, None, 1024, mode="qat")]
    runs[3].aux = [{"name": "quantize", "mode": "qat"}]
    lb = L.build(runs)
    rows = {r.addons: r for r in lb.rows}
    ptq, plain, qat = rows["quantize:preset=W4A8"], rows[""], rows["quantize:mode=qat"]
    assert ptq.cells["quantized_acc"].mean == pytest.approx(0.55) and ptq.cells["quantized_acc"].std == pytest.approx(0.0707, abs=1e-4)
    assert ptq.cells["quantized_delta_acc"].mean == pytest.approx(0.15)
    assert ptq.cells["quantized_size_bytes"].mean == 2048
    assert qat.cells["quantized_acc"].mean == pytest.approx(0.7)  # its own accuracy matrix: it trained quantized
    assert qat.cells["quantized_delta_acc"].mean is None and qat.cells["quantized_size_bytes"].best
    assert all(plain.cells[k].mean is None for k in ("quantized_acc", "quantized_delta_acc", "quantized_size_bytes"))
    md = R.to_markdown(lb)
    assert "Quantized acc (%) ↑" in md and "Acc lost to quantization (pp) ↓" in md and "Quantized size (KiB) ↓" in md
    assert "| 55.0 ± 7.1 |" in md and "| **1.0** |" in md  # 1024 bytes, the smallest
    assert "Quantized acc" not in R.to_markdown(L.build([make_result("er")]))  # no quantize run, no column


def test_each_add_on_setting_gets_its_own_result_file(tmp_path):
    def path(*aux):
        r = make_result("er", scenario="digits-5")
        r.aux = list(aux)
        return result_path(tmp_path, r).relative_to(tmp_path).parent.as_posix()

    assert path() == "digits-5/er"
    assert path({"name": "logit_kd"}) == "digits-5/er+logit_kd"  # no settings: the name alone, as before
    w4, w2 = path({"name": "quantize", "preset": "W4A4"}), path({"name": "quantize", "preset": "W2A4", "distill_steps": 100})
    assert w4 == "digits-5/er+quantize-preset-w4a4" and w2 == "digits-5/er+quantize-preset-w2a4-distill_steps-100"
    both = path({"name": "logit_kd", "temperature": 4}, {"name": "quantize", "bits": 8})
    assert both == "digits-5/er+logit_kd-temperature-4+quantize-bits-8"
    long = path({"name": "quantize", **{f"setting_{i}": "x" * 10 for i in range(8)}})
    assert len(long.split("/")[-1]) == len("er+quantize-") + 12  # a hash past 60 characters of settings


def test_joint_is_a_reference_row_listed_last_and_never_best():
    joint = make_result("joint", R=((1.0, 0.0), (0.99, 0.99)))
    er = make_result("er", R=((1.0, 0.0), (0.80, 0.90)))
    naive = make_result("naive", R=((1.0, 0.0), (0.0, 1.0)))
    board = L.build([joint, er, naive])
    assert [row.strategy for row in board.rows] == ["er", "naive", "joint"]
    by_name = {row.strategy: row for row in board.rows}
    assert by_name["er"].cells["final_avg_acc"].best and not by_name["joint"].cells["final_avg_acc"].best
    md = R.to_markdown(board)
    assert "| joint (reference) |" in md
    assert "joint (reference): upper bound: retrains on all data seen so far; listed last and never marked best." in md
