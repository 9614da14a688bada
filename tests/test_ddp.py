"""One run across two CPU processes (Lightning DDP, gloo): results, shared strategy state, profiler, resume.

The slow tests share one subprocess (`ddp_runs`): a driver that calls the CLI (`clbench.cli.main`, what
the `clbench` command runs) once per strategy with `--accelerator cpu --devices 2 --trainer-strategy
ddp`; Lightning re-runs the driver as rank 1, which makes the same calls, so one process start and one
process group serve every strategy. Each rank writes its final strategy state
(`$CLBENCH_RANK_STATE_DIR`). The driver then interrupts an ER run after its first experience and
resumes it with `--resume`.

DDP runs are not bit-identical to a single process with the same global batch and seed, though
they see the same global batches in the same order: the gradient is the mean of per-rank means
(summed in another order, and the last, uneven batch weighs its parts equally), BatchNorm uses
per-device batch statistics, augmentation and dropout draw from per-rank streams, and the
replayed rows are split across ranks. On these tiny runs the final average accuracy agrees
within ACCURACY_TOLERANCE (it was equal for all seven strategies when this test was written).
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# one xdist worker runs every test of this file (`--dist loadgroup`): the two-process driver then runs
# once, and never beside another DDP launch whose ranks could meet its own
pytestmark = pytest.mark.xdist_group("ddp")
STRATEGIES = ["naive", "er", "der_pp", "icarl", "ewc", "lwf", "simplecil"]
PER_DEVICE_BATCH, WORLD, BATCHES = 8, 2, 3
REPLAY_PER_DEVICE = 4  # er, der_pp: the replay batch is per device too
ACCURACY_TOLERANCE = 0.05  # final average accuracy, DDP vs one process with the global batch (equal when written)

DRIVER = r'''
import json, os, sys
from clbench import cli
from clbench.engine import runner

out = sys.argv[1]
common = ["--scenario", "synthetic-2", "--accelerator", "cpu", "--devices", "2", "--trainer-strategy", "ddp",
          "--epochs", "1", "--batch-size", "%(batch)d", "--quiet", "--set", "limit_train_batches=%(batches)d"]
extra = json.loads(sys.argv[2])

def run_cli(strategy, name, *more):
    os.environ["CLBENCH_RANK_STATE_DIR"] = os.path.join(out, name, "ranks")
    return cli.main(["run", "--strategy", strategy, "--output-dir", os.path.join(out, name, "results"), *common,
                     *extra.get(strategy, []), *more])

codes = {s: run_cli(s, s) for s in sys.argv[3].split(",")}

# an ER run stopped by Ctrl-C after its first experience (resume state written), then resumed
args = cli.build_parser().parse_args(["run", "--strategy", "er", "--output-dir", os.path.join(out, "er_resume", "results"),
                                      *common, *extra.get("er", [])])
os.environ["CLBENCH_RANK_STATE_DIR"] = os.path.join(out, "er_resume", "ranks_cut")
def stop(i, result, strategy):
    if i == 0:
        raise KeyboardInterrupt
try:
    runner.run(cli.spec_from_args(args, 0), on_experience=stop)
except KeyboardInterrupt:
    pass
resume_state = os.path.join(out, "er_resume", "results", ".resume")
codes["checkpoint_after_cut"] = int(os.path.isdir(resume_state))
codes["er_resume"] = run_cli("er", "er_resume", "--resume")
if os.environ.get("LOCAL_RANK", "0") == "0":
    with open(os.path.join(out, "codes.json"), "w") as f:
        json.dump(codes, f)
''' % {"batch": PER_DEVICE_BATCH, "batches": BATCHES}


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    driver = out / "driver.py"
    driver.write_text(DRIVER)
    extra = {s: ["--set", f"replay_batch_size={REPLAY_PER_DEVICE}"] for s in ("er", "der_pp")}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(Path(__file__).parents[1])}
    for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_NTASKS", "SLURM_JOB_NAME"):
        env.pop(key, None)  # a fresh launch, whatever launched pytest
    proc = subprocess.run([sys.executable, str(driver), str(out), json.dumps(extra), ",".join(STRATEGIES)],
                          cwd=out, env=env, capture_output=True, text=True, timeout=600)
    codes_file = out / "codes.json"
    assert proc.returncode == 0 and codes_file.is_file(), proc.stdout[-3000:] + proc.stderr[-6000:]
    return out, json.loads(codes_file.read_text())


def _result(out: Path, name: str) -> tuple[list[str], dict]:
    files = sorted(glob.glob(str(out / name / "results" / "**" / "*.json"), recursive=True))
    return files, (json.loads(Path(files[0]).read_text()) if files else {})


def _rank_states(folder: Path) -> list[dict[str, torch.Tensor]]:
    return [torch.load(folder / f"rank-{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_ddp_run_completes_with_one_result(ddp_runs, strategy):
    out, codes = ddp_runs
    assert codes[strategy] == 0
    files, result = _result(out, strategy)
    assert len(files) == 1, files  # rank 1 writes nothing
    assert result["status"] == "completed"
    dist = result["environment"]["distributed"]
    assert dist["world_size"] == WORLD and dist["backend"] == "gloo"
    assert dist["per_device_batch_size"] == PER_DEVICE_BATCH and dist["global_batch_size"] == PER_DEVICE_BATCH * WORLD
    assert dist["resynced"] == []  # the state agreed on its own after every experience: nothing taken from rank 0
    assert not (out / strategy / "results" / ".resume").exists()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_ddp_strategy_state_identical_across_ranks(ddp_runs, strategy):
    out, _ = ddp_runs
    rank0, rank1 = _rank_states(out / strategy / "ranks")
    assert sorted(rank0) == sorted(rank1)
    differing = [k for k in rank0 if rank0[k].dtype != rank1[k].dtype or not torch.equal(rank0[k], rank1[k])]
    assert differing == []  # parameters, buffers, extra state (replay buffers, exemplars, Fisher, prototypes) and accuracies


@pytest.mark.slow
def test_ddp_replay_buffer_holds_every_ranks_samples(ddp_runs):
    """The ER buffer saw the global batches: BATCHES x global batch per experience, inserted on every rank."""
    out, _ = ddp_runs
    state = _rank_states(out / "er" / "ranks")[0]
    assert int(state["extra.buffer.num_seen"]) == 2 * BATCHES * PER_DEVICE_BATCH * WORLD


@pytest.mark.slow
def test_ddp_profile_sums_flops_over_ranks(ddp_runs):
    out, _ = ddp_runs
    _, result = _result(out, "er")
    for rec in result["edge"]["per_experience"]:
        ranks = rec["ranks"]
        assert ranks["world_size"] == WORLD and len(ranks["train_flops_exp"]) == WORLD
        assert rec["train_flops_exp"] == sum(ranks["train_flops_exp"]) > 0
        assert rec["peak_memory_bytes"] == max(ranks["peak_memory_bytes"])
        assert rec["samples"] == sum(ranks["samples"]) == BATCHES * PER_DEVICE_BATCH * WORLD
    totals = result["edge"]["totals"]
    assert totals["world_size"] == WORLD and len(totals["peak_memory_bytes_per_rank"]) == WORLD
    assert totals["train_flops_total"] == sum(r["train_flops_exp"] for r in result["edge"]["per_experience"])
    assert totals["peak_memory_bytes"] == max(totals["peak_memory_bytes_per_rank"])


@pytest.mark.slow
def test_ddp_resume_continues_the_interrupted_run_exactly(ddp_runs):
    out, codes = ddp_runs
    assert codes["checkpoint_after_cut"] == 1 and codes["er_resume"] == 0
    files, result = _result(out, "er_resume")
    assert len(files) == 1 and result["status"] == "completed"
    resumed, whole = _rank_states(out / "er_resume" / "ranks"), _rank_states(out / "er" / "ranks")
    for r in range(WORLD):
        assert sorted(resumed[r]) == sorted(whole[r])
        assert [k for k in whole[r] if not torch.equal(resumed[r][k], whole[r][k])] == []
    _, whole_result = _result(out, "er")
    assert result["accuracy_matrix"] == whole_result["accuracy_matrix"]


def single_process_final_accuracy(strategy: str, output_dir) -> float:
    """The same run in one process with the global batch (and the global replay batch)."""
    from clbench.config import RunConfig
    from clbench.engine.runner import RunSpec, run

    overrides = {"replay_batch_size": REPLAY_PER_DEVICE * WORLD} if strategy in ("er", "der_pp") else {}
    cfg = RunConfig(epochs=1, batch_size=PER_DEVICE_BATCH * WORLD, accelerator="cpu", devices="1",
                    limit_train_batches=BATCHES, progress=False, output_dir=str(output_dir))
    return run(RunSpec(strategy, "synthetic-2", run=cfg, strategy_overrides=overrides)).metrics["final_avg_acc"]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_ddp_accuracy_close_to_one_process_with_the_global_batch(ddp_runs, strategy, tmp_path, one_thread):
    out, _ = ddp_runs
    _, result = _result(out, strategy)
    single = single_process_final_accuracy(strategy, tmp_path)
    assert abs(result["metrics"]["final_avg_acc"] - single) <= ACCURACY_TOLERANCE, (result["metrics"]["final_avg_acc"], single)


# --------------------------------------------------------------------------- fast: no processes
@pytest.mark.parametrize("n,per_device,world", [(50, 8, 2), (33, 4, 3), (17, 8, 2), (3, 8, 2), (1, 4, 2)])
def test_sharded_batches_are_the_single_process_batches_cut_per_rank(n, per_device, world):
    """Over the ranks, each global batch is the batch of a single-process loader with batch size
    per_device x world on the same seed (two epochs: the generator advances the same way); a last
    global batch with fewer samples than ranks joins the one before; parts differ by at most one."""
    from clbench.datasets import make_loader
    from clbench.distributed import ShardedBatchSampler
    from torch.utils.data import DataLoader

    data = torch.utils.data.TensorDataset(torch.arange(n), torch.zeros(n, dtype=torch.long))
    single = make_loader(data, per_device * world, shuffle=True, seed=7)
    single_batches = [[int(v) for v in b.x] for _ in range(2) for b in single]
    loaders = []
    for r in range(world):
        g = torch.Generator().manual_seed(7)
        sampler = ShardedBatchSampler(n, per_device, r, world, shuffle=True, generator=g)
        loaders.append(DataLoader(data, batch_sampler=sampler, generator=g))
    per_rank = [[[int(v) for v in b[0]] for _ in range(2) for b in loader] for loader in loaders]
    assert len({len(p) for p in per_rank}) == 1 and len(per_rank[0]) == 2 * len(loaders[0].batch_sampler)
    joined = [sum((p[k] for p in per_rank), []) for k in range(len(per_rank[0]))]
    if n >= world:
        expected = []
        for epoch in (single_batches[: len(single_batches) // 2], single_batches[len(single_batches) // 2:]):
            epoch = list(epoch)
            if len(epoch) > 1 and len(epoch[-1]) < world:
                last = epoch.pop()
                epoch[-1] = epoch[-1] + last
            expected += epoch
        assert joined == expected
        sizes = [[len(p[k]) for p in per_rank] for k in range(len(joined))]
        assert all(max(s) - min(s) <= 1 and min(s) >= 1 for s in sizes)
    else:  # fewer samples than ranks: every rank gets one (repeated) sample
        assert all(len(p[k]) == 1 for p in per_rank for k in range(len(joined)))


def test_combined_profile_sums_work_and_takes_the_largest_peak():
    from clbench.edge.profiler import combine_rank_records

    ranks = [{"experience": 0, "train_flops_exp": 10, "samples": 4, "peak_memory_bytes": 100, "train_time_s": 2.0,
              "train_flops_step": 5, "steps": 2, "jetson": {"time_s": 1.0}},
             {"experience": 0, "train_flops_exp": 12, "samples": 4, "peak_memory_bytes": 300, "train_time_s": 1.0,
              "train_flops_step": 6, "steps": 2, "jetson": {"time_s": 9.0}}]
    rec = combine_rank_records(ranks)
    assert rec["train_flops_exp"] == 22 and rec["samples"] == 8
    assert rec["peak_memory_bytes"] == 300 and rec["train_time_s"] == 2.0 and rec["samples_per_s"] == 4.0
    assert rec["train_flops_step"] == 5 and rec["steps"] == 2 and rec["jetson"] == {"time_s": 1.0}  # per device: rank 0's
    assert rec["ranks"] == {"world_size": 2, "train_flops_exp": [10, 12], "samples": [4, 4],
                            "peak_memory_bytes": [100, 300], "train_time_s": [2.0, 1.0]}
