"""What `clbench run` and `clbench sweep` print while they work (clbench.engine.progress, the sweep's lines)."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest

from clbench.cli import main
from clbench.engine.progress import ProgressBar, format_duration, summary_so_far
from clbench.reporting.results import RunResult

TINY = ["--scenario", "synthetic-2", "--accelerator", "cpu", "--epochs", "2", "--set", "limit_train_batches=2"]
T = r"[0-9.]+ (s|min [0-9]+ s)"  # a duration


def _match(lines: list[str], patterns: list[str]) -> None:
    assert len(lines) == len(patterns), "\n".join(lines)
    for line, pattern in zip(lines, patterns):
        assert re.fullmatch(pattern, line), f"{line!r} does not match {pattern!r}"


def test_piped_run_prints_setup_then_a_plain_line_per_epoch_and_per_experience(tmp_path, capsys):
    code = main(["run", "--strategy", "naive", *TINY, "--output-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert "\r" not in out and "0it" not in out  # not a terminal: nothing redrawn
    progress = out.split("\n\n")[0].splitlines()  # the final table follows a blank line
    _match(progress, [
        r"clbench run: naive on synthetic-2, seed 0: loading libraries \.\.\.",
        r"naive on synthetic-2, seed 0: loading the scenario's data and building the model \.\.\.",
        rf"ready in {T}: 2 experiences, model of [0-9.]+[kMG]? parameters",
        rf"exp 1/2 train epoch 1/2: 2 batches in {T}, loss [0-9.]+",
        rf"exp 1/2 train epoch 2/2: 2 batches in {T}, loss [0-9.]+",
        rf"exp 1/2 done in {T} \| accuracy \(%\) on exp 1\.\.1: [0-9.]+ \| Final acc so far [0-9.]+% \| run ETA {T}",
        rf"exp 2/2 train epoch 1/2: 2 batches in {T}, loss [0-9.]+",
        rf"exp 2/2 train epoch 2/2: 2 batches in {T}, loss [0-9.]+",
        rf"exp 2/2 done in {T} \| accuracy \(%\) on exp 1\.\.2: [0-9.]+ [0-9.]+ \| Final acc [0-9.]+% \| run took {T}",
    ])
    assert "naive on synthetic-2 (backbone clbench_mlp_tiny, seed 0): completed" in out


def test_quiet_run_prints_nothing(tmp_path, capsys):
    assert main(["run", "--strategy", "naive", *TINY, "--quiet", "--output-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out == ""


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _run_with(strategy: str, stream, tmp_path):
    from dataclasses import replace

    from clbench.config import RunConfig
    from clbench.engine.runner import RunSpec, run

    spec = RunSpec(strategy, "synthetic-2", run=replace(RunConfig(), epochs=2, limit_train_batches=2, accelerator="cpu",
                                                          output_dir=str(tmp_path)))
    bar = ProgressBar(spec, file=stream)
    try:
        result = run(spec, callbacks=[bar], on_experience=bar.on_experience)
    finally:
        bar.close()
    assert result.status == "completed"
    return stream.getvalue()


def test_terminal_gets_one_bar_per_phase_named_with_experience_phase_and_epoch(tmp_path):
    text = _run_with("ewc", FakeTerminal(), tmp_path)
    assert "0it" not in text  # every bar is created with its total
    frames = [f for f in re.split(r"[\r\n]", text) if f.strip()]
    bars = [f for f in frames if "batch" in f and "|" in f and "done" not in f]
    # EWC: a train phase (2 epochs x 2 batches) then a fisher phase (1 epoch), each its own bar
    for exp in (1, 2):
        assert any(f.startswith(f"exp {exp}/2 train epoch 1/2:") and "/4 " in f for f in bars), bars
        assert any(f.startswith(f"exp {exp}/2 train epoch 2/2:") and "2/4 " in f for f in bars), bars
        assert any(f.startswith(f"exp {exp}/2 fisher epoch 1/1:") for f in bars), bars
    assert not any("fisher epoch 2" in f for f in bars)
    # the experience lines stay, plain; no per-epoch lines on a terminal (the bar shows the epoch)
    assert sum(1 for f in frames if re.fullmatch(r"exp 1/2 done in .* \| run ETA .*", f)) == 1
    assert sum(1 for f in frames if re.fullmatch(r"exp 2/2 done in .* \| run took .*", f)) == 1
    assert " batches in " not in text


def test_piped_ewc_names_its_fisher_phase(tmp_path):
    text = _run_with("ewc", io.StringIO(), tmp_path)
    phases = re.findall(r"^exp (\d)/2 (\w+) epoch (\d)/(\d):", text, flags=re.M)
    assert phases == [("1", "train", "1", "2"), ("1", "train", "2", "2"), ("1", "fisher", "1", "1"),
                      ("2", "train", "1", "2"), ("2", "train", "2", "2"), ("2", "fisher", "1", "1")]


def test_run_eta_is_time_per_experience_times_experiences_left():
    bar = ProgressBar(SimpleNamespace(), file=io.StringIO(), tty=False)
    assert bar.run_eta() is None  # nothing finished: no estimate
    bar.first_experience, bar.num_experiences, bar.finished = 0, 5, [10.0, 20.0]
    bar.experience_index, bar.experience_started = 1, 0.0
    assert bar.run_eta(now=100.0) == pytest.approx(45.0)  # 15 s each, 3 left
    bar.experience_index, bar.experience_started = 2, 100.0  # 5 s into the third
    assert bar.run_eta(now=105.0) == pytest.approx(40.0)
    # resumed at experience 3 of 5: only this process's experiences count
    bar.first_experience, bar.finished, bar.experience_index = 2, [12.0], 2
    assert bar.run_eta(now=0.0) == pytest.approx(24.0)


def test_format_count():
    from clbench.engine.progress import format_count

    assert format_count(850) == "850" and format_count(12345) == "12.3k" and format_count(11_689_512) == "11.7M"


def test_format_duration():
    assert format_duration(3.21) == "3.2 s" and format_duration(42.4) == "42 s"
    assert format_duration(125) == "2 min 05 s" and format_duration(3 * 3600 + 60) == "3 h 01 min"


def test_summary_so_far_asks_the_task_and_leaves_the_result_alone():
    r = RunResult("er", "synthetic-3", "mlp", 0, scenario_info={"task_type": "classification"},
                  accuracy_matrix=[[0.8, 0.0, 0.0], [0.6, 0.9, 0.0]], initial_accuracy=[0.1, 0.1, 0.1])
    summary = summary_so_far(r)
    column, value = summary[0]
    assert column.key == "final_avg_acc" and value == pytest.approx(75.0) and column.unit == "%"
    assert r.metrics == {}
    assert summary_so_far(RunResult("er", "synthetic-3", "mlp", 0)) == []  # nothing recorded yet


def test_sweep_prints_a_header_each_start_and_a_grid_eta(monkeypatch):
    from clbench.engine import sweep as S

    calls = []

    def fake_run_job(spec, threads=None, verbose=False):
        calls.append(spec.strategy)
        return {"status": "completed", "error": None, "seconds": 1.0, "final_avg_acc": 0.5,
                "headline": "Final acc 50.0%"}

    monkeypatch.setattr(S, "_run_job", fake_run_job)
    jobs = [S.Job(SimpleNamespace(strategy=s, scenario="synthetic-2", seed=0, aux=[])) for s in ("naive", "er")]
    out = io.StringIO()
    counts = S.sweep(jobs, in_process=True, out=out)
    assert counts["completed"] == 2 and calls == ["naive", "er"]
    _match(out.getvalue().splitlines(), [
        r"sweep: 2 runs in the grid, 2 to run, 0 stored; one at a time in this process",
        r"start \[1/2\] naive on synthetic-2 seed 0",
        rf"\[1/2\] naive on synthetic-2 seed 0: completed in 1\.0 s; Final acc 50\.0%; sweep ETA {T}",
        r"start \[2/2\] er on synthetic-2 seed 0",
        r"\[2/2\] er on synthetic-2 seed 0: completed in 1\.0 s; Final acc 50\.0%",
        rf"sweep: 2 completed, 0 failed, 0 errors, 0 skipped \(already stored\) in {T}",
    ])


BANNER = ("GPU available", "TPU available", "Tip:")


def test_sweep_dry_run_prints_no_lightning_banner(tmp_path):
    """As a user sees it: a fresh process, stdout and stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "clbench.cli", "sweep", "--strategies", "naive", "--scenarios",
                           "synthetic-2", "--dry-run", "--output-dir", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["run   naive on synthetic-2 seed 0"]
    assert not any(b in proc.stdout + proc.stderr for b in BANNER), proc.stderr


def test_verbose_keeps_lightnings_messages(tmp_path, monkeypatch, caplog):
    # the test session silenced Lightning once (conftest): start from Lightning's own levels
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning"):
        monkeypatch.setattr(logging.getLogger(name), "level", logging.INFO)
    argv = ["sweep", "--strategies", "naive", "--scenarios", "synthetic-2", "--dry-run", "--output-dir", str(tmp_path)]
    with caplog.at_level(logging.INFO):
        assert main([*argv, "--verbose"]) == 0
        assert any("GPU available" in r.getMessage() for r in caplog.records)
        caplog.clear()
        assert main(argv) == 0
        assert not any(b in r.getMessage() for r in caplog.records for b in BANNER)
