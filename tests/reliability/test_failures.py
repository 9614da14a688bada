"""Failures: diverging losses, Ctrl-C, atomic and concurrent result writing."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from clbench.base import CLStrategy
from clbench.cli import main
from clbench.registry import STRATEGIES, register_strategy
from clbench.reporting.results import load, write_json_atomic


@pytest.fixture
def diverging_strategy():
    STRATEGIES.names() and STRATEGIES._load()

    @register_strategy("diverges_in_second_experience")
    class Diverges(CLStrategy):
        """Test double: its loss becomes NaN at the third step of experience 1."""

        def step_losses(self, batch):
            losses = super().step_losses(batch)
            if self.experience.index == 1 and self.trainer.global_step == 2:
                losses["ce"] = losses["ce"] * float("nan")
            return losses

    yield "diverges_in_second_experience"
    STRATEGIES._entries.pop("diverges_in_second_experience")


def _results(out: Path) -> list[Path]:
    return [p for p in out.rglob("*.json") if ".resume" not in p.parts]


def test_nan_loss_stops_the_run_with_a_failed_result(tmp_path, capsys, diverging_strategy):
    code = main(["run", "--strategy", diverging_strategy, "--scenario", "synthetic-5", "--epochs", "1", "--quiet",
                 "--output-dir", str(tmp_path)])
    assert code == 1
    err = capsys.readouterr().err
    assert "'ce' is nan at experience 1, step 2" in err
    (path,) = _results(tmp_path)
    result = json.loads(path.read_text())
    assert result["status"] == "failed"
    assert len(result["accuracy_matrix"]) == 1, "the rows completed before the failure are kept"
    assert result["metrics"] == {}, "no summary metrics for an incomplete run"
    assert "experience 1" in result["error"]


def test_an_unexpected_crash_writes_no_result(tmp_path):
    from clbench.config import RunConfig
    from clbench.engine.runner import RunSpec, run

    def crash(i, result, strategy_):
        if i == 1:
            raise RuntimeError("boom")

    cfg = RunConfig(epochs=1, progress=False, output_dir=str(tmp_path), limit_train_batches=2)
    with pytest.raises(RuntimeError, match="boom"):
        run(RunSpec("naive", "synthetic-5", run=cfg, seed=0), on_experience=crash)
    assert _results(tmp_path) == []


# A child that stalls inside a training step of experience 2 so SIGINT arrives during trainer.fit.
CHILD = textwrap.dedent(
    """
    import faulthandler, signal, sys, time
    from clbench.base import CLStrategy
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test asks for stacks if it hangs
    step = CLStrategy.training_step
    def slow_step(self, batch, batch_idx):
        if self.experience.index == 2:
            print("in-experience-2", flush=True)
            # short sleeps: a signal the kernel hands to another thread (torch's) is only acted on
            # when the main thread next runs Python code, which one long sleep would put off
            for _ in range(6000):
                time.sleep(0.1)
        return step(self, batch, batch_idx)
    CLStrategy.training_step = slow_step
    from clbench.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def _signals_as_in_a_terminal():
    """Runs in the child before exec: a child inherits its parent's blocked-signal mask and ignored
    signals, and Python keeps an inherited ignored SIGINT ignored instead of raising
    KeyboardInterrupt. In full-suite runs a mask left set in pytest's main thread blocked SIGINT
    and SIGUSR1 (once, under pytest-xdist, the child ignored both for another reason not found),
    so the child starts as from a terminal: nothing blocked, SIGINT at its default."""
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
def test_ctrl_c_during_fit_leaves_resumable_state_and_no_result(tmp_path):
    args = ["run", "--strategy", "er", "--scenario", "synthetic-5", "--epochs", "1", "--quiet", "--seed", "5",
            "--output-dir", str(tmp_path), "--set", "limit_train_batches=2"]
    proc = subprocess.Popen([sys.executable, "-c", CHILD, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_signals_as_in_a_terminal)
    assert proc.stdout.readline().strip() == "in-experience-2"
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)  # faulthandler: every thread's stack to stderr
        time.sleep(2)
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"the run ignored Ctrl-C for 120 s; its threads:\n{err[-6000:]}")
    assert proc.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    assert _results(tmp_path) == []
    assert not list(tmp_path.rglob("*.tmp"))
    (meta,) = list(tmp_path.rglob("checkpoint.json"))
    assert json.loads(meta.read_text())["completed_experiences"] == 2
    assert main(args + ["--resume"]) == 0
    reference = tmp_path / "reference"
    assert main(args[:-4] + ["--output-dir", str(reference), "--set", "limit_train_batches=2"]) == 0
    (resumed,) = _results(tmp_path / "synthetic-5")
    (uninterrupted,) = _results(reference)
    assert json.loads(resumed.read_text())["accuracy_matrix"] == json.loads(uninterrupted.read_text())["accuracy_matrix"]


def test_atomic_write_leaves_old_file_when_serialisation_fails(tmp_path):
    target = tmp_path / "r.json"
    write_json_atomic(target, {"a": 1})
    with pytest.raises(TypeError):
        write_json_atomic(target, {"a": object()})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


# Each writer is a separate interpreter (not a multiprocessing pool: test modules are not importable
# by name under --import-mode=importlib, so spawned workers could not unpickle their function).
WRITER = textwrap.dedent(
    """
    import sys
    from clbench.reporting.results import RunResult, save
    out, k, same_file = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
    for repeat in range(20):
        seed, device = (0, "cpu") if same_file else (k, "cpu")
        r = RunResult(strategy="er", scenario="digits-5", backbone="clbench_mlp", seed=seed, status="completed",
                      accuracy_matrix=[[float(k), float(repeat)]], device=device)
        save(r, out)
    """
)


def _write_concurrently(out: Path, same_file: bool) -> None:
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(out), str(k), "1" if same_file else "0"])
             for k in range(8)]
    assert [p.wait(timeout=120) for p in procs] == [0] * 8


def test_eight_concurrent_writers_lose_nothing(tmp_path):
    # 8 processes, one file each (seed k), each written 20 times by its owner
    _write_concurrently(tmp_path, same_file=False)
    files = sorted(tmp_path.rglob("*.json"))
    assert len(files) == 8
    for f in files:
        assert load(f).accuracy_matrix[0][1] == 19.0
    assert not list(tmp_path.rglob("*.tmp"))


def test_same_file_from_many_processes_is_always_whole(tmp_path):
    _write_concurrently(tmp_path, same_file=True)
    (f,) = list(tmp_path.rglob("*.json"))
    assert load(f).accuracy_matrix[0][0] in range(8)
    assert not list(tmp_path.rglob("*.tmp"))
