"""Peer parity with Avalanche 0.6: each clbench strategy against its Avalanche twin, same setup, several seeds.

The digits reference setup of `loop_speed.py` on both sides: scikit-learn's digits (every
5th sample is test, class order 0..9, 5 experiences x 2 classes), a 64-256-256 MLP with a
linear head, SGD lr 0.05 momentum 0.9, batch 32, 5 epochs, a fresh optimiser per
experience, CPU, one torch thread.  clbench runs go through `clbench.engine.runner.run` on
its `digits-5` scenario; the Avalanche benchmark is built from the very tensors that
scenario holds (checked against the loop_speed split), so both sides see the same data.

    python benchmarks/peer_avalanche.py [--seeds 3] [--strategies naive,er] [--quick]

Pairs (clbench / Avalanche, hyper-parameters set equal on both sides):
    naive / Naive                     joint / Cumulative (same work: all data seen so far)
    joint / JointTraining (offline)   er / Replay (200)
    lwf / LwF (alpha 1, T 2)          ewc / EWC (online, lambda 10, decay 1)
    der_pp / DER (200, alpha 0.1, beta 0.5, replay batch 32; clbench replay_draws=1, Avalanche's one draw)
    er_ace / ER_ACE (200, replay batch 32)
    icarl / ICaRL (200, fixed memory; clbench's wd_reg set to 0: Avalanche has no such term)
(clbench ships no GEM, A-GEM, SI, MAS or GDumb: those Avalanche strategies have no twin here.)

Runs alternate, clbench then Avalanche (the order flips every seed), so load on shared cores
hits both alike.  Per pair it prints the final average accuracy (mean +- sample std over
seeds) of both, their difference and whether it lies within two standard errors of the
difference, and the training CPU-time ratio clbench / Avalanche: process CPU time of the
training only (clbench: the strategy's experience start, training data, every phase's
Trainer and fit, and experience end; Avalanche: `strategy.train`; evaluation and data set
construction excluded on both sides), the median of the per-seed paired ratios with a
bootstrap 95% interval (exact over all resamples for few seeds).
Each pair first runs once untimed (1 epoch, both sides).  `--quick`: 1 seed, 1 epoch, no warm-up (tests).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import random
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loop_speed  # the reference setup and its digits split

LR, MOMENTUM, BATCH = loop_speed.LR, loop_speed.MOMENTUM, loop_speed.BATCH
MEMORY = 200
REPLAY_BATCH = 32


# --------------------------------------------------------------------------- arithmetic
def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); the deviation is nan for fewer than two values."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("no values")
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else math.nan)


def two_se_verdict(ours, theirs) -> tuple[float, float, bool | None]:
    """(difference of means ours - theirs, its standard error sqrt(s1^2/n1 + s2^2/n2), whether
    |difference| <= 2 standard errors); the verdict is None when a side has fewer than two values."""
    m1, s1 = mean_std(ours)
    m2, s2 = mean_std(theirs)
    diff = m1 - m2
    se = math.sqrt(s1**2 / len(ours) + s2**2 / len(theirs))
    if math.isnan(se):
        return diff, se, None
    return diff, se, abs(diff) <= 2 * se


def _quantile_from_distribution(dist: list[tuple[float, float]], q: float) -> float:
    """Smallest value whose cumulative probability reaches q, over (value, probability) pairs."""
    total = 0.0
    for value, p in sorted(dist):
        total += p
        if total >= q - 1e-12:
            return value
    return max(v for v, _ in dist)


def paired_ratio_interval(ours, theirs, level: float = 0.95, draws: int = 20000, seed: int = 0,
                          exact_limit: int = 200_000) -> tuple[float, float, float]:
    """Median of the paired ratios ours[i] / theirs[i] and a percentile bootstrap interval of
    that median at `level`.  For n ratios with n**n <= exact_limit the bootstrap distribution is
    exact (every resample, equally likely); otherwise `draws` seeded random resamples."""
    if len(ours) != len(theirs) or not ours:
        raise ValueError("need the same, non-zero number of paired values")
    ratios = [a / b for a, b in zip(ours, theirs)]
    n = len(ratios)
    if n**n <= exact_limit:
        medians = [statistics.median(pick) for pick in itertools.product(ratios, repeat=n)]
    else:
        rng = random.Random(seed)
        medians = [statistics.median(rng.choices(ratios, k=n)) for _ in range(draws)]
    weight = 1.0 / len(medians)
    counts: dict[float, float] = {}
    for m in medians:
        counts[m] = counts.get(m, 0.0) + weight
    dist = list(counts.items())
    tail = (1.0 - level) / 2
    return statistics.median(ratios), _quantile_from_distribution(dist, tail), _quantile_from_distribution(dist, 1 - tail)


# --------------------------------------------------------------------------- the pairs
@dataclass(frozen=True)
class Pair:
    key: str  # what --strategies names
    ours: str  # clbench strategy
    theirs: str  # Avalanche strategy class
    overrides: dict = field(default_factory=dict)  # clbench settings set equal to Avalanche's
    note: str = ""


PAIRS = [
    Pair("naive", "naive", "Naive"),
    Pair("joint", "joint", "Cumulative", note="both train on all data seen so far at every experience"),
    Pair("joint-offline", "joint", "JointTraining", note="Avalanche trains once on the whole stream"),
    Pair("er", "er", "Replay", {"buffer_size": MEMORY, "replay_batch_size": BATCH}),
    Pair("lwf", "lwf", "LwF", {"alpha": 1.0, "temperature": 2.0}),
    Pair("ewc", "ewc", "EWC", {"ewc_lambda": 10.0, "gamma": 1.0}),
    # Avalanche's DER feeds both replay terms from one draw: clbench's replay_draws=1 does the same work
    Pair("der_pp", "der_pp", "DER", {"buffer_size": MEMORY, "replay_batch_size": REPLAY_BATCH, "alpha": 0.1, "beta": 0.5,
                                     "replay_draws": 1}),
    Pair("er_ace", "er_ace", "ER_ACE", {"buffer_size": MEMORY, "replay_batch_size": REPLAY_BATCH}),
    Pair("icarl", "icarl", "ICaRL", {"buffer_size": MEMORY, "wd_reg": 0.0}),
]
PAIR_BY_KEY = {p.key: p for p in PAIRS}


# --------------------------------------------------------------------------- data
def clbench_tensors():
    """(train x, y), (test x, y) and the class order, as clbench's digits-5 scenario holds them."""
    from clbench.config import RunConfig
    from clbench.engine.runner import create_scenario

    scenario = create_scenario("digits-5", RunConfig(accelerator="cpu", progress=False))
    train = (torch.cat([d.x for d in scenario.train_sets]), torch.cat([d.y for d in scenario.train_sets]))
    test = (torch.cat([d.x for d in scenario.test_sets]), torch.cat([d.y for d in scenario.test_sets]))
    return train, test, list(scenario.class_order), list(scenario.increments)


def check_same_split(train, test, class_order, increments) -> None:
    """clbench's scenario holds exactly loop_speed's split (every 5th sample test, classes 0..9 in order)."""
    if class_order != list(range(10)) or increments != [2] * 5:
        raise SystemExit(f"digits-5 has class order {class_order} and increments {increments}; expected 0..9 and 5 x 2")
    (rx, ry), (tx, ty) = loop_speed.digits_tensors()

    def canonical(x, y):  # the same multiset of (label, image) rows, whatever the row order
        import numpy as np

        key = torch.cat([y[:, None].float(), x.reshape(len(x), -1)], 1)
        return key[torch.from_numpy(np.lexsort(key.numpy().T[::-1].copy()))]

    for (a, b), (c, d), name in (((train[0], train[1]), (rx, ry), "train"), ((test[0], test[1]), (tx, ty), "test")):
        if a.shape != c.shape or not torch.equal(canonical(a, b), canonical(c, d)):
            raise SystemExit(f"clbench's digits-5 {name} split differs from the reference split")


def avalanche_benchmark(train, test, legacy: bool = False):
    """loop_speed's Avalanche stream over these tensors; `legacy`: the same split through the older
    `nc_benchmark` (Avalanche's ICaRL reads `experience.benchmark.n_classes_per_exp`, which only it has)."""
    if not legacy:
        return loop_speed.avalanche_stream(train, test)
    from avalanche.benchmarks import nc_benchmark
    from avalanche.benchmarks.utils import (
        _make_taskaware_tensor_classification_dataset as tensor_dataset,
    )

    return nc_benchmark(tensor_dataset(train[0], train[1]), tensor_dataset(test[0], test[1]), n_experiences=5,
                        task_labels=False, fixed_class_order=list(range(10)))


def per_experience_test(test):
    """Per experience (None, None, test x, test y), the shape `loop_speed.final_average_accuracy` reads."""
    out = []
    for i in range(5):
        keep = (test[1] == 2 * i) | (test[1] == 2 * i + 1)
        out.append((None, None, test[0][keep], test[1][keep]))
    return out


# --------------------------------------------------------------------------- one run per side
def run_clbench(pair: Pair, seed: int, epochs: int) -> tuple[float, float]:
    """(final average accuracy, training CPU seconds) of one clbench run."""
    from clbench.config import RunConfig
    from clbench.engine import runner

    cpu = [0.0]
    create = runner.create_strategy
    train = runner._train

    def timed(fn):
        def wrapper(*a, **kw):
            t0 = time.process_time()
            try:
                return fn(*a, **kw)
            finally:
                cpu[0] += time.process_time() - t0
        return wrapper

    def timed_create(*a, **kw):
        strategy = create(*a, **kw)
        for hook in ("on_experience_start", "training_data", "on_experience_end"):
            object.__setattr__(strategy, hook, timed(getattr(strategy, hook)))  # instance attributes: this run only
        return strategy

    runner.create_strategy, runner._train = timed_create, timed(train)
    try:
        with tempfile.TemporaryDirectory() as out:
            cfg = RunConfig(accelerator="cpu", progress=False, output_dir=out, profile=False, checkpoint=False, epochs=epochs)
            result = runner.run(runner.RunSpec(strategy=pair.ours, scenario="digits-5", run=cfg, seed=seed,
                                               strategy_overrides=dict(pair.overrides)))
    finally:
        runner.create_strategy, runner._train = create, train
    if result.status != "completed":
        raise RuntimeError(f"clbench {pair.ours} seed {seed}: {result.status} {result.error}")
    return float(result.metrics["final_avg_acc"]), cpu[0]


def _seed_all(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_avalanche(pair: Pair, seed: int, epochs: int, data) -> tuple[float, float]:
    """(final average accuracy, training CPU seconds) of one Avalanche run."""
    import avalanche.training as T
    from avalanche.training.plugins import EvaluationPlugin

    train, test = data
    _seed_all(seed)
    stream = avalanche_benchmark(train, test, legacy=pair.theirs == "ICaRL")
    model = loop_speed.mlp()
    common = {"train_mb_size": BATCH, "train_epochs": epochs, "eval_mb_size": 256, "device": "cpu",
              "evaluator": EvaluationPlugin(loggers=[]), "eval_every": -1}

    def sgd(params):
        return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)

    ce = nn.CrossEntropyLoss()
    o = pair.overrides
    if pair.theirs == "ICaRL":
        features, classifier = model[:-1], model[-1]
        strategy = T.ICaRL(feature_extractor=features, classifier=classifier, optimizer=sgd(model.parameters()),
                           memory_size=o["buffer_size"], buffer_transform=None, fixed_memory=True, **common)
        model = strategy.model  # train: feature extractor + linear head; eval: nearest class mean
    else:
        args = dict(model=model, optimizer=sgd(model.parameters()), criterion=ce, **common)
        if pair.theirs == "Replay":
            args.update(mem_size=o["buffer_size"])
        elif pair.theirs == "LwF":
            args.update(alpha=o["alpha"], temperature=o["temperature"])
        elif pair.theirs == "EWC":
            args.update(ewc_lambda=o["ewc_lambda"], mode="online", decay_factor=o["gamma"])
        elif pair.theirs == "DER":
            args.update(mem_size=o["buffer_size"], batch_size_mem=o["replay_batch_size"], alpha=o["alpha"], beta=o["beta"])
        elif pair.theirs == "ER_ACE":
            args.update(mem_size=o["buffer_size"], batch_size_mem=o["replay_batch_size"])
        strategy = getattr(T, pair.theirs)(**args)
    if pair.theirs == "Replay":  # Replay builds its plugin from mem_size only (replay batch: train_mb_size); made explicit
        from avalanche.training.plugins import ReplayPlugin

        for plugin in strategy.plugins:
            if isinstance(plugin, ReplayPlugin):
                plugin.batch_size_mem = o["replay_batch_size"]
    cpu = 0.0
    if pair.theirs == "JointTraining":
        t0 = time.process_time()
        strategy.train(stream.train_stream, num_workers=0)
        cpu = time.process_time() - t0
    else:
        for exp in stream.train_stream:
            t0 = time.process_time()
            strategy.train(exp, num_workers=0)
            cpu += time.process_time() - t0
    return loop_speed.final_average_accuracy(model, per_experience_test(test)), cpu


# --------------------------------------------------------------------------- driver
def quiet() -> None:
    from clbench.engine.runner import quiet_lightning

    quiet_lightning()
    warnings.filterwarnings("ignore")
    warnings.showwarning = lambda *a, **k: None  # avalanche re-enables its deprecation warnings per call
    logging.getLogger("avalanche").setLevel(logging.ERROR)


def measure(pairs, seeds, epochs, data, warmup=True, log=print) -> dict[str, dict[str, list[float]]]:
    """Every pair's runs, clbench and Avalanche alternating (the order flips every seed)."""
    if warmup:  # imports, allocator, each method's first calls (vmap, deep copies): paid before anything is timed
        for pair in pairs:
            run_clbench(pair, 1000, 1)
            run_avalanche(pair, 1000, 1, data)
    runs = {p.key: {"ours_acc": [], "theirs_acc": [], "ours_cpu": [], "theirs_cpu": []} for p in pairs}
    for i, seed in enumerate(seeds):
        for pair in pairs:
            sides = [("ours", lambda pair=pair, seed=seed: run_clbench(pair, seed, epochs)),
                     ("theirs", lambda pair=pair, seed=seed: run_avalanche(pair, seed, epochs, data))]
            for side, fn in (sides if i % 2 == 0 else sides[::-1]):
                acc, cpu = fn()
                runs[pair.key][f"{side}_acc"].append(acc)
                runs[pair.key][f"{side}_cpu"].append(cpu)
                log(f"  seed {seed} {pair.key:13s} {'clbench' if side == 'ours' else 'avalanche':9s} "
                    f"acc {acc:.3f}  train cpu {cpu:6.2f} s", flush=True)
    return runs


def fmt_acc(values) -> str:
    m, s = mean_std(values)
    return f"{m:.3f} ± {s:.3f}" if not math.isnan(s) else f"{m:.3f}"


def table(pairs, runs) -> list[str]:
    lines = [(f"{'pair (clbench / avalanche)':30s} {'clbench acc':>15s} {'avalanche acc':>15s} {'diff':>7s} "
              f"{'2 SE':>6s} {'within 2 SE':>11s}   {'CPU ratio (median, 95% CI)':>28s}")]
    for pair in pairs:
        r = runs[pair.key]
        diff, se, inside = two_se_verdict(r["ours_acc"], r["theirs_acc"])
        med, lo, hi = paired_ratio_interval(r["ours_cpu"], r["theirs_cpu"])
        verdict = "n/a" if inside is None else ("yes" if inside else "NO")
        two_se = "n/a" if math.isnan(se) else f"{2 * se:.3f}"
        lines.append(f"{pair.ours + ' / ' + pair.theirs:30s} {fmt_acc(r['ours_acc']):>15s} {fmt_acc(r['theirs_acc']):>15s} "
                     f"{diff:+7.3f} {two_se:>6s} {verdict:>11s}   {med:10.2f} [{lo:.2f}, {hi:.2f}]")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    ap.add_argument("--strategies", default=",".join(p.key for p in PAIRS),
                    help=f"comma-separated pairs among: {', '.join(PAIR_BY_KEY)}")
    ap.add_argument("--epochs", type=int, default=loop_speed.EPOCHS)
    ap.add_argument("--quick", action="store_true", help="1 seed, 1 epoch, no warm-up (tests)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = ap.parse_args(argv)
    keys = [k.strip() for k in args.strategies.split(",") if k.strip()]
    unknown = [k for k in keys if k not in PAIR_BY_KEY]
    if unknown or not keys:
        ap.error(f"unknown pair(s) {unknown}; expected among: {', '.join(PAIR_BY_KEY)}")
    seeds, epochs = (1, 1) if args.quick else (args.seeds, args.epochs)

    quiet()
    torch.set_num_threads(args.threads)
    train, test, order, increments = clbench_tensors()
    check_same_split(train, test, order, increments)
    pairs = [PAIR_BY_KEY[k] for k in keys]
    print(f"digits 5x2 (clbench digits-5 tensors, split checked), MLP 64-256-256-10, SGD lr {LR} m {MOMENTUM}, "
          f"batch {BATCH}, {epochs} epochs, memory {MEMORY}; seeds 0..{seeds - 1}; torch threads "
          f"{torch.get_num_threads()}; clbench and avalanche runs alternating", flush=True)
    runs = measure(pairs, list(range(seeds)), epochs, (train, test), warmup=not args.quick)
    print()
    for line in table(pairs, runs):
        print(line)
    print("acc: final average accuracy, mean ± sample std over seeds; diff: clbench - avalanche; "
          "CPU ratio: clbench / avalanche training process CPU time, median of paired per-seed ratios, bootstrap 95% CI")
    return 0


if __name__ == "__main__":
    sys.exit(main())
