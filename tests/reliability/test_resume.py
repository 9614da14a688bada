"""Resume: a run killed with SIGKILL after experience 2 of 5 and resumed ends exactly like an uninterrupted one."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from clbench.cli import main
from clbench.registry import STRATEGIES

# A seed method with a teacher or buffer joins the list once it is registered.
SEED_METHOD = next((m for m in ("clfd", "der_pp", "lord") if m in STRATEGIES.names()), None)
STRATEGIES_TO_KILL = ["naive", "er", "lwf"] + ([SEED_METHOD] if SEED_METHOD else [])

# The child stalls right after saving experience 2's checkpoint so the parent's SIGKILL lands
# deterministically between experiences 2 and 3 (only the test's child is patched).
CHILD = textwrap.dedent(
    """
    import sys, time
    from clbench.engine import checkpoint
    save = checkpoint.save
    def stalling_save(folder, strategy, result, completed):
        save(folder, strategy, result, completed)
        if completed == 2:
            time.sleep(600)
    checkpoint.save = stalling_save
    from clbench.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def _args(strategy: str, out: Path) -> list[str]:
    scenario = "synthetic32-3" if strategy == SEED_METHOD else "synthetic-5"
    return ["run", "--strategy", strategy, "--scenario", scenario, "--seed", "7", "--epochs", "2", "--quiet",
            "--output-dir", str(out), "--set", "limit_train_batches=3"]


def _result_file(out: Path) -> list[Path]:
    return [p for p in out.rglob("*.json") if ".resume" not in p.parts]


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    children = {}
    for name in STRATEGIES_TO_KILL:
        out = tmp_path / f"killed-{name}"
        children[name] = (out, subprocess.Popen([sys.executable, "-c", CHILD, *_args(name, out)],
                                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    deadline = time.time() + 240
    for name, (out, proc) in children.items():
        meta = None
        while time.time() < deadline:
            found = list(out.rglob("checkpoint.json"))
            if found and json.loads(found[0].read_text())["completed_experiences"] == 2:
                meta = found[0]
                break
            assert proc.poll() is None, f"{name} child exited early: {proc.stderr.read().decode()[-2000:]}"
            time.sleep(0.05)
        assert meta is not None, f"{name}: no checkpoint after experience 2"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        assert _result_file(out) == [], "a killed run must not leave a result JSON"
        assert not list(out.rglob("*.tmp")), "no half-written files"

    for name, (out, _) in children.items():
        assert main(_args(name, out) + ["--resume"]) == 0
        reference = tmp_path / f"reference-{name}"
        assert main(_args(name, reference)) == 0
        resumed = json.loads(_result_file(out)[0].read_text())
        uninterrupted = json.loads(_result_file(reference)[0].read_text())
        assert resumed["accuracy_matrix"] == uninterrupted["accuracy_matrix"], name
        assert resumed["metrics"] == uninterrupted["metrics"], name
        assert len(resumed["edge"]["per_experience"]) == len(uninterrupted["edge"]["per_experience"])
        assert not (out / ".resume").exists(), "resume state (or its empty folders) kept after success"
        assert not (reference / ".resume").exists()


@pytest.mark.parametrize("strategy", ["naive", "er", "lwf", "ewc", "joint"])
def test_resume_at_every_experience_boundary(tmp_path, strategy):
    """Interrupt after each experience in turn (in-process); every resume ends identical to the reference."""
    from clbench.config import RunConfig
    from clbench.engine.runner import RunSpec, run

    def spec(out, resume=False):
        cfg = RunConfig(epochs=1, progress=False, output_dir=str(out), limit_train_batches=3)
        return RunSpec(strategy, "synthetic-5", run=cfg, seed=11, resume=resume)

    reference = run(spec(tmp_path / "ref"))
    for stop_after in range(4):
        out = tmp_path / f"stop{stop_after}"

        def interrupt(i, result, strategy_, stop_after=stop_after):
            if i == stop_after:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            run(spec(out), on_experience=interrupt)
        assert _result_file(out) == []
        resumed = run(spec(out, resume=True))
        assert resumed.accuracy_matrix == reference.accuracy_matrix, (strategy, stop_after)


def test_checkpoint_is_tensors_and_json_only(tmp_path):
    from clbench.config import RunConfig
    from clbench.engine.runner import RunSpec, run

    cfg = RunConfig(epochs=1, progress=False, output_dir=str(tmp_path), limit_train_batches=2)

    def interrupt(i, result, strategy_):
        if i == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(RunSpec("er", "synthetic-5", run=cfg, seed=0), on_experience=interrupt)
    (meta_file,) = list(tmp_path.rglob("checkpoint.json"))
    meta = json.loads(meta_file.read_text())
    assert meta["completed_experiences"] == 2
    state = torch.load(meta_file.parent / meta["state_file"], weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert any(k.startswith("extra.buffer.field.x") for k in state), "the ER buffer is part of the checkpoint"
    assert "rng.torch" in state


def test_resume_with_other_settings_is_refused(tmp_path, capsys):
    args = ["run", "--strategy", "er", "--scenario", "synthetic-5", "--epochs", "1", "--quiet",
            "--output-dir", str(tmp_path), "--set", "limit_train_batches=2"]
    from clbench.config import RunConfig
    from clbench.engine.runner import RunSpec, run

    def interrupt(i, result, strategy_):
        if i == 0:
            raise KeyboardInterrupt

    cfg = RunConfig(epochs=1, progress=False, output_dir=str(tmp_path), limit_train_batches=2)
    with pytest.raises(KeyboardInterrupt):
        run(RunSpec("er", "synthetic-5", run=cfg, seed=0), on_experience=interrupt)
    assert main(args + ["buffer_size=50", "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert "different settings" in err and "strategy_config" in err and len(err.splitlines()) == 1


def test_checkpoint_keeps_the_per_experience_records(tmp_path, strategy_factory):
    """What the result gathers per experience besides the accuracy matrix survives a resume."""
    from clbench.engine import checkpoint
    from clbench.reporting.results import RunResult

    strategy = strategy_factory("naive")
    result = RunResult("naive", "synthetic-2", "clbench_mlp_tiny", 0, accuracy_matrix=[[0.5, 0.0]],
                       aux_results={"quantize": [{"experience": 0, "accuracy": [0.4, 0.0]}]},
                       diagnostics=[{"experience": 0, "task_prediction_accuracy": [1.0]}])
    checkpoint.save(tmp_path, strategy, result, 1)
    meta, tensors = checkpoint.load(tmp_path)
    restored = RunResult("naive", "synthetic-2", "clbench_mlp_tiny", 0)
    checkpoint.restore(strategy_factory("naive"), meta, tensors, restored)
    assert restored.accuracy_matrix == result.accuracy_matrix
    assert restored.aux_results == result.aux_results
    assert restored.diagnostics == result.diagnostics
