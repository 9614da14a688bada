"""Training-loop speed: clbench's `naive` against Avalanche 0.6's own Naive and a hand-written loop.

All three train the same thing, in one process: scikit-learn's digits (every 5th sample
is test, class order 0..9, 5 experiences x 2 classes), a 64-256-256-10 MLP, SGD lr 0.05
momentum 0.9, batch 32, 5 epochs per experience, a fresh optimiser per experience, CPU.

    python benchmarks/loop_speed.py [--repeats 3] [--seed 0] [--threads 1] [--baselines]

What is timed is training only (evaluation excluded), summed over the 5 experiences:
  - hand loop:  the per-experience `for epoch / for batch` loop with its DataLoader;
  - avalanche:  `strategy.train(experience)` (its own setup, loop and plugins);
  - bare Lightning: the hand loop's model in a minimal LightningModule, one trimmed
                Trainer per experience, automatic or manual optimisation (the floor for any
                Lightning-based loop);
  - clbench:    Trainer construction + `trainer.fit` per experience, split into
                construction, fit setup/teardown and the inner loop (the EdgeProfiler's
                on_fit_start -> on_fit_end time).
Each contender runs once untimed (imports, allocator, first-call costs), then all run
round-robin `--repeats` times (so load on shared cores hits all alike); medians are
reported with the ratios to Avalanche and the hand loop.  `--baselines` also runs Avalanche's Replay (200 samples) and LwF (alpha 1, T 2)
for the issue's reference accuracies.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
import warnings

import torch
from torch import nn

EPOCHS, BATCH, LR, MOMENTUM = 5, 32, 0.05, 0.9


def digits_tensors():
    """The digits split exactly as clbench's digits-5 builds it: (train x, y), (test x, y)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(d.target, dtype=torch.long)
    test = torch.arange(len(y)) % 5 == 0
    return (x[~test], y[~test]), (x[test], y[test])


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def experiences(train, test):
    """Per experience: (train x, train y, test x, test y) for classes (2i, 2i+1)."""
    out = []
    for i in range(5):
        tr = (train[1] == 2 * i) | (train[1] == 2 * i + 1)
        te = (test[1] == 2 * i) | (test[1] == 2 * i + 1)
        out.append((train[0][tr], train[1][tr], test[0][te], test[1][te]))
    return out


@torch.no_grad()
def final_average_accuracy(model: nn.Module, exps) -> float:
    model.eval()
    accs = [(model(xte).argmax(1) == yte).float().mean().item() for _, _, xte, yte in exps]
    model.train()
    return sum(accs) / len(accs)


# --------------------------------------------------------------------------- contenders
def hand_loop(seed: int):
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(seed)
    train, test = digits_tensors()
    exps = experiences(train, test)
    model = mlp()
    loss_fn = nn.CrossEntropyLoss()
    elapsed = 0.0
    for xtr, ytr, _, _ in exps:
        t0 = time.perf_counter()
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
        loader = DataLoader(TensorDataset(xtr, ytr), batch_size=BATCH, shuffle=True)
        for _ in range(EPOCHS):
            for xb, yb in loader:
                opt.zero_grad()
                loss_fn(model(xb), yb).backward()
                opt.step()
        elapsed += time.perf_counter() - t0
    return elapsed, final_average_accuracy(model, exps), {}


def bare_lightning(seed: int, manual: bool = False):
    """The hand loop's model and data in a minimal LightningModule, one trimmed Trainer per experience,
    with Lightning's automatic optimisation or a manual step (what clbench does): the floor for any
    Lightning-based loop (clbench's overhead is what it adds on top)."""
    import pytorch_lightning as pl
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = mlp()
            self.automatic_optimization = not manual

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self.net(x), y)
            if manual:
                optimizer = self.optimizers()
                optimizer.zero_grad()
                self.manual_backward(loss)
                optimizer.step()
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM)

    torch.manual_seed(seed)
    train, test = digits_tensors()
    exps = experiences(train, test)
    module = Module()
    elapsed = 0.0
    for xtr, ytr, _, _ in exps:
        t0 = time.perf_counter()
        trainer = pl.Trainer(
            max_epochs=EPOCHS, accelerator="cpu", logger=False, enable_checkpointing=False,
            enable_model_summary=False, enable_progress_bar=False, num_sanity_val_steps=0, limit_val_batches=0,
        )
        trainer.fit(module, DataLoader(TensorDataset(xtr, ytr), batch_size=BATCH, shuffle=True))
        elapsed += time.perf_counter() - t0
    return elapsed, final_average_accuracy(module.net, exps), {}


def avalanche_stream(train, test):
    from avalanche.benchmarks.scenarios import class_incremental_benchmark
    from avalanche.benchmarks.utils import (
        _make_taskaware_tensor_classification_dataset as tensor_dataset,
    )

    return class_incremental_benchmark(
        {"train": tensor_dataset(train[0], train[1]), "test": tensor_dataset(test[0], test[1])},
        class_order=list(range(10)),
        num_classes_per_exp=[2] * 5,
    )


def avalanche(seed: int, method: str = "naive"):
    from avalanche.training import LwF, Naive, Replay
    from avalanche.training.plugins import EvaluationPlugin

    torch.manual_seed(seed)
    train, test = digits_tensors()
    stream = avalanche_stream(train, test)
    model = mlp()
    common = dict(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM),
        criterion=nn.CrossEntropyLoss(),
        train_mb_size=BATCH,
        train_epochs=EPOCHS,
        eval_mb_size=256,
        device="cpu",
        evaluator=EvaluationPlugin(loggers=[]),
    )
    if method == "naive":
        strategy = Naive(**common)
    elif method == "replay":
        strategy = Replay(mem_size=200, **common)
    else:
        strategy = LwF(alpha=1.0, temperature=2.0, **common)
    elapsed = 0.0
    for exp in stream.train_stream:
        t0 = time.perf_counter()
        strategy.train(exp, num_workers=0)
        elapsed += time.perf_counter() - t0
    return elapsed, final_average_accuracy(model, experiences(train, test)), {}


def clbench_naive(seed: int, strategy: str = "naive", profile: bool = True):
    import clbench.engine.runner as runner
    from clbench.config import RunConfig

    parts = {"construct": 0.0, "fit": 0.0}
    make_trainer = runner.make_trainer

    def timed_make_trainer(*args, **kwargs):
        t0 = time.perf_counter()
        trainer = make_trainer(*args, **kwargs)
        parts["construct"] += time.perf_counter() - t0
        fit = trainer.fit

        def timed_fit(*a, **kw):
            t1 = time.perf_counter()
            try:
                return fit(*a, **kw)
            finally:
                parts["fit"] += time.perf_counter() - t1

        trainer.fit = timed_fit
        return trainer

    runner.make_trainer = timed_make_trainer
    try:
        with tempfile.TemporaryDirectory() as out:
            cfg = RunConfig(accelerator="cpu", progress=False, output_dir=out, profile=profile)
            result = runner.run(runner.RunSpec(strategy=strategy, scenario="digits-5", run=cfg, seed=seed))
    finally:
        runner.make_trainer = make_trainer
    inner = result.edge["totals"]["train_time_raw_s"] if profile else None  # as measured: counting included
    detail = {"construct": parts["construct"], "fit": parts["fit"], "inner_loop": inner}
    return parts["construct"] + parts["fit"], result.metrics["final_avg_acc"], detail


# --------------------------------------------------------------------------- driver
def measure(contenders, repeats, seed):
    """Warm each up once, then run them round-robin so load changes on shared cores hit all alike."""
    for _, fn in contenders:
        fn(seed)
    runs = {name: [] for name, _ in contenders}
    for r in range(repeats):
        for name, fn in contenders:
            runs[name].append(fn(seed + r))
    rows = []
    for name, _ in contenders:
        times = [t for t, _, _ in runs[name]]
        median = statistics.median(times)
        detail = min(runs[name], key=lambda run: abs(run[0] - median))[2]
        acc = statistics.mean(a for _, a, _ in runs[name])
        rows.append({"name": name, "median_s": median, "times": times, "acc": acc, "detail": detail})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--baselines", action="store_true", help="also Avalanche Replay and LwF accuracies")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: no oversubscription on shared cores)")
    args = ap.parse_args(argv)

    from clbench.engine.runner import quiet_lightning

    quiet_lightning()
    warnings.filterwarnings("ignore")
    warnings.showwarning = lambda *a, **k: None  # avalanche re-enables its deprecation warnings per call
    logging.getLogger("avalanche").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)

    contenders = [
        ("hand-written loop", hand_loop),
        ("avalanche Naive", avalanche),
        ("bare Lightning, automatic", bare_lightning),
        ("bare Lightning, manual", lambda seed: bare_lightning(seed, manual=True)),
        ("clbench naive", clbench_naive),
        ("clbench naive, no profiler", lambda seed: clbench_naive(seed, profile=False)),
    ]
    rows = measure(contenders, args.repeats, args.seed)
    hand, aval, lightning, lightning_manual, ours, bare = (r["median_s"] for r in rows)
    print(f"digits 5x2, MLP 64-256-256-10, SGD lr {LR} m {MOMENTUM}, batch {BATCH}, {EPOCHS} epochs; "
          f"torch threads {torch.get_num_threads()}; median of {args.repeats} after a warm-up, round-robin")
    print(f"{'contender':28s} {'train s (median)':>17s}   {'runs':30s} {'final avg acc':>14s}")
    for r in rows:
        runs = " ".join(f"{t:.2f}" for t in r["times"])
        print(f"{r['name']:28s} {r['median_s']:17.3f}   {runs:30s} {r['acc']:14.3f}")
    d = rows[4]["detail"]
    print(f"clbench breakdown (median run): Trainer construction {d['construct']:.3f} s, fit setup/teardown "
          f"{d['fit'] - d['inner_loop']:.3f} s, inner loop (on_fit_start..on_fit_end) {d['inner_loop']:.3f} s")
    print(f"ratio clbench / avalanche = {ours / aval:.2f}   (target <= 1.0; without the EdgeProfiler {bare / aval:.2f})")
    print(f"ratio clbench / hand loop = {ours / hand:.2f}")
    print(f"ratio avalanche / hand loop = {aval / hand:.2f}")
    print(f"ratio bare Lightning / avalanche = {lightning / aval:.2f} automatic optimisation, "
          f"{lightning_manual / aval:.2f} manual (the floor of a Lightning-based loop)")

    if args.baselines:
        for method, ours_name in (("replay", "er"), ("lwf", "lwf")):
            theirs = [avalanche(args.seed + r, method)[1] for r in range(args.repeats)]
            mine = [clbench_naive(args.seed + r, ours_name)[1] for r in range(args.repeats)]
            print(f"final avg acc  avalanche {method:7s} {' '.join(f'{a:.3f}' for a in theirs)}   "
                  f"clbench {ours_name:4s} {' '.join(f'{a:.3f}' for a in mine)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
